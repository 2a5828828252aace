"""
One way to build an engine: from a checkpoint, an exported file or a config, on any backend.

``backend: auto`` measures instead of guessing: it builds every backend installed here (and
the accepted reduced-precision files beside an exported one), times each on frames of the
real input shape at the cameras' rate, checks each against the fp32 torch model, and keeps
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

from cnn_rnn_perception.core.checkpoint import default_labels, load_checkpoint, seeded
from cnn_rnn_perception.core.engine.base import (
    cpu_has_bf16, EngineBase, EngineSettings, resolve_device)
from cnn_rnn_perception.core.engine.export_format import (
    export_onnx, inspect_model_file, is_exported, PARITY_FP32, reduced_variants)
from cnn_rnn_perception.core.engine.exported import ExportedEngine
from cnn_rnn_perception.core.engine.onnxruntime_backend import OnnxRuntimeEngine
from cnn_rnn_perception.core.engine.openvino_backend import OpenVinoEngine
from cnn_rnn_perception.core.engine.torch_backend import TorchEngine
from cnn_rnn_perception.core.model import CnnRnnClassifier
from cnn_rnn_perception.core.model_config import ModelConfig, Preprocessing
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


@dataclass
class BackendChoice:
    """What ``auto`` measured and what it chose, for the log and /diagnostics."""

    chosen: str
    ms_per_frame: dict[str, float] = field(default_factory=dict)
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    rate_hz: float = 0.0
    # A reduced-precision candidate's accuracy gate, as its file records it.
    acceptance: dict[str, dict[str, Any]] = field(default_factory=dict)
    reused: bool = False  # taken from an earlier measurement of the same files and settings

    def summary(self) -> str:
        cadence = f'at {self.rate_hz:g} Hz' if self.rate_hz else 'back to back'
        times = ', '.join(f'{name} {ms:.1f} ms' for name, ms in
                          sorted(self.ms_per_frame.items(), key=lambda item: item[1]))
        failed = ''.join(f'; {name} failed: {why}' for name, why in self.failed.items())
        gate = self.acceptance.get(self.chosen)
        accepted = (f'; {self.chosen} passed its accuracy gate: {describe_acceptance(gate)}'
                    if gate else '')
        verb = 'reused its choice of' if self.reused else 'chose'
        return (f'backend auto {verb} {self.chosen}, the fastest {cadence} ({times}'
                f'{failed}){accepted}')


def describe_acceptance(gate: dict[str, Any]) -> str:
    """Return an accuracy gate's figures in words, as export prints them."""
    return (f'accuracy {100 * gate["accuracy"]:.1f}% against fp32 '
            f'{100 * gate["fp32_accuracy"]:.1f}%, top-1 agreement with fp32 '
            f'{100 * gate["agreement"]:.1f}% on {gate["frames"]} held-out frames')


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
                  seed: int = 0, on_worker: Callable[[Callable[[], Any]], Any] = _here,
                  timing_on: Callable[[Callable[[], Any]], Any] | None = None,
                  choices: dict[tuple, BackendChoice] | None = None) -> EngineBase:
    """
    Build the engine ``settings.backend`` names for a checkpoint, an exported file or a config.

    A torch checkpoint runs on onnxruntime or openvino through an ONNX export made here (kept
    beside the engine until it closes); an exported file runs only on those two.
    ``timing_on`` and ``choices`` are ``choose_backend``'s, for ``auto``.
    """
    if settings.precision == 'bf16' and resolve_device(settings.device, quiet=True).type == \
            'cpu' and not cpu_has_bf16():
        _LOG.warning('precision bf16 on a CPU without bf16 units (avx512_bf16, AMX) is slower '
                     'than fp32, often several times: use precision fp32 or auto')
    if settings.backend == 'auto':
        return choose_backend(source, settings, config=config, labels=labels, seed=seed,
                              on_worker=on_worker, timing_on=timing_on, choices=choices)[0]
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


@dataclass(frozen=True)
class _Candidate:
    name: str  # as the summary names it: a backend, and a precision where it is reduced
    source: str | os.PathLike | None
    settings: EngineSettings


def _torch_precision(settings: EngineSettings) -> str:
    if settings.precision == 'bf16' and not cpu_has_bf16() and \
            resolve_device(settings.device, quiet=True).type == 'cpu':
        return 'fp32'  # auto never picks what this CPU cannot run fast
    return settings.precision


def _candidates(source: str | os.PathLike | None, config: ModelConfig | None,
                settings: EngineSettings, choice: BackendChoice) -> list[_Candidate]:
    """Every backend (and accepted reduced-precision file) that could run this model here."""
    exported = bool(source) and is_exported(source)
    if _is_temporal(source, config):
        return [_Candidate('torch', source, replace(settings, backend='torch'))]
    precision = _torch_precision(settings)
    candidates = []
    for name in installed_backends():
        if exported and (name == 'torch' or name == 'onnxruntime'
                         and Path(source).suffix.lower() != '.onnx'):
            continue  # torch runs checkpoints only; ONNX Runtime reads ONNX only
        candidates.append(_Candidate(name, source, replace(
            settings, backend=name, precision=precision if name == 'torch' else 'fp32')))
    if exported and 'openvino' in installed_backends():
        for file_precision, path in reduced_variants(source).items():
            name = f'openvino {file_precision}'
            if file_precision == 'bf16' and not cpu_has_bf16():
                choice.failed[name] = 'this CPU has no bf16 units (avx512_bf16, AMX)'
                continue
            candidates.append(_Candidate(name, path, replace(settings, backend='openvino',
                                                             precision='fp32')))
    return candidates


def choose_backend(source: str | os.PathLike | None, settings: EngineSettings, *,
                   config: ModelConfig | None = None, labels: Sequence[str] | None = None,
                   seed: int = 0, frame_shape: tuple[int, int, int] = (480, 640, 3),
                   timed_frames: int = 8, rounds: int = 4,
                   on_worker: Callable[[Callable[[], Any]], Any] = _here,
                   timing_on: Callable[[Callable[[], Any]], Any] | None = None,
                   choices: dict[tuple, BackendChoice] | None = None
                   ) -> tuple[EngineBase, BackendChoice]:
    """
    Build every installed backend, time it, check it; return the fastest that agrees.

    Beside an exported file, its accepted reduced-precision variants (``model.int8.xml``,
    ``model.bf16.xml``) are candidates too: their accuracy gate was passed at export, on
    labelled frames, so they are not held to fp32 parity here. Each candidate is timed with
    its calls ``settings.auto_rate_hz`` apart, as frames reach the node.

    ``on_worker(task)`` runs the timing rounds (not the builds) and, for torch, CUDA-graph
    captures: the node runs them in its inference worker's thread, between batches, so
    nothing classifies beside them (compiled torch measured 21 ms beside a running ONNX
    Runtime, 12 ms alone) and each backend is timed in the thread it will run in.
    ``timing_on`` runs the rounds elsewhere: the node times them in the builder thread while
    an engine serves, so a reload never stops inference (the interleaved rounds put that
    engine's load on every candidate alike).

    ``choices`` records each choice under ``choice_key``: the same files with the same
    settings are not timed again, only the chosen candidate is built.
    """
    choice = BackendChoice(chosen='', rate_hz=settings.auto_rate_hz)
    candidates = _candidates(source, config, settings, choice)
    key = choice_key(source, config, settings) if choices is not None else None
    earlier = choices.get(key) if key is not None else None
    chosen_before = next((candidate for candidate in candidates
                          if earlier is not None and candidate.name == earlier.chosen), None)
    if chosen_before is not None:
        engine = create_engine(chosen_before.source, chosen_before.settings, config=config,
                               labels=labels, seed=seed, on_worker=on_worker)
        engine.backend_choice = replace(earlier, reused=True)
        _LOG.info(engine.backend_choice.summary())
        return engine, engine.backend_choice
    frames = camera_frames(timed_frames, frame_shape[0], frame_shape[1], seed=7)
    reference = None
    if not (source and is_exported(source)):
        with create_engine(source, replace(settings, backend='torch', precision='fp32',
                                           compile_trunk=False, static_buffers=False),
                           config=config, labels=labels, seed=seed) as torch_fp32:
            reference = [r.probabilities for r in torch_fp32.infer(frames[:2])]
    engines: dict[str, EngineBase] = {}
    # Whatever fails from here on (a build, a timing or agreement call, no agreement), the
    # engines built so far are closed: each holds a model and a runtime's threads.
    try:
        for candidate in candidates:
            try:
                engine = create_engine(candidate.source, candidate.settings, config=config,
                                       labels=labels, seed=seed, on_worker=on_worker)
            except Exception as error:  # a backend that cannot load is reported, not fatal
                choice.failed[candidate.name] = str(error)
                continue
            engines[candidate.name] = engine
            if getattr(engine, 'acceptance', None):
                choice.acceptance[candidate.name] = engine.acceptance
            engine.infer(frames[:1])  # the first call of a new frame shape
            if reference is not None:
                got = [r.probabilities for r in engine.infer(frames[:2])]
                choice.max_abs_diff[candidate.name] = max(float(np.abs(a - b).max())
                                                          for a, b in zip(got, reference))
        period = 1.0 / settings.auto_rate_hz if settings.auto_rate_hz else 0.0
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
                    time.sleep(max(period, 0.05))
                    engine.infer(frames[round_index % len(frames):][:1])
                    elapsed = 0.0
                    for frame in frames[round_index % len(frames):][:3]:
                        time.sleep(max(period - elapsed, 0.0))
                        started = time.perf_counter()
                        engine.infer([frame])
                        elapsed = time.perf_counter() - started
                        times[name].append(elapsed)
            return times

        for name, samples in (timing_on or on_worker)(time_rounds).items():
            choice.ms_per_frame[name] = float(np.median(samples)) * 1e3
        tolerance = PARITY_FP32 if _torch_precision(settings) == 'fp32' else 3e-2
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
    if key is not None:
        choices[key] = choice
    _LOG.info(choice.summary())
    return chosen, choice


def choice_key(source: str | os.PathLike | None, config: ModelConfig | None,
               settings: EngineSettings) -> tuple:
    """
    Return what ``auto``'s choice depends on, as a dictionary key.

    The model files as they are on disk (path, size and modification time of the file and of
    the reduced-precision files beside it: a re-export is timed again), the settings that
    change timings, and the backends installed in this process.
    """
    if source:
        files = [Path(source), *reduced_variants(source).values()]
        model: Any = tuple((str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns)
                           for path in files)
    else:
        model = repr(sorted(config.to_dict().items()))
    return (model, settings.device, settings.precision, settings.compile_trunk,
            settings.auto_rate_hz, tuple(installed_backends()))
