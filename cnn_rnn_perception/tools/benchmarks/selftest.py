"""
selftest: every path the engine has on a device, on the same frames, against one reference.

What a robot owner runs after installing, to trust their GPU (or CPU) setup. The reference is
the same weights in float32, eager, without static buffers, on the same device. Each path
(eager, compiled, static buffers or CUDA graphs, a temporal model's state carried beside
another camera's, and on a CPU each installed runtime: onnxruntime, openvino, on the same
model exported) classifies the same
frames, mixed resolutions and colour orders and a uniform batch, at every batch size asked for;
its largest absolute probability difference from the reference must stay within its
precision's tolerance. A path that raises fails too, with its error.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
import tempfile
import threading
import time
from typing import Sequence

from cnn_rnn_perception.core.engine import (
    EngineSettings, installed_backends, model_parts, open_exported, precision_name, resolve_device,
    resolve_precision, TorchEngine)
from cnn_rnn_perception.core.engine.export_format import export_onnx
from cnn_rnn_perception.core.model import CnnRnnClassifier
from cnn_rnn_perception.core.model_config import Preprocessing
from cnn_rnn_perception.core.sample_frames import camera_frame, selftest_frames
from cnn_rnn_perception.ros.engine_slot import EngineSlot, LoadedModel
from cnn_rnn_perception.tools import options
from cnn_rnn_perception.tools.report import (
    gpu_peak_mb, machine_description, PeakRss, render_table, reset_gpu_peak, write_json)
import numpy as np
from tqdm import tqdm

# Largest absolute difference of any class probability from the float32 eager reference.
# fp32 differs only by summation order (compiled kernels, batched GEMMs). The reduced-precision
# bounds come from the trunk's rounding (bf16 keeps 8 bits of mantissa, fp16 11); the RNN and
# head run in float32 either way.
TOLERANCE = {'fp32': 1e-4, 'fp16': 1e-2, 'bf16': 3e-2}


@dataclass
class PathResult:
    """One path's agreement with the reference, its speed and memory."""

    path: str
    precision: str
    batch_sizes: list[int]
    max_abs_diff: float | None
    tolerance: float
    ms_per_frame: float | None
    peak_memory_mb: float | None
    memory_kind: str
    passed: bool
    error: str = ''


def _paths(settings: EngineSettings, on_cuda: bool, compile_trunk: bool, temporal: bool
           ) -> list[tuple[str, EngineSettings]]:
    eager = replace(settings, compile_trunk=False, static_buffers=False, cuda_graphs=False)
    paths = [('eager', eager)]
    if compile_trunk:
        paths.append(('compiled', replace(eager, compile_trunk=True)))
    static = replace(eager, compile_trunk=compile_trunk, static_buffers=True,
                     cuda_graphs=on_cuda)
    paths.append(('cuda graphs' if on_cuda else 'static buffers', static))
    paths.append((BESIDE_PATH, static))
    if temporal:
        paths.append((TEMPORAL_PATH, static))
        paths.append((CROWDED_PATH, replace(static, max_streams=2)))
    return paths


TEMPORAL_PATH = 'temporal state'
# Built (buffers warmed, graphs captured) while another engine of the same device serves, as
# the node builds its next engine: the capture runs in the serving thread, between batches.
BESIDE_PATH = 'built beside a serving engine'
# Three cameras in every call, two state rows: no two may ever share a row.
CROWDED_PATH = 'temporal, 3 cameras on 2 state rows'


class _ServingBeside:
    """Another engine classifying in a thread of its own, as the node's inference worker."""

    def __init__(self, model: CnnRnnClassifier, labels: Sequence[str],
                 preprocessing: Preprocessing, settings: EngineSettings,
                 frame: np.ndarray) -> None:
        serving = TorchEngine(model, labels=labels, preprocessing=preprocessing,
                              settings=replace(settings, static_buffers=False,
                                               cuda_graphs=False, compile_trunk=False))
        ready = threading.Event()
        self.slot = EngineSlot(lambda values, compiled: LoadedModel(serving, list(labels)),
                               on_ready=lambda model: ready.set())
        self.slot.build({}, compiled=False)
        if not ready.wait(60):
            raise RuntimeError('the serving engine did not start')
        self.batches = 0
        self._frame = frame
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name='serving', daemon=True)

    def _serve(self) -> None:
        self.slot.worker_serves = True
        try:
            while not self._stop.is_set():
                self.slot.serve_tasks()
                with self.slot.borrow() as model:
                    model.engine.infer([self._frame])
                self.batches += 1
        finally:
            self.slot.worker_serves = False
            self.slot.serve_tasks()

    def __enter__(self) -> _ServingBeside:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.slot.release()


def run_selftest(model: CnnRnnClassifier, *, labels: Sequence[str],
                 preprocessing: Preprocessing, device: str = 'auto', precision: str = 'auto',
                 batch_sizes: Sequence[int] = tuple(range(1, 9)), compile_trunk: bool = True,
                 repeats: int = 3, progress: bool = True) -> dict:
    """Run every path; return a report with ``passed`` and one entry per path."""
    torch_device = resolve_device(device)
    dtype_name = precision_name(resolve_precision(precision, torch_device))
    largest = max(batch_sizes)
    frames, orders = selftest_frames(max(largest, 6))
    # A uniform batch too: one upload and one resize for all its frames on a GPU.
    uniform = [camera_frame(480, 640, seed=200 + i) for i in range(largest)]
    base = EngineSettings(device=device, precision=dtype_name, max_batch=largest,
                          warmup_iterations=1)

    reference_settings = replace(base, precision='fp32', compile_trunk=False,
                                 static_buffers=False, cuda_graphs=False)
    with TorchEngine(model, labels=labels, preprocessing=preprocessing,
                     settings=reference_settings) as reference:
        want = {id(frame): reference.infer([frame], color_order=order)[0].probabilities
                for frame, order in zip(frames + uniform, orders + ['bgr'] * len(uniform))}
        # A temporal model: one stream on its own, each frame from the state the last left.
        reference.reset_streams()
        carried_want = [reference.infer([frame], color_order=order, streams=['camera'],
                                        stamps=[0.1 * index])[0].probabilities
                        for index, (frame, order) in enumerate(zip(frames, orders))]

    results = []
    temporal = bool(model.config.temporal)
    paths = _paths(base, torch_device.type == 'cuda', compile_trunk, temporal)
    runtimes = [name for name in installed_backends() if name != 'torch' and not temporal
                and torch_device.type == 'cpu']  # the runtimes' GPU providers are optional
    with tempfile.TemporaryDirectory() as folder:
        if runtimes:
            exported = export_onnx(model, list(labels), preprocessing, f'{folder}/model.onnx')
        paths += [(name, replace(base, precision='fp32', backend=name)) for name in runtimes]
        for name, settings in tqdm(paths, desc='selftest', unit='path', disable=not progress):
            results.append(_check_path(name, settings, model, labels, preprocessing, frames,
                                       orders, uniform, want, carried_want, batch_sizes,
                                       repeats, torch_device,
                                       exported if settings.backend != 'torch' else None))
    return {'passed': all(result.passed for result in results), 'device': str(torch_device),
            'precision': dtype_name, 'model': f'{model.config.backbone} '
            f'{model.config.sequence} {model.config.rnn} {model.config.input_size}',
            'batch_sizes': list(batch_sizes), 'machine': machine_description(torch_device),
            'paths': [asdict(result) for result in results]}


def _check_path(name: str, settings: EngineSettings, model: CnnRnnClassifier,
                labels: Sequence[str], preprocessing: Preprocessing, frames: list[np.ndarray],
                orders: list[str], uniform: list[np.ndarray], want: dict,
                carried_want: list[np.ndarray], batch_sizes: Sequence[int], repeats: int,
                device, exported: Path | None = None) -> PathResult:
    tolerance = TOLERANCE[settings.precision]
    memory_kind = 'gpu allocated' if device.type == 'cuda' else 'process rss'
    reset_gpu_peak(device)
    seconds, count, worst = 0.0, 0, 0.0
    try:
        beside = (_ServingBeside(model, labels, preprocessing, settings, uniform[0])
                  if name == BESIDE_PATH else contextlib.nullcontext())
        with PeakRss() as rss, beside as serving, (
                open_exported(exported, settings) if exported is not None else
                TorchEngine(model, labels=labels, preprocessing=preprocessing,
                            settings=settings,
                            **({'on_worker': serving.slot.on_worker} if serving else {}))
        ) as engine:
            if name == CROWDED_PATH:
                # Every frame starts afresh (three cameras take turns on two rows); what
                # matters is that none reads another camera's row.
                started = time.perf_counter()
                got, expected = [], []
                for index, (frame, order) in enumerate(zip(frames, orders)):
                    got += engine.infer([frame] * 3, color_order=[order] * 3,
                                        streams=['a', 'b', 'c'], stamps=[0.1 * index] * 3)
                    expected += [want[id(frame)]] * 3
                seconds, count = time.perf_counter() - started, len(got)
                worst = max(float(np.abs(result.probabilities - reference).max())
                            for result, reference in zip(got, expected))
            elif name == TEMPORAL_PATH:
                # The same stream batched beside another camera: it must not notice.
                started = time.perf_counter()
                got = [engine.infer([frame, uniform[0]], color_order=[order, 'bgr'],
                                    streams=['camera', 'other'],
                                    stamps=[0.1 * index, 0.1 * index])[0]
                       for index, (frame, order) in enumerate(zip(frames, orders))]
                seconds, count = time.perf_counter() - started, 2 * len(frames)
                worst = max(float(np.abs(result.probabilities - expected).max())
                            for result, expected in zip(got, carried_want))
            else:
                engine.warmup(batch_sizes=list(batch_sizes))
                for size in batch_sizes:
                    for batch, batch_orders in ((frames[:size], orders[:size]),
                                                (uniform[:size], ['bgr'] * size)):
                        for _ in range(repeats):
                            started = time.perf_counter()
                            got = engine.infer(batch, color_order=batch_orders)
                            seconds += time.perf_counter() - started
                            count += size
                        worst = max(worst, max(
                            float(np.abs(result.probabilities - want[id(frame)]).max())
                            for result, frame in zip(got, batch)))
        peak = gpu_peak_mb(device) if device.type == 'cuda' else rss.peak_bytes / 2**20
        return PathResult(name, settings.precision, list(batch_sizes), worst, tolerance,
                          seconds * 1e3 / max(count, 1), peak, memory_kind,
                          passed=worst <= tolerance)
    except Exception as error:  # a path that cannot run fails the selftest, with the reason
        return PathResult(name, settings.precision, list(batch_sizes), None, tolerance, None,
                          None, memory_kind, passed=False,
                          error=f'{type(error).__name__}: {error}')


def format_report(report: dict) -> str:
    """Render the report as a table and a verdict line."""
    rows = []
    for path in report['paths']:
        difference = ('-' if path['max_abs_diff'] is None
                      else f'{path["max_abs_diff"]:.2e}')
        rows.append((path['path'], path['precision'], difference, f'{path["tolerance"]:.0e}',
                     '-' if path['ms_per_frame'] is None else f'{path["ms_per_frame"]:.2f}',
                     '-' if path['peak_memory_mb'] is None else f'{path["peak_memory_mb"]:.0f}',
                     'ok' if path['passed'] else 'FAIL ' + path['error']))
    memory = report['paths'][0]['memory_kind'] if report['paths'] else 'memory'
    machine = report['machine']
    lines = [f'selftest on {report["device"]} ({machine.get("gpu") or machine["cpu"]}), '
             f'torch {machine["torch"]}, {report["model"]}, batch sizes '
             f'{report["batch_sizes"]}; reference: the same weights in fp32, eager', '']
    lines += render_table(('path', 'precision', 'max |p - reference|', 'tolerance', 'ms/frame',
                           f'peak MB ({memory})', 'result'), rows)
    lines += ['', 'PASSED: every path agrees with the reference' if report['passed']
              else 'FAILED: see the rows marked FAIL']
    return '\n'.join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the selftest command's flags."""
    parser.description = (
        'Run the engine through every path it has on the device (eager, compiled, static '
        'buffers or CUDA graphs, carried recurrent state) on the same frames (mixed '
        'resolutions, channel counts and colour orders, and a uniform batch) at every batch '
        'size, compare each to the same weights in fp32 eager, and print path, largest '
        'probability difference, time per frame and peak memory. Exits 1 when a path '
        'disagrees beyond its tolerance (fp32 1e-4, fp16 1e-2, bf16 3e-2) or fails. Run it '
        'after installing, to trust a GPU.')
    options.add(parser, '--checkpoint', help='test this model (default: the model flags, '
                                             'seeded random weights)')
    options.add(parser, '--batch-sizes', default=list(range(1, 9)),
                help='batch sizes to check (default: 1 to 8)')
    options.add(parser, '--num-classes', default=6)
    options.add(parser, '--no-compile', help='skip torch.compile (faster on a CPU, where it '
                                             'takes seconds per batch size)')
    options.add(parser, '--json', help='also write the report as JSON ("passed" and one '
                                       'entry a path)')
    options.add(parser, '--no-progress')
    options.add_engine_arguments(parser)
    options.add_model_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """Run the selftest, print its table; exit 1 when a path fails."""
    config = None if args.checkpoint else options.model_config(args, args.num_classes)
    model, labels, preprocessing = model_parts(args.checkpoint, config)
    report = run_selftest(model, labels=labels, preprocessing=preprocessing, device=args.device,
                          precision=args.precision, batch_sizes=args.batch_sizes,
                          compile_trunk=not args.no_compile, progress=not args.no_progress)
    print(format_report(report))
    write_json(args.json, report)
    return 0 if report['passed'] else 1
