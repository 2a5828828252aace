"""
One way to build an engine: from a checkpoint, an exported file or a config, on any backend.

``backend: auto`` measures instead of guessing: it builds every backend installed here, times
each on frames of the real input shape, checks each against the fp32 torch model, and keeps
the fastest that agrees. A precision the CPU has no units for (bf16 without avx512_bf16 or
AMX) is never what ``auto`` picks; asked for explicitly, it is run, with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
import importlib.util
import logging
import os
from pathlib import Path
import tempfile
import time
from typing import Any, Callable, Sequence

from cnn_rnn_perception.core.engine.base import EngineBase, EngineSettings, resolve_device
from cnn_rnn_perception.core.engine.export_format import (
    export_onnx, inspect_model_file, is_exported, PARITY_FP32)
from cnn_rnn_perception.core.engine.exported import ExportedEngine
from cnn_rnn_perception.core.engine.onnxruntime_backend import OnnxRuntimeEngine
from cnn_rnn_perception.core.engine.openvino_backend import OpenVinoEngine
from cnn_rnn_perception.core.engine.torch_backend import TorchEngine
from cnn_rnn_perception.core.model import (
    CnnRnnClassifier, default_labels, load_checkpoint, ModelConfig, Preprocessing, seeded)
from cnn_rnn_perception.core.sample_frames import camera_frames
import numpy as np

_LOG = logging.getLogger('cnn_rnn_perception.core.engine')

RUNTIMES = {'onnxruntime': 'onnxruntime', 'openvino': 'openvino'}


def _here(task: Callable[[], Any]) -> Any:
    return task()


def installed_backends() -> list[str]:
    """Return the backends this machine can run: torch, and each runtime that imports."""
    return ['torch'] + [name for name, module in RUNTIMES.items()
                        if importlib.util.find_spec(module) is not None]


def cpu_has_bf16() -> bool:
    """Return whether this CPU has bf16 arithmetic (avx512_bf16 or AMX)."""
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith('flags')), '')
    except OSError:
        return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


@dataclass
class BackendChoice:
    """What ``auto`` measured and what it chose, for the log and /diagnostics."""

    chosen: str
    ms_per_frame: dict[str, float] = field(default_factory=dict)
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        times = ', '.join(f'{name} {ms:.1f} ms' for name, ms in self.ms_per_frame.items())
        failed = ''.join(f'; {name} failed: {why}' for name, why in self.failed.items())
        return f'backend auto chose {self.chosen} ({times}{failed})'


def open_exported(path: str | os.PathLike, settings: EngineSettings) -> ExportedEngine:
    """Open an exported file with the runtime ``settings.backend`` names."""
    if settings.backend == 'onnxruntime':
        return OnnxRuntimeEngine(path, settings)
    if settings.backend == 'openvino':
        return OpenVinoEngine(path, settings)
    raise ValueError(f'{os.fspath(path)!r} is an exported model: run it with backend '
                     f'onnxruntime or openvino (backend is {settings.backend!r})')


def model_parts(source: str | os.PathLike | None, config: ModelConfig | None,
                labels: Sequence[str] | None = None, seed: int = 0
                ) -> tuple[CnnRnnClassifier, list[str], Preprocessing]:
    """Return (model, labels, preprocessing) of a checkpoint, or of ``config`` seeded."""
    if source:
        checkpoint = load_checkpoint(source)
        return checkpoint.model, checkpoint.labels, checkpoint.preprocessing
    if config is None:
        raise ValueError('give a checkpoint or a model config')
    with seeded(seed):
        model = CnnRnnClassifier(config).eval()
    return (model, list(labels or default_labels(config.num_classes)),
            Preprocessing.for_config(config))


def _is_temporal(source: str | os.PathLike | None, config: ModelConfig | None) -> bool:
    if source:
        config = inspect_model_file(source).config
    return bool(config is not None and config.temporal)


def create_engine(source: str | os.PathLike | None, settings: EngineSettings, *,
                  config: ModelConfig | None = None, labels: Sequence[str] | None = None,
                  seed: int = 0, on_worker: Callable[[Callable[[], Any]], Any] = _here
                  ) -> EngineBase:
    """
    Build the engine ``settings.backend`` names for a checkpoint, an exported file or a config.

    A torch checkpoint runs on onnxruntime or openvino through an ONNX export made here (kept
    beside the engine until it closes); an exported file runs only on those two.
    """
    if settings.precision == 'bf16' and resolve_device(settings.device, quiet=True).type == \
            'cpu' and not cpu_has_bf16():
        _LOG.warning('precision bf16 on a CPU without bf16 units (avx512_bf16, AMX) is slower '
                     'than fp32, often several times: use precision fp32 or auto')
    if settings.backend == 'auto':
        return choose_backend(source, settings, config=config, labels=labels, seed=seed,
                              on_worker=on_worker)[0]
    if source and is_exported(source):
        return open_exported(source, settings)
    if settings.backend == 'torch':
        if source:
            return TorchEngine.from_checkpoint(source, settings, on_worker=on_worker)
        return TorchEngine.from_config(config, labels=labels, settings=settings, seed=seed,
                                       on_worker=on_worker)
    model, model_labels, preprocessing = model_parts(source, config, labels, seed)
    folder = tempfile.TemporaryDirectory(prefix='cnn_rnn_perception-export-')
    try:
        path = export_onnx(model, model_labels, preprocessing, Path(folder.name) / 'model.onnx')
        engine = open_exported(path, settings)
    except BaseException:
        folder.cleanup()
        raise
    engine._export_folder = folder  # removed with the engine
    return engine


def choose_backend(source: str | os.PathLike | None, settings: EngineSettings, *,
                   config: ModelConfig | None = None, labels: Sequence[str] | None = None,
                   seed: int = 0, frame_shape: tuple[int, int, int] = (480, 640, 3),
                   timed_frames: int = 8, rounds: int = 6,
                   on_worker: Callable[[Callable[[], Any]], Any] = _here
                   ) -> tuple[EngineBase, BackendChoice]:
    """
    Build every installed backend, time it, check it; return the fastest that agrees.

    ``on_worker(task)`` runs the timing rounds (not the builds) and, for torch, CUDA-graph
    captures: the node runs them in its inference worker's thread, between batches, so
    nothing classifies beside them (compiled torch measured 21 ms beside a running ONNX
    Runtime, 12 ms alone) and each backend is timed in the thread it will run in.
    """
    frames = camera_frames(timed_frames, frame_shape[0], frame_shape[1], seed=7)
    candidates = [name for name in installed_backends()
                  if not (source and is_exported(source) and name == 'torch')]
    if _is_temporal(source, config):
        candidates = ['torch']  # export refuses temporal models: only torch carries state
    precision = settings.precision
    if precision == 'bf16' and resolve_device(settings.device, quiet=True).type == 'cpu' \
            and not cpu_has_bf16():
        precision = 'fp32'  # auto never picks what this CPU cannot run fast
    reference = None
    if not (source and is_exported(source)):
        with create_engine(source, replace(settings, backend='torch', precision='fp32',
                                           compile_trunk=False, static_buffers=False),
                           config=config, labels=labels, seed=seed) as torch_fp32:
            reference = [r.probabilities for r in torch_fp32.infer(frames[:2])]
    choice = BackendChoice(chosen='')
    engines: dict[str, EngineBase] = {}
    # Whatever fails from here on (a build, a timing or agreement call, no agreement), the
    # engines built so far are closed: each holds a model and a runtime's threads.
    try:
        for name in candidates:
            try:
                engine = create_engine(source, replace(settings, backend=name, precision=precision
                                                       if name == 'torch' else 'fp32'),
                                       config=config, labels=labels, seed=seed,
                                       on_worker=on_worker)
            except Exception as error:  # a backend that cannot load is reported, not fatal
                choice.failed[name] = str(error)
                continue
            engines[name] = engine
            engine.infer(frames[:1])  # the first call of a new frame shape
            if reference is not None:
                got = [r.probabilities for r in engine.infer(frames[:2])]
                choice.max_abs_diff[name] = max(float(np.abs(a - b).max())
                                                for a, b in zip(got, reference))
        # Rounds alternate between the backends: in a node, the engine being replaced keeps
        # classifying meanwhile, and measured one after another each backend met other load (one
        # measured 9.7 ms that way ran at 18 ms). Interleaved, the load falls on all alike.

        def time_rounds() -> dict[str, list[float]]:
            times: dict[str, list[float]] = {name: [] for name in engines}
            for engine in engines.values():  # the first call in this thread
                engine.infer(frames[:1])
            for round_index in range(rounds):
                for name, engine in engines.items():
                    # Runtimes' thread pools spin on after a call; timed right after another
                    # backend, compiled torch read 18 ms for its 12. So each block starts after
                    # a pause and an untimed call.
                    time.sleep(0.05)
                    engine.infer(frames[round_index % len(frames):][:1])
                    for frame in frames[round_index % len(frames):][:3]:
                        started = time.perf_counter()
                        engine.infer([frame])
                        times[name].append(time.perf_counter() - started)
            return times

        for name, samples in on_worker(time_rounds).items():
            choice.ms_per_frame[name] = float(np.median(samples)) * 1e3
        tolerance = PARITY_FP32 if precision == 'fp32' else 3e-2
        agreeing = [name for name in engines
                    if choice.max_abs_diff.get(name, 0.0) <= tolerance]
        if not agreeing:
            raise RuntimeError(f'no backend could run this model: {choice.failed or choice}')
        choice.chosen = min(agreeing, key=lambda name: choice.ms_per_frame[name])
    except BaseException:
        for engine in engines.values():
            engine.close()
        raise
    for name, engine in engines.items():
        if name != choice.chosen:
            engine.close()
    chosen = engines[choice.chosen]
    chosen.backend_choice = choice
    _LOG.info(choice.summary())
    return chosen, choice
