"""
What every engine shares, whatever runs the model: settings, results, and the frame pipeline.

``EngineBase.infer`` checks frames and colour orders, splits them into batches of at most
``max_batch``, times the stages and hands back each frame's probabilities (ranked into labels
on demand); a backend supplies only ``_probabilities`` (frames to class probabilities). So
preprocessing, postprocessing, stage timings and batching are the same for torch, ONNX Runtime
and OpenVINO.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
import logging
import time
from typing import Hashable, Sequence

from cnn_rnn_perception.core.engine.streams import check_reset_after, StreamMemory, StreamStatus
from cnn_rnn_perception.core.model_config import Preprocessing
from cnn_rnn_perception.core.postprocess import top_k as top_k_labels
from cnn_rnn_perception.core.preprocess import check_color_order, check_frame
import numpy as np
import torch

_LOG = logging.getLogger('cnn_rnn_perception.core.engine')

BACKENDS = ('torch', 'onnxruntime', 'openvino', 'auto')
DEVICES_HELP = "'auto', 'cpu', 'cuda' or 'cuda:N'"
PRECISIONS = ('auto', 'fp32', 'fp16', 'bf16')
_DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}


@dataclass(frozen=True)
class EngineSettings:
    """How the engine runs the model; none of these change its results beyond precision."""

    device: str = 'auto'
    precision: str = 'auto'
    channels_last: bool = True
    compile_trunk: bool = True
    cuda_graphs: bool = True
    # None: static buffers where CUDA graphs replay them; True: on the CPU too (tests, selftest).
    static_buffers: bool | None = None
    backend: str = 'torch'
    warmup_iterations: int = 2
    max_batch: int = 32
    # Temporal models only: a stream whose frames are further apart than this starts afresh.
    reset_after_s: float = 1.0
    max_streams: int = 64
    # backend auto times each candidate with its calls this far apart (the cameras' rate):
    # between frames the runtimes' thread pools go to sleep, which changes which is fastest
    # (10 ms back to back measured 16.5 ms at 15 Hz). 0: back to back.
    auto_rate_hz: float = 15.0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f'backend must be one of {", ".join(BACKENDS)}; '
                             f'got {self.backend!r}')
        if self.precision not in PRECISIONS:
            raise ValueError(f'precision must be one of {", ".join(PRECISIONS)}; '
                             f'got {self.precision!r}')
        if self.warmup_iterations < 0:
            raise ValueError(f'warmup_iterations must be >= 0; got {self.warmup_iterations}')
        if self.max_batch < 1:
            raise ValueError(f'max_batch must be >= 1; got {self.max_batch}')
        parse_device_name(self.device)
        check_reset_after(self.reset_after_s)
        if self.max_streams < 1:
            raise ValueError(f'max_streams must be >= 1; got {self.max_streams}')
        if not 0.0 <= self.auto_rate_hz <= 1000.0:
            raise ValueError(f'auto_rate_hz must be in [0, 1000]; got {self.auto_rate_hz}')


def parse_device_name(name: str) -> str:
    """Check the spelling of a device setting, without looking at the hardware."""
    if name in ('auto', 'cpu', 'cuda'):
        return name
    if name.startswith('cuda:') and name[5:].isdigit():
        return name
    raise ValueError(f'device must be {DEVICES_HELP}; got {name!r}')


def resolve_device(name: str, *, quiet: bool = False) -> torch.device:
    """Turn a device setting into a torch device; ``auto`` falls back to the CPU, and says so."""
    parse_device_name(name)
    if name == 'auto':
        if torch.cuda.is_available():
            return torch.device('cuda', torch.cuda.current_device())
        if not quiet:
            _LOG.warning('device auto: no CUDA device is available, running on the CPU')
        return torch.device('cpu')
    device = torch.device(name)
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise ValueError(f'device {name!r} requested but torch sees no CUDA device '
                             f'(torch {torch.__version__}); set device to auto or cpu')
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f'device {name!r} requested but only {torch.cuda.device_count()} '
                             'CUDA device(s) exist')
        device = torch.device('cuda', index)
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """Turn a precision setting into the trunk's dtype; ``auto``: bf16 on GPUs that have it."""
    if precision == 'auto':
        if device.type != 'cuda':
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == 'fp16' and device.type == 'cpu':
        raise ValueError('precision fp16 is for GPUs; use bf16 or fp32 on the CPU')
    return _DTYPES[precision]


def cpu_flags() -> set[str]:
    """Return this CPU's feature flags (empty where /proc/cpuinfo cannot be read)."""
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            return set(next((line for line in cpuinfo if line.startswith('flags')), '').split())
    except OSError:
        return set()


def cpu_has_bf16() -> bool:
    """Return whether this CPU has bf16 arithmetic (avx512_bf16 or AMX)."""
    return bool({'avx512_bf16', 'amx_bf16'} & cpu_flags())


def precision_name(dtype: torch.dtype) -> str:
    """Return 'fp32', 'fp16' or 'bf16'."""
    return {value: key for key, value in _DTYPES.items()}[dtype]


@dataclass(frozen=True)
class StageTimes:
    """
    Wall time of each stage of one batch, in milliseconds.

    On a GPU, ``preprocess_ms`` is the host's share (staging the frames, starting the upload)
    and ``forward_ms`` runs from launching the device work until its results are on the host,
    device-side resize and normalisation included.
    """

    preprocess_ms: float
    forward_ms: float
    postprocess_ms: float
    batch_size: int

    @property
    def total_ms(self) -> float:
        """Return the sum of the stages."""
        return self.preprocess_ms + self.forward_ms + self.postprocess_ms


@dataclass(frozen=True, eq=False)
class FrameResult:
    """
    One frame's result: its class probabilities, ranked into labels when asked.

    Ranking is left to the reader (``top_k``, ``label``, ``score``), so a caller that ranks
    something else (the node ranks smoothed probabilities) pays for no ranking here.
    """

    probabilities: np.ndarray
    labels: Sequence[str]
    times: StageTimes
    stream: Hashable | None = None
    k: int = 5

    @property
    def top_k(self) -> list[tuple[str, float]]:
        """Return up to ``k`` (label, score) pairs, best first."""
        return top_k_labels(self.probabilities, self.k, self.labels)

    @property
    def label(self) -> str:
        """Return the most likely label."""
        return self.labels[int(np.argmax(self.probabilities))]

    @property
    def score(self) -> float:
        """Return the most likely label's probability."""
        return float(np.max(self.probabilities))


class EngineBase(abc.ABC):
    """
    Frames in, classifications out; a backend subclass supplies ``_probabilities``.

    Call ``infer`` with uint8 HxWxC frames of any size; call ``close`` (or use it as a context
    manager) to free what the backend holds.
    """

    device: torch.device = torch.device('cpu')
    # True for a model with a temporal stage: each stream's state is carried between calls.
    temporal: bool = False

    def __init__(self, *, labels: Sequence[str], preprocessing: Preprocessing,
                 settings: EngineSettings) -> None:
        """Keep what every backend needs; the subclass prepares its model."""
        self.settings = settings
        self.labels = list(labels)
        self.preprocessing = preprocessing
        self.streams = StreamMemory(settings.max_streams, settings.reset_after_s)

    @abc.abstractmethod
    def _probabilities(self, frames: list[np.ndarray], orders: list[str],
                       slots: list[int], fresh: list[bool]) -> tuple[np.ndarray, float]:
        """
        Return probabilities [B, classes] and the time the input was ready for the model.

        ``slots`` and ``fresh`` give each frame's row of the temporal state and whether it
        starts afresh; models without a temporal stage ignore them.
        """

    def _device(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def _out_of_memory(self, batch_size: int) -> None:
        """Recover what a failed batch held; the torch backend drops its buffers here."""

    def warmup(self, frame_shape: tuple[int, ...] | None = None,
               batch_sizes: Sequence[int] = (1,), color_order: str = 'bgr') -> None:
        """
        Run the engine on blank frames so the first real frame pays no start-up costs.

        Each batch size gets its compiled graph and its static buffers (on a GPU, its CUDA
        graph) here; frame sizes and colour orders need no warm-up of their own.
        ``frame_shape`` defaults to the model's input size with three channels.
        """
        frame_shape = frame_shape or (*self.preprocessing.input_size, 3)
        blank = np.zeros(frame_shape, dtype=np.uint8)
        for batch_size in batch_sizes:
            if batch_size > self.settings.max_batch:
                raise ValueError(f'cannot warm up batch size {batch_size}: max_batch is '
                                 f'{self.settings.max_batch}')
            for _ in range(max(self.settings.warmup_iterations, 1)):
                self.infer([blank] * batch_size, color_order=color_order)

    # -- inference ---------------------------------------------------------------------------

    def infer(self, frames: Sequence[np.ndarray], *, color_order: str | Sequence[str] = 'bgr',
              streams: Sequence[Hashable] | None = None,
              stamps: Sequence[float | None] | None = None, top_k: int = 5
              ) -> list[FrameResult]:
        """
        Classify frames (uint8 HxW, HxWx1, HxWx3 or HxWx4 arrays of any size).

        ``color_order`` is 'rgb' or 'bgr', for all frames or one per frame. ``streams`` names
        each frame's camera and ``stamps`` its capture time in seconds: a temporal model
        carries each stream's state from frame to frame, resetting it by the rules of
        ``StreamMemory``; frames of one stream must come in stamp order. Frames beyond
        ``max_batch``, and a stream's second frame in one call, go to further forward passes.
        """
        frames = [check_frame(frame) for frame in frames]
        count = len(frames)
        orders = ([check_color_order(color_order)] * count if isinstance(color_order, str)
                  else [check_color_order(order) for order in color_order])
        streams = list(streams) if streams is not None else [None] * count
        stamps = list(stamps) if stamps is not None else [None] * count
        if len(orders) != count or len(streams) != count or len(stamps) != count:
            raise ValueError(f'{count} frames but {len(orders)} colour orders, '
                             f'{len(streams)} streams and {len(stamps)} stamps')
        if top_k < 1:
            raise ValueError('top_k must be >= 1')
        results: list[FrameResult] = []
        for chunk in self._chunks(streams):
            results += self._infer_batch([frames[i] for i in chunk], [orders[i] for i in chunk],
                                         [streams[i] for i in chunk],
                                         [stamps[i] for i in chunk], top_k)
        return results

    def _chunks(self, streams: list[Hashable]) -> list[range]:
        """
        Split frames into forward passes of at most max_batch, a stream at most once each.

        A temporal model's pass also holds at most as many streams as its state table has
        rows: more would make one stream's row the row of another in the same pass.
        """
        chunks, start, seen = [], 0, set()  # seen: the named streams of the current pass
        for index, stream in enumerate(streams):
            named = self.temporal and stream is not None
            if (index - start == self.settings.max_batch
                    or named and (stream in seen or len(seen) == self.streams.capacity)):
                chunks.append(range(start, index))
                start, seen = index, set()
            if named:
                seen.add(stream)
        if start < len(streams):
            chunks.append(range(start, len(streams)))
        return chunks

    def _infer_batch(self, frames: list[np.ndarray], orders: list[str],
                     streams: list[Hashable], stamps: list[float | None],
                     k: int) -> list[FrameResult]:
        started = time.perf_counter()
        if self.temporal:
            slots, fresh = self.streams.admit(streams, stamps)
        else:
            slots, fresh = [0] * len(frames), [True] * len(frames)
        try:
            with self._device():
                probabilities, upload_done = self._probabilities(frames, orders, slots, fresh)
        except BaseException as error:
            if self.temporal:
                # The pass wrote no state, so a row handed to a fresh stream still holds its
                # previous owner's: those streams (and the rest of the batch) start afresh.
                self.streams.forget(*[stream for stream in streams if stream is not None])
            if not isinstance(error, torch.cuda.OutOfMemoryError):
                raise
            self._out_of_memory(len(frames))
            raise RuntimeError(
                f'CUDA out of memory at batch size {len(frames)} '
                f'(frames {frames[0].shape[1]}x{frames[0].shape[0]}); lower max_batch or use '
                'a smaller backbone or input size') from error
        forward_done = time.perf_counter()
        rows = list(probabilities)
        finished = time.perf_counter()
        times = StageTimes(preprocess_ms=(upload_done - started) * 1e3,
                           forward_ms=(forward_done - upload_done) * 1e3,
                           postprocess_ms=(finished - forward_done) * 1e3,
                           batch_size=len(frames))
        return [FrameResult(probabilities=row, labels=self.labels, times=times, stream=stream,
                            k=k) for row, stream in zip(rows, streams)]

    def carry_state_from(self, other: EngineBase) -> bool:
        """Take over ``other``'s per-camera temporal state if this backend can; say whether."""
        return False

    def reset_streams(self, *streams: Hashable) -> None:
        """Start the named streams afresh at their next frame, or every stream if none named."""
        self.streams.forget(*streams)

    def stream_status(self) -> dict[Hashable, StreamStatus]:
        """Return what each stream's temporal state has seen (empty for per-frame models)."""
        return self.streams.status() if self.temporal else {}

    @property
    def precision(self) -> str:
        """Return what the model computes in: fp32, fp16, bf16 or int8."""
        return precision_name(getattr(self, 'dtype', torch.float32))

    def describe(self) -> str:
        """Return a one-line summary for logs and diagnostics."""
        return type(self).__name__

    def close(self) -> None:
        """Release what the backend holds."""

    def __enter__(self) -> EngineBase:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
