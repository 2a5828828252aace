"""
The node's per-camera bookkeeping, without ROS: counters, the newest frame, rate-limited logs.

``LatestFrames`` keeps only the newest frame of each camera (no backlog, ever); ``CameraStats``
counts every frame received as classified, dropped as stale or rejected; ``RateLimitedLog``
keeps a camera that repeats one fault from flooding the log. Plain Python, tested without
``rclpy.init`` (the worker that runs the batches is ``ros.worker``).
"""

from __future__ import annotations

from collections import deque, OrderedDict
import threading
import time
from typing import Any, Hashable

import numpy as np


class RateLimitedLog:
    """
    Say a message at once, then at most once per ``period_s`` per (key, message).

    Bounded: reasons carry numbers (byte counts, sizes), so a camera sending ever-different
    garbage would otherwise grow the table for ever. The oldest entries go first.
    """

    def __init__(self, period_s: float = 5.0, max_entries: int = 256) -> None:
        self.period_s = period_s
        self.max_entries = max_entries
        self._last: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._last)

    def should_log(self, key: str, message: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        entry = (key, message)
        with self._lock:
            last = self._last.get(entry)
            if last is not None and now - last < self.period_s:
                return False
            self._last[entry] = now
            self._last.move_to_end(entry)
            while len(self._last) > self.max_entries:
                self._last.popitem(last=False)
        return True


class CameraStats:
    """Counters and latencies of one camera; every method is thread-safe."""

    def __init__(self, topic: str, latency_window: int = 512) -> None:
        self.topic = topic
        self._lock = threading.Lock()
        self.received = self.classified = self.dropped_stale = self.rejected = 0
        self.last_reason = ''
        self.last_received_at: float | None = None
        self._progress_at = time.monotonic()  # last frame handled, or when counting began
        self._received_since_progress = 0
        self._latencies_ms: deque[float] = deque(maxlen=latency_window)
        self._window_start = time.monotonic()
        self._window_received = self._window_classified = self._window_rejected = 0

    def on_received(self) -> None:
        with self._lock:
            self.received += 1
            self._received_since_progress += 1
            self._window_received += 1
            self.last_received_at = time.monotonic()

    def on_dropped_stale(self, count: int = 1) -> None:
        with self._lock:
            self.dropped_stale += count

    def on_rejected(self, reason: str) -> None:
        with self._lock:
            self.rejected += 1
            self._progress_at = time.monotonic()
            self._received_since_progress = 0
            self._window_rejected += 1
            self.last_reason = reason

    def on_classified(self, latency_ms: float) -> None:
        with self._lock:
            self._progress_at = time.monotonic()
            self._received_since_progress = 0
            self.classified += 1
            self._window_classified += 1
            self._latencies_ms.append(latency_ms)

    def snapshot(self, silent_after_s: float, stalled_after_s: float | None = None,
                 cause: str = '') -> dict[str, Any]:
        """
        Return totals, rates since the last snapshot, latency percentiles and a level.

        Frames arriving with none classified for ``stalled_after_s`` (default
        ``silent_after_s``) is an error, whatever the reason; ``cause`` names it when known.
        """
        stalled_after_s = silent_after_s if stalled_after_s is None else stalled_after_s
        with self._lock:
            now = time.monotonic()
            elapsed = max(now - self._window_start, 1e-6)
            latencies = np.array(self._latencies_ms) if self._latencies_ms else None
            p50, p95 = (None, None) if latencies is None else (
                float(np.percentile(latencies, 50)), float(np.percentile(latencies, 95)))
            silent_for = None if self.last_received_at is None else now - self.last_received_at
            snap = {
                'topic': self.topic, 'received': self.received, 'classified': self.classified,
                'dropped_stale': self.dropped_stale, 'rejected': self.rejected,
                'pending': self.received - self.classified - self.dropped_stale - self.rejected,
                'last_reject_reason': self.last_reason,
                'input_hz': self._window_received / elapsed,
                'classified_hz': self._window_classified / elapsed,
                'latency_p50_ms': p50, 'latency_p95_ms': p95,
            }
            window_all_rejected = self._window_rejected > 0 and self._window_classified == 0
            stalled_for = now - self._progress_at
            stalled = (silent_for is not None and silent_for <= silent_after_s
                       and self._received_since_progress > 0
                       and stalled_for > stalled_after_s)
            self._window_start = now
            self._window_received = self._window_classified = self._window_rejected = 0
        if window_all_rejected:
            snap['level'], snap['message'] = 2, f'every frame rejected: {self.last_reason}'
        elif stalled:
            snap['level'] = 2
            snap['message'] = (f'frames arrive but none classified for {stalled_for:.1f} s'
                               + (f': {cause}' if cause else ''))
        elif silent_for is None:
            snap['level'], snap['message'] = 1, 'no frames received yet'
        elif silent_for > silent_after_s:
            snap['level'], snap['message'] = 1, f'silent for {silent_for:.1f} s'
        else:
            snap['level'], snap['message'] = 0, 'ok'
        return snap


class LatestFrames:
    """
    The newest unprocessed frame of each camera, and nothing older: no backlog, ever.

    ``put`` returns True when it overwrote a frame inference never saw (a stale drop).
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._slots: dict[Hashable, Any] = {}
        self._closed = False

    def put(self, key: Hashable, item: Any) -> bool:
        with self._condition:
            replaced = key in self._slots
            self._slots[key] = item
            self._condition.notify()
        return replaced

    def take_all(self, timeout_s: float) -> dict[Hashable, Any]:
        """Wait up to ``timeout_s`` for frames; return and clear every slot."""
        with self._condition:
            if not self._slots and not self._closed:
                self._condition.wait(timeout_s)
            slots, self._slots = self._slots, {}
        return slots

    def discard(self, key: Hashable) -> bool:
        """Drop one camera's pending frame; return True when there was one."""
        with self._condition:
            return self._slots.pop(key, None) is not None

    def drain(self) -> dict[Hashable, Any]:
        """Return and clear what is pending; waiting goes on as before."""
        with self._condition:
            slots, self._slots = self._slots, {}
        return slots

    def close(self) -> dict[Hashable, Any]:
        """Wake any waiter; return what was still pending."""
        with self._condition:
            self._closed = True
            slots, self._slots = self._slots, {}
            self._condition.notify_all()
        return slots

    def reopen(self) -> None:
        with self._condition:
            self._closed = False


class CameraRoster:
    """
    The counters of the node's cameras, by topic; every frame received is counted in one.

    ``set_topics`` adds new cameras at once but only marks removed ones: ``retire`` forgets
    them, and the node calls it from the inference worker between batches, so a batch never
    finds the counters of a camera it holds gone. A frame a retired camera still had waiting
    was never classified, and is counted as a stale drop first.
    """

    def __init__(self, frames: LatestFrames) -> None:
        self._frames = frames
        self._lock = threading.Lock()
        self._stats: dict[str, CameraStats] = {}
        self._retiring: set[str] = set()

    def get(self, topic: str) -> CameraStats | None:
        """Return a camera's counters, or None for a topic that is not (or no longer) one."""
        return self._stats.get(topic)

    def items(self) -> list[tuple[str, CameraStats]]:
        with self._lock:
            return list(self._stats.items())

    @property
    def retiring(self) -> bool:
        """Return whether cameras wait to be retired."""
        return bool(self._retiring)

    def set_topics(self, topics: list[str]) -> None:
        """Count ``topics`` from now on; the others wait for ``retire``."""
        with self._lock:
            for topic in topics:
                self._stats.setdefault(topic, CameraStats(topic))
            self._retiring = set(self._stats) - set(topics)

    def retire(self) -> list[dict[str, Any]]:
        """Forget the cameras removed from the topics; return their final counts."""
        with self._lock:
            retired = [self._stats.pop(topic) for topic in sorted(self._retiring)]
            self._retiring = set()
        for stats in retired:
            if self._frames.discard(stats.topic):
                stats.on_dropped_stale()
        return [stats.snapshot(silent_after_s=1.0) for stats in retired]

    def clear(self) -> None:
        with self._lock:
            self._stats.clear()
            self._retiring = set()

    def on_dropped_stale(self, topic: str) -> None:
        stats = self._stats.get(topic)
        if stats is not None:  # a worker given up on may still hold a camera retired since
            stats.on_dropped_stale()

    def on_rejected(self, topic: str, reason: str) -> None:
        stats = self._stats.get(topic)
        if stats is not None:
            stats.on_rejected(reason)
