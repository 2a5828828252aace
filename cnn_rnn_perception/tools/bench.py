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
import tempfile
import time
from typing import Callable, Sequence

from cnn_rnn_perception.core.engine import EngineBase, EngineSettings, resolve_device, TorchEngine
from cnn_rnn_perception.core.model import (
    CnnRnnClassifier, default_labels, ModelConfig, Preprocessing, save_checkpoint, seeded)
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


def seed_style_classifier(model: CnnRnnClassifier, preprocessing: Preprocessing,
                          device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    """Return the seed's per-frame function: host preprocessing, fp32 eager, batch 1."""
    model = model.to(device).eval()
    mean = np.array(preprocessing.mean, np.float32)
    std = np.array(preprocessing.std, np.float32)
    height, width = preprocessing.input_size

    def classify(frame_bgr: np.ndarray) -> np.ndarray:
        resized = cv2.resize(frame_bgr, (width, height))
        rgb = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
        # Contiguous, as torchvision's ToTensor makes it: a transposed view would hand the
        # convolutions channels-last strides and make the baseline slower than it really is.
        chw = np.ascontiguousarray(((rgb - mean) / std).transpose(2, 0, 1))
        tensor = torch.from_numpy(chw).unsqueeze(0)
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


def run_backend_comparison(config: ModelConfig, *, settings: EngineSettings,
                           backends: Sequence[str], frame_size: tuple[int, int] = (480, 640),
                           batch_sizes: Sequence[int] = (1,), rounds: int = 10,
                           calls_per_round: int = 5, progress: bool = True,
                           seed: int = 0) -> dict[str, object]:
    """
    Time the seed's way and every backend in one interleaved run, with parity per row.

    Rounds alternate between the paths (``calls_per_round`` calls each), so a noisy neighbour
    or a clock change hits all of them alike instead of whichever ran last.
    """
    from cnn_rnn_perception.core.engine import create_engine

    with seeded(seed):
        model = CnnRnnClassifier(config, load_pretrained=False).eval()
    preprocessing = Preprocessing.for_config(config)
    labels = default_labels(config.num_classes)
    frames = camera_frames(max(max(batch_sizes), 8), *frame_size, seed=seed)
    device = resolve_device(settings.device)
    classify = seed_style_classifier(model, preprocessing, device)
    reference = [classify(frame) for frame in frames]
    rows: list[BenchRow] = []
    with PeakRss() as rss, tempfile.TemporaryDirectory() as folder:
        checkpoint = f'{folder}/model.pt'
        save_checkpoint(checkpoint, model, labels=labels, preprocessing=preprocessing)
        engines = {}
        for backend in backends:
            engines[backend] = create_engine(checkpoint, replace(
                settings, backend=backend, max_batch=max(batch_sizes)))
            engines[backend].warmup(frames[0].shape, list(batch_sizes))
        for size in batch_sizes:
            # (row name, one call at a frame offset, the engine or None for the seed's way)
            paths: list[tuple[str, Callable[[int], object], EngineBase | None]] = []
            if size == 1:
                paths.append(('seed style (fp32 eager, OpenCV)',
                              lambda offset: classify(frames[offset % len(frames)]), None))
            for backend, engine in engines.items():
                description = engine.describe()
                paths.append((description if description.startswith(backend)
                              else f'{backend} {description}',
                              lambda offset, engine=engine, size=size: engine.infer(
                                  [frames[(offset + i) % len(frames)] for i in range(size)]),
                              engine))
            times: list[list[float]] = [[] for _ in paths]
            for round_index in tqdm(range(rounds), desc=f'interleaved rounds, batch {size}',
                                    disable=not progress, leave=False):
                for samples, (_, call, _) in zip(times, paths):
                    for call_index in range(calls_per_round):
                        started = time.perf_counter()
                        call(round_index * calls_per_round + call_index)
                        samples.append(time.perf_counter() - started)
            for samples, (name, _, engine) in zip(times, paths):
                row = _row(name, size, np.array(samples) * 1e3, rss, None)
                got = ([classify(frame) for frame in frames[:size]] if engine is None else
                       [result.probabilities for result in engine.infer(frames[:size])])
                row.max_abs_diff = max(float(np.abs(probabilities - reference[index]).max())
                                       for index, probabilities in enumerate(got))
                rows.append(row)
        for engine in engines.values():
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


def format_table(report: dict[str, object]) -> str:
    """Render a report as the plain-text table the README quotes."""
    header = ('path', 'batch', 'p50 ms', 'p95 ms', 'frames/s', 'peak RSS MB',
              'peak GPU MB', 'vs seed', 'max |p - seed|')
    lines = []
    for row in report['rows']:
        gpu = '-' if row['peak_gpu_mb'] is None else f'{row["peak_gpu_mb"]:.0f}'
        parity = '-' if row.get('max_abs_diff') is None else f'{row["max_abs_diff"]:.1e}'
        lines.append((row['path'], str(row['batch_size']), f'{row["p50_ms"]:.2f}',
                      f'{row["p95_ms"]:.2f}', f'{row["frames_per_s"]:.1f}',
                      f'{row["peak_rss_mb"]:.0f}', gpu, f'{row["speedup"]:.2f}x', parity))
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
               + (" Rounds interleave the paths; peak RSS is the whole run's."
                  if report.get('interleaved') else ''))
    return '\n'.join(render + ['', caption])


def _backends(text: str) -> list[str]:
    names = [name for name in text.split(',') if name]
    unknown = sorted(set(names) - {'torch', 'onnxruntime', 'openvino'})
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f'expected backends from torch,onnxruntime,openvino; got {text!r}')
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
                             "seed's way in one interleaved run, with parity per row")
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
            progress=not args.no_progress)
    else:
        report = run_benchmark(config, settings=settings, frame_size=(height, width),
                               batch_sizes=args.batch_sizes, iterations=args.iterations,
                               progress=not args.no_progress)
    print(format_table(report))
    write_json(args.json, report)
    return 0
