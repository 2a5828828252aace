"""
Which camera stream owns which row of the temporal state, and when a stream starts afresh.

The rules are the same wherever a temporal model runs (the node, ``evaluate``, ``replay``),
because they live here, in the engine: a stream's state resets when it is new, when the gap
between its frames exceeds ``reset_after_s``, and when its stamps go backwards (a bag looped).
A deactivated or reloaded node builds a new engine, which starts with no streams at all.
Streams are independent: what one camera sends never touches another's row.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
import threading
from typing import Hashable, Sequence


@dataclass(frozen=True)
class StreamStatus:
    """One stream's memory: since when (by its frames' stamps), and why it last started."""

    slot: int
    started_s: float | None
    last_s: float | None
    frames: int
    resets: int
    reason: str

    @property
    def age_s(self) -> float:
        """Return how much of the stream the state has seen, in seconds of its stamps."""
        if self.started_s is None or self.last_s is None:
            return 0.0
        return self.last_s - self.started_s


class StreamMemory:
    """
    Assigns each stream a row of a fixed-size state table and applies the reset rules.

    ``capacity`` rows serve named streams; the least recently seen stream gives its row up
    when a new one arrives and all are taken. Frames with no stream name use a scratch row
    (``capacity``) that is always fresh: one-off frames such as warm-up never carry state.
    """

    def __init__(self, capacity: int, reset_after_s: float) -> None:
        if capacity < 1:
            raise ValueError(f'capacity must be >= 1; got {capacity}')
        self.capacity = capacity
        self.reset_after_s = check_reset_after(reset_after_s)
        self._streams: OrderedDict[Hashable, StreamStatus] = OrderedDict()
        # The node reads status() for diagnostics while its worker admits frames.
        self._lock = threading.Lock()

    @property
    def scratch_slot(self) -> int:
        """Return the row that frames without a stream use."""
        return self.capacity

    def set_reset_after(self, seconds: float) -> None:
        """Change the gap that resets a stream, from the next frame on."""
        self.reset_after_s = check_reset_after(seconds)

    def admit(self, streams: Sequence[Hashable | None], stamps: Sequence[float | None]
              ) -> tuple[list[int], list[bool]]:
        """
        Return each frame's state row and whether it starts afresh, and record the frames.

        A stream may appear once per call: its frames are consecutive, so two in one batch
        would both read the state from before either.
        """
        named = [stream for stream in streams if stream is not None]
        if len(set(named)) != len(named):
            raise ValueError('a stream appears twice in one batch; split it (EngineBase.infer '
                             'does)')
        if len(named) > self.capacity:
            # A new stream would take the row of one admitted earlier in the same batch.
            raise ValueError(f'{len(named)} streams in one batch, but the state table has '
                             f'{self.capacity} rows; split it (EngineBase.infer does) or raise '
                             'max_streams')
        with self._lock:
            return self._admit(streams, stamps)

    def _admit(self, streams: Sequence[Hashable | None], stamps: Sequence[float | None]
               ) -> tuple[list[int], list[bool]]:
        slots, fresh = [], []
        for stream, stamp in zip(streams, stamps):
            if stream is None:
                slots.append(self.scratch_slot)
                fresh.append(True)
                continue
            status = self._streams.pop(stream, None)
            reason = self._reset_reason(status, stamp)
            if status is None:
                status = StreamStatus(slot=self._free_slot(), started_s=stamp, last_s=stamp,
                                      frames=1, resets=0, reason=reason or 'new stream')
            elif reason:
                status = replace(status, started_s=stamp, last_s=stamp, frames=1,
                                 resets=status.resets + 1, reason=reason)
            else:
                status = replace(status, last_s=stamp if stamp is not None else status.last_s,
                                 frames=status.frames + 1)
            self._streams[stream] = status
            slots.append(status.slot)
            fresh.append(status.frames == 1)
        return slots, fresh

    def _reset_reason(self, status: StreamStatus | None, stamp: float | None) -> str:
        if status is None:
            return 'new stream'
        if stamp is None or status.last_s is None:
            return ''
        if stamp < status.last_s:
            return f'stamps went backwards by {status.last_s - stamp:.3f} s'
        if stamp - status.last_s > self.reset_after_s:
            return f'gap of {stamp - status.last_s:.3f} s > reset_after_s {self.reset_after_s:g}'
        return ''

    def _free_slot(self) -> int:
        taken = {status.slot for status in self._streams.values()}
        if len(taken) < self.capacity:
            return min(set(range(self.capacity)) - taken)
        _, oldest = self._streams.popitem(last=False)
        return oldest.slot

    def forget(self, *streams: Hashable) -> None:
        """Forget the named streams, or every stream when none are named."""
        with self._lock:
            if not streams:
                self._streams.clear()
            for stream in streams:
                self._streams.pop(stream, None)

    def status(self) -> dict[Hashable, StreamStatus]:
        """Return every known stream's memory, least recently seen first."""
        with self._lock:
            return dict(self._streams)


def check_reset_after(seconds: float) -> float:
    """Return ``seconds`` if it is a usable reset gap, else raise naming the fix."""
    if not seconds > 0.0:
        raise ValueError(f'temporal.reset_after_s must be > 0; got {seconds}')
    return float(seconds)
