"""
The ``cnn_rnn_perception`` command: demo and benchmark tools around the core.

Every subcommand explains itself with ``--help``; user mistakes end in one line on stderr and
exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence


def _size(text: str) -> tuple[int, int]:
    """Parse 'AxB' into (A, B)."""
    try:
        first, second = (int(part) for part in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a size like 224x224; got {text!r}') from None
    return first, second


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(',') if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected numbers like 1,8,32; got {text!r}') from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f'expected positive numbers; got {text!r}')
    return values


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('engine')
    group.add_argument('--device', default='auto',
                       help='auto (GPU if there is one), cpu, cuda or cuda:N (default: auto)')
    group.add_argument('--precision', default='auto', choices=('auto', 'fp32', 'fp16', 'bf16'),
                       help='trunk precision; auto is bf16 on GPUs that have it, fp32 on the '
                            'CPU (default: auto)')
    group.add_argument('--threads', type=int, default=0,
                       help='CPU threads for torch (default: 0, torch decides)')


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('model (used without --checkpoint)')
    group.add_argument('--backbone', default='resnet18',
                       help='resnet18, resnet34, resnet50, mobilenet_v3_small, '
                            'mobilenet_v3_large, efficientnet_b0 or vgg16 (default: resnet18)')
    group.add_argument('--sequence', default='spatial', choices=('spatial', 'rows', 'columns'),
                       help='how the feature map becomes a sequence (default: spatial)')
    group.add_argument('--strip', type=int, default=1,
                       help='feature-map rows or columns per timestep (default: 1)')
    group.add_argument('--rnn', default='lstm', choices=('lstm', 'gru'))
    group.add_argument('--hidden-size', type=int, default=256)
    group.add_argument('--bidirectional', action='store_true')
    group.add_argument('--pooling', default='last', choices=('last', 'mean', 'max', 'attention'))
    group.add_argument('--input-size', type=_size, default=(224, 224), metavar='HxW',
                       help='model input height x width (default: 224x224)')


def _model_config(args: argparse.Namespace, num_classes: int):
    from cnn_rnn_perception.model import ModelConfig
    return ModelConfig(num_classes=num_classes, backbone=args.backbone, sequence=args.sequence,
                       strip=args.strip, rnn=args.rnn, hidden_size=args.hidden_size,
                       bidirectional=args.bidirectional, pooling=args.pooling,
                       input_size=args.input_size)


def _demo(args: argparse.Namespace) -> int:
    from cnn_rnn_perception.engine import EngineSettings, InferenceEngine
    from cnn_rnn_perception.synthetic import camera_frames, NAVIGATION_LABELS
    import numpy as np

    settings = EngineSettings(device=args.device, precision=args.precision,
                              compile_trunk=args.compile, threads=args.threads)
    if args.checkpoint:
        engine = InferenceEngine.from_checkpoint(args.checkpoint, settings)
        source = args.checkpoint
    else:
        config = _model_config(args, len(NAVIGATION_LABELS))
        engine = InferenceEngine.from_config(config, labels=NAVIGATION_LABELS,
                                             settings=settings)
        source = 'random weights: labels mean nothing until you load a trained checkpoint'
    width, height = args.frame_size
    print(f'model: {engine.describe()} ({source})')
    print(f'classifying {args.frames} generated {width}x{height} camera frames, one at a time')
    latencies = []
    for index, frame in enumerate(camera_frames(args.frames, height, width)):
        result = engine.infer([frame], color_order='bgr', top_k=3)[0]
        times = result.times
        latencies.append(times.total_ms)
        others = ', '.join(f'{label} {score:.2f}' for label, score in result.top_k[1:])
        print(f'frame {index}: {result.label:<14} {result.score:.2f}  ({others})  '
              f'preprocess {times.preprocess_ms:.1f} ms, forward {times.forward_ms:.1f} ms, '
              f'postprocess {times.postprocess_ms:.2f} ms')
    print(f'latency per frame: p50 {np.percentile(latencies, 50):.1f} ms, '
          f'p95 {np.percentile(latencies, 95):.1f} ms over {len(latencies)} frames')
    engine.close()
    return 0


def _bench(args: argparse.Namespace) -> int:
    from cnn_rnn_perception.bench import format_table, run_benchmark
    from cnn_rnn_perception.engine import EngineSettings
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = EngineSettings(device=args.device, precision=args.precision,
                              compile_trunk=not args.no_compile,
                              cuda_graphs=not args.no_cuda_graphs, threads=args.threads,
                              max_batch=max(args.batch_sizes))
    width, height = args.frame_size
    report = run_benchmark(_model_config(args, args.num_classes), settings=settings,
                           frame_size=(height, width), batch_sizes=args.batch_sizes,
                           iterations=args.iterations, progress=not args.no_progress)
    print(format_table(report))
    if args.json:
        with open(args.json, 'w') as out:
            json.dump(report, out, indent=2)
        print(f'wrote {args.json}')
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog='cnn_rnn_perception',
        description='CNN-RNN scene classification for ROS 2 robots: tools around the model. '
                    'The ROS node itself is the perception_node command.')
    parser.add_argument('--log-level', default='WARNING',
                        choices=('DEBUG', 'INFO', 'WARNING', 'ERROR'))
    commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

    demo = commands.add_parser(
        'demo', help='classify a few generated camera frames and print labels and timings',
        description='Build a model (or load --checkpoint), classify generated camera frames '
                    'one at a time, and print each label with the time each stage took.')
    demo.add_argument('--checkpoint', help='a checkpoint written by this package')
    demo.add_argument('--frames', type=int, default=8, help='how many frames (default: 8)')
    demo.add_argument('--frame-size', type=_size, default=(640, 480), metavar='WxH',
                      help='camera frame width x height (default: 640x480)')
    demo.add_argument('--compile', action='store_true',
                      help='torch.compile the trunk: faster frames, slower start')
    _add_engine_options(demo)
    _add_model_options(demo)
    demo.set_defaults(handler=_demo)

    bench = commands.add_parser(
        'bench', help="time the engine against the seed's way of running the model",
        description="Run the seed's way (OpenCV preprocessing, fp32 eager, batch 1) and the "
                    'engine on the same weights and frames in one process; print latency '
                    'p50/p95, throughput, peak memory and the ratio to the seed.')
    bench.add_argument('--batch-sizes', type=_int_list, default=[1], metavar='N[,N...]',
                       help='engine batch sizes to measure (default: 1)')
    bench.add_argument('--frame-size', type=_size, default=(640, 480), metavar='WxH',
                       help='uint8 camera frame width x height (default: 640x480)')
    bench.add_argument('--iterations', type=int, default=50,
                       help='timed calls per row (default: 50)')
    bench.add_argument('--num-classes', type=int, default=10)
    bench.add_argument('--no-compile', action='store_true', help='run the trunk eagerly')
    bench.add_argument('--no-cuda-graphs', action='store_true',
                       help='launch kernels one by one on a GPU')
    bench.add_argument('--json', metavar='PATH', help='also write the report as JSON')
    bench.add_argument('--no-progress', action='store_true', help='no progress bars')
    _add_engine_options(bench)
    _add_model_options(bench)
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; user errors print one line and return 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format='%(levelname)s %(name)s: %(message)s')
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f'cnn_rnn_perception {args.command}: error: {error}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == '__main__':
    sys.exit(main())
