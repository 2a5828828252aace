"""
Benchmark: the seed's way of running the model against the engine, in one process and run.

The seed's way is the tutorial's: OpenCV resize and colour conversion, numpy normalisation,
a float32 eager model, one frame at a time, probabilities copied back to the host. The engine
runs the same weights on the same frames. Every row times a whole frame-in,
probabilities-out call.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, replace
import os
import tempfile
import time
from typing import Callable, Sequence

from cnn_rnn_perception.core.checkpoint import default_labels, save_checkpoint, seeded
from cnn_rnn_perception.core.engine import EngineBase, EngineSettings, resolve_device, TorchEngine
from cnn_rnn_perception.core.engine.exported import ExportedEngine
from cnn_rnn_perception.core.model import CnnRnnClassifier
from cnn_rnn_perception.core.model_config import ModelConfig, Preprocessing
from cnn_rnn_perception.core.preprocess import frames_to_array_cpu
from cnn_rnn_perception.core.sample_frames import camera_frames
from cnn_rnn_perception.tools import options
from cnn_rnn_perception.tools.report import (
    gpu_peak_mb, machine_description, PeakRss, render_table, reset_gpu_peak, write_json)
import cv2
import numpy as np
import torch
from tqdm import tqdm


@dataclass
class BenchRow:
    """One measured configuration."""

    path: str
    batch_size: int
    p50_ms: float
    p95_ms: float
    frames_per_s: float
    peak_rss_mb: float
    peak_gpu_mb: float | None
    speedup: float = 1.0
    max_abs_diff: float | None = None  # probabilities against the seed's way (fp32 eager)
    precision: str = 'fp32'
    vs_plain: float | None = None  # the runtime called plainly, p50 over this row's p50


def seed_style_classifier(model: CnnRnnClassifier, preprocessing: Preprocessing,
                          device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    """Return the seed's per-frame function: host preprocessing, fp32 eager, batch 1."""
    model = model.to(device).eval()
    preprocess = seed_style_preprocess(preprocessing)

    def classify(frame_bgr: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(preprocess(frame_bgr))
        with torch.no_grad():
            logits = model(tensor.to(device))
        return torch.softmax(logits, dim=1).cpu().numpy()[0]

    return classify


def _time_calls(call: Callable[[], object], iterations: int, description: str,
                progress: bool) -> np.ndarray:
    times = []
    for _ in tqdm(range(iterations), desc=description, leave=False, disable=not progress):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return np.array(times) * 1e3


def _row(path: str, batch_size: int, times_ms: np.ndarray, rss: PeakRss,
         gpu_peak: float | None) -> BenchRow:
    return BenchRow(path=path, batch_size=batch_size,
                    p50_ms=float(np.percentile(times_ms, 50)),
                    p95_ms=float(np.percentile(times_ms, 95)),
                    frames_per_s=batch_size * 1e3 / float(np.mean(times_ms)),
                    peak_rss_mb=rss.peak_bytes / 2**20, peak_gpu_mb=gpu_peak)


def run_benchmark(config: ModelConfig, *, settings: EngineSettings,
                  frame_size: tuple[int, int] = (480, 640), batch_sizes: Sequence[int] = (1,),
                  iterations: int = 50, warmup: int = 5, progress: bool = True,
                  seed: int = 0) -> dict[str, object]:
    """Measure seed style and engine on the same weights and frames; return a report dict."""
    with seeded(seed):
        model = CnnRnnClassifier(config, load_pretrained=False).eval()
    preprocessing = Preprocessing.for_config(config)
    labels = default_labels(config.num_classes)
    frames = camera_frames(max(max(batch_sizes), 8), *frame_size, seed=seed)
    rows: list[BenchRow] = []

    device = resolve_device(settings.device)
    settings = replace(settings, device=str(device))
    reset_gpu_peak(device)
    with PeakRss() as rss:
        classify = seed_style_classifier(model, preprocessing, device)
        for frame in frames[:warmup]:
            classify(frame)
        cycle = iter(range(10**9))
        seed_times = _time_calls(lambda: classify(frames[next(cycle) % len(frames)]),
                                 iterations, 'seed style, batch 1', progress)
    rows.append(_row('seed style (fp32 eager, OpenCV)', 1, seed_times, rss,
                     gpu_peak_mb(device)))
    model.cpu()

    reset_gpu_peak(device)
    with PeakRss() as rss:
        engine = TorchEngine(model, labels=labels, preprocessing=preprocessing,
                             settings=settings)
        path_name = f'engine ({engine.describe().split(" on ", 1)[1]})'
        for batch_size in batch_sizes:
            engine.warmup(frames[0].shape, [batch_size])
            cycle = iter(range(10**9))

            def call(size=batch_size):
                offset = next(cycle) % len(frames)
                engine.infer([frames[(offset + i) % len(frames)] for i in range(size)])
            times = _time_calls(call, iterations, f'engine, batch {batch_size}', progress)
            rows.append(_row(path_name, batch_size, times, rss, gpu_peak_mb(device)))
        description = engine.describe()
        engine.close()
    seed_row = rows[0]
    for row in rows[1:]:
        row.speedup = (seed_row.p50_ms / row.p50_ms if row.batch_size == 1
                       else row.frames_per_s / seed_row.frames_per_s)
    return {'machine': machine_description(device), 'engine': description,
            'model': config.to_dict(), 'frame_size': list(frame_size),
            'iterations': iterations, 'rows': [asdict(row) for row in rows]}


def seed_style_preprocess(preprocessing: Preprocessing) -> Callable[[np.ndarray], np.ndarray]:
    """Return the seed's host preprocessing: uint8 BGR frame to float32 [1, 3, H, W]."""
    mean = np.array(preprocessing.mean, np.float32)
    std = np.array(preprocessing.std, np.float32)
    height, width = preprocessing.input_size

    def preprocess(frame_bgr: np.ndarray) -> np.ndarray:
        resized = cv2.resize(frame_bgr, (width, height))
        rgb = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
        # Contiguous, as torchvision's ToTensor makes it: a transposed view would hand the
        # convolutions channels-last strides and make the baseline slower than it really is.
        return np.ascontiguousarray(((rgb - mean) / std).transpose(2, 0, 1))[None]

    return preprocess


def plain_runtime(engine: ExportedEngine) -> Callable[[np.ndarray], np.ndarray]:
    """
    Return the engine's file run the way its runtime's own documentation runs it.

    The same file, the same runtime settings (OpenVINO's precision hint, latency mode); the
    input is the seed's preprocessing of the same frames. What the engine adds shows as the
    difference.
    """
    if engine.backend == 'onnxruntime':
        import onnxruntime
        session = onnxruntime.InferenceSession(engine.path, providers=['CPUExecutionProvider'])
        name = session.get_inputs()[0].name
        return lambda images: session.run(None, {name: images})[0]
    import openvino
    from cnn_rnn_perception.core.engine.openvino_backend import compile_properties
    request = openvino.Core().compile_model(
        engine.path, 'CPU', compile_properties(engine.precision)).create_infer_request()

    def run(images: np.ndarray) -> np.ndarray:
        request.infer({0: images})
        return request.get_output_tensor(0).data.copy()

    return run


def _exported_engines(model: CnnRnnClassifier, labels: list[str], preprocessing: Preprocessing,
                      backend: str, precisions: Sequence[str], folder: str,
                      settings: EngineSettings, frames: list[np.ndarray]
                      ) -> dict[str, ExportedEngine]:
    """Export the model for ``backend`` (and its reduced-precision variants) and open each."""
    from cnn_rnn_perception.core.engine import open_exported
    from cnn_rnn_perception.core.engine.export_format import (
        export_onnx, export_openvino, write_openvino_variant)
    if backend == 'onnxruntime':
        paths = {'fp32': export_onnx(model, labels, preprocessing, f'{folder}/model.onnx')}
    else:
        fp32 = export_openvino(model, labels, preprocessing, f'{folder}/model.xml')
        paths = {'fp32': fp32}
        # Calibrated on the benchmark's own frames: this measures speed, not accuracy (export
        # gates accuracy on the user's labelled bags).
        calibration = [frames_to_array_cpu([frame], ['bgr'], preprocessing) for frame in frames]
        for precision in precisions:
            if precision != 'fp32':
                paths[precision] = write_openvino_variant(fp32, precision, calibration)
    return {precision: open_exported(path, settings) for precision, path in paths.items()
            if precision in precisions}


def run_backend_comparison(config: ModelConfig, *, settings: EngineSettings,
                           backends: Sequence[str], frame_size: tuple[int, int] = (480, 640),
                           batch_sizes: Sequence[int] = (1,), rounds: int = 10,
                           calls_per_round: int = 5, precisions: Sequence[str] = ('fp32',),
                           progress: bool = True, seed: int = 0) -> dict[str, object]:
    """
    Time the seed's way, every backend and each runtime called plainly, in one interleaved run.

    Rounds alternate between the paths (``calls_per_round`` calls each), so a noisy neighbour
    or a clock change hits all of them alike instead of whichever ran last. Each exported
    backend's row has a plain twin: its runtime called directly on the same file, after the
    seed's preprocessing; ``vs_plain`` is the twin's p50 over the engine's. ``precisions``
    beyond fp32 (int8, bf16) are OpenVINO variants of the same export.
    """
    from cnn_rnn_perception.core.engine import create_engine

    with seeded(seed):
        model = CnnRnnClassifier(config, load_pretrained=False).eval()
    preprocessing = Preprocessing.for_config(config)
    labels = default_labels(config.num_classes)
    frames = camera_frames(max(max(batch_sizes), 8), *frame_size, seed=seed)
    device = resolve_device(settings.device)
    classify = seed_style_classifier(model, preprocessing, device)
    preprocess = seed_style_preprocess(preprocessing)
    reference = [classify(frame) for frame in frames]
    rows: list[BenchRow] = []
    settings = replace(settings, max_batch=max(batch_sizes))
    with PeakRss() as rss, tempfile.TemporaryDirectory() as folder:
        checkpoint = f'{folder}/model.pt'
        save_checkpoint(checkpoint, model, labels=labels, preprocessing=preprocessing)
        engines: list[tuple[str, EngineBase]] = []  # (precision, engine)
        for backend in backends:
            if backend == 'torch':
                engines.append(('fp32', create_engine(checkpoint, replace(settings,
                                                                          backend=backend))))
                continue
            os.makedirs(f'{folder}/{backend}')
            exported = _exported_engines(
                model, labels, preprocessing, backend,
                [p for p in precisions if backend == 'openvino' or p == 'fp32'],
                f'{folder}/{backend}', replace(settings, backend=backend), frames)
            engines += list(exported.items())
        for _, engine in engines:
            engine.warmup(frames[0].shape, list(batch_sizes))
        for size in batch_sizes:
            # (row name, precision, one call at a frame offset, what gives its probabilities)
            paths: list[tuple[str, str, Callable[[int], object],
                              Callable[[list[np.ndarray]], list[np.ndarray]]]] = []
            if size == 1:
                paths.append(('seed style (fp32 eager, OpenCV)', 'fp32',
                              lambda offset: classify(frames[offset % len(frames)]),
                              lambda batch: [classify(frame) for frame in batch]))

            def pick(offset: int, size: int = size) -> list[np.ndarray]:
                return [frames[(offset + i) % len(frames)] for i in range(size)]
            for precision, engine in engines:
                description = engine.describe()
                name = (description if description.startswith(engine_backend(engine))
                        else f'{engine_backend(engine)} {description}')
                paths.append((name, precision,
                              lambda offset, engine=engine: engine.infer(pick(offset)),
                              lambda batch, engine=engine: [
                                  r.probabilities for r in engine.infer(batch)]))
                if isinstance(engine, ExportedEngine):
                    run = plain_runtime(engine)

                    def plain(batch: list[np.ndarray], run=run) -> np.ndarray:
                        return run(np.concatenate([preprocess(frame) for frame in batch]))
                    paths.append((f'{engine.backend} {precision}, called plainly', precision,
                                  lambda offset, plain=plain: plain(pick(offset)),
                                  lambda batch, plain=plain: list(plain(batch))))
            times: list[list[float]] = [[] for _ in paths]
            for round_index in tqdm(range(rounds), desc=f'interleaved rounds, batch {size}',
                                    disable=not progress, leave=False):
                for samples, (_, _, call, _) in zip(times, paths):
                    # The previous path's thread pool (another runtime's, or another session's)
                    # spins on after its last call and slowed this block's first call by up to
                    # a third; a pause and an untimed call let every block start alike.
                    time.sleep(0.05)
                    call(round_index * calls_per_round)
                    for call_index in range(calls_per_round):
                        started = time.perf_counter()
                        call(round_index * calls_per_round + call_index)
                        samples.append(time.perf_counter() - started)
            size_rows = []
            for samples, (name, precision, _, probabilities) in zip(times, paths):
                row = _row(name, size, np.array(samples) * 1e3, rss, None)
                row.precision = precision
                row.max_abs_diff = max(float(np.abs(got - reference[index]).max())
                                       for index, got in enumerate(probabilities(frames[:size])))
                size_rows.append(row)
            for engine_row, plain_row in zip(size_rows, size_rows[1:]):
                if plain_row.path.endswith('called plainly') and not \
                        engine_row.path.endswith('called plainly'):
                    engine_row.vs_plain = plain_row.p50_ms / engine_row.p50_ms
            rows += size_rows
        for _, engine in engines:
            engine.close()
    seed_rows = [row for row in rows if row.path.startswith('seed')]
    for row in rows:
        if seed_rows and row.batch_size == 1:
            row.speedup = seed_rows[0].p50_ms / row.p50_ms
        elif seed_rows:
            row.speedup = row.frames_per_s / seed_rows[0].frames_per_s
    return {'machine': machine_description(device), 'engine': ', '.join(backends),
            'model': config.to_dict(), 'frame_size': list(frame_size),
            'iterations': rounds * calls_per_round, 'interleaved': True,
            'rows': [asdict(row) for row in rows]}


def engine_backend(engine: EngineBase) -> str:
    """Return the backend's name as the --backends flag spells it."""
    return getattr(engine, 'backend', '') or 'torch'


def best_against_plain(report: dict[str, object]) -> list[str]:
    """Per batch size and precision: the engine's fastest path against the fastest plain call."""
    lines = []
    rows = report['rows']
    for size in sorted({row['batch_size'] for row in rows}):
        for precision in dict.fromkeys(row.get('precision', 'fp32') for row in rows):
            same = [row for row in rows if row['batch_size'] == size
                    and row.get('precision', 'fp32') == precision
                    and not row['path'].startswith('seed')]
            plain = [row for row in same if row['path'].endswith('called plainly')]
            ours = [row for row in same if not row['path'].endswith('called plainly')]
            if plain and ours:
                best = min(ours, key=lambda row: row['p50_ms'])
                fastest = min(plain, key=lambda row: row['p50_ms'])
                ratio = fastest['p50_ms'] / best['p50_ms']
                lines.append(f'batch {size}, {precision}: the engine\'s best ({best["path"]}) '
                             f'{best["p50_ms"]:.2f} ms = {ratio:.2f}x the fastest plain runtime '
                             f'({fastest["path"]}, {fastest["p50_ms"]:.2f} ms)')
    return lines


def format_table(report: dict[str, object]) -> str:
    """Render a report as the plain-text table the README quotes."""
    header = ('path', 'batch', 'p50 ms', 'p95 ms', 'frames/s', 'peak RSS MB',
              'peak GPU MB', 'vs seed', 'vs plain', 'max |p - seed|')
    lines = []
    for row in report['rows']:
        gpu = '-' if row['peak_gpu_mb'] is None else f'{row["peak_gpu_mb"]:.0f}'
        parity = '-' if row.get('max_abs_diff') is None else f'{row["max_abs_diff"]:.1e}'
        lines.append((row['path'], str(row['batch_size']), f'{row["p50_ms"]:.2f}',
                      f'{row["p95_ms"]:.2f}', f'{row["frames_per_s"]:.1f}',
                      f'{row["peak_rss_mb"]:.0f}', gpu, f'{row["speedup"]:.2f}x',
                      '-' if row.get('vs_plain') is None else f'{row["vs_plain"]:.2f}x',
                      parity))
    render = render_table(header, lines)
    machine = report['machine']
    model = report['model']
    frame = report['frame_size']
    caption = (f'{model["backbone"]} {model["sequence"]}, input '
               f'{model["input_size"][0]}x{model["input_size"][1]}, uint8 frames '
               f'{frame[1]}x{frame[0]}, {report["iterations"]} calls per row; '
               f'{machine.get("gpu", machine["cpu"])}, {machine["cpu_cores"]} CPU cores, '
               f'torch {machine["torch"]}. "vs seed": p50 latency ratio at batch 1, '
               'throughput ratio at larger batches.'
               + (" Rounds interleave the paths; peak RSS is the whole run's. \"vs plain\": "
                  "the runtime called plainly on the same file, p50 over the row's p50."
                  if report.get('interleaved') else '')
               + (f' CPU flags: {machine["cpu_flags"]}.' if machine.get('cpu_flags') else ''))
    return '\n'.join(render + ['', *best_against_plain(report), caption])


def _backends(text: str) -> list[str]:
    names = [name for name in text.split(',') if name]
    unknown = sorted(set(names) - {'torch', 'onnxruntime', 'openvino'})
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f'expected backends from torch,onnxruntime,openvino; got {text!r}')
    return names


def _precisions(text: str) -> list[str]:
    names = [name for name in text.split(',') if name]
    unknown = sorted(set(names) - {'fp32', 'bf16', 'int8'})
    if not names or unknown:
        raise argparse.ArgumentTypeError(f'expected precisions from fp32,bf16,int8; got {text!r}')
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the bench command's flags."""
    parser.description = (
        "Run the seed's way (OpenCV preprocessing, fp32 eager, batch 1) and the engine on the "
        'same weights and frames in one process; print latency p50/p95, throughput, peak '
        'memory and the ratio to the seed.')
    options.add(parser, '--batch-sizes', help='engine batch sizes to measure (default: 1)')
    options.add(parser, '--frame-size', '--num-classes', '--no-compile', '--json',
                '--no-progress')
    parser.add_argument('--iterations', type=int, default=50,
                        help='timed calls per row (default: 50)')
    parser.add_argument('--no-cuda-graphs', action='store_true',
                        help='launch kernels one by one on a GPU')
    parser.add_argument('--backends', type=_backends, metavar='NAME[,NAME...]',
                        help='put these backends (torch, onnxruntime, openvino) beside the '
                             "seed's way in one interleaved run, with parity per row, and "
                             'each exported one beside its runtime called plainly on the same '
                             'file')
    parser.add_argument('--precisions', type=_precisions, default=['fp32'],
                        metavar='NAME[,NAME...]',
                        help='with --backends openvino: also time these variants (int8, '
                             'bf16) of the same export; int8 is calibrated on the generated '
                             'frames, so this measures speed, not accuracy (export gates '
                             'accuracy on your bags; default: fp32)')
    options.add_engine_arguments(parser)
    options.add_model_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """Run the benchmark and print its table."""
    settings = options.engine_settings(args, cuda_graphs=not args.no_cuda_graphs,
                                       max_batch=max(args.batch_sizes))
    width, height = args.frame_size
    config = options.model_config(args, args.num_classes)
    if args.backends:
        report = run_backend_comparison(
            config, settings=settings, backends=args.backends, frame_size=(height, width),
            batch_sizes=args.batch_sizes, rounds=max(args.iterations // 5, 1),
            precisions=args.precisions, progress=not args.no_progress)
    else:
        report = run_benchmark(config, settings=settings, frame_size=(height, width),
                               batch_sizes=args.batch_sizes, iterations=args.iterations,
                               progress=not args.no_progress)
    print(format_table(report))
    write_json(args.json, report)
    return 0
