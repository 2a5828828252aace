"""
The ``cnn_rnn_perception`` command: demo and benchmark tools around the core.

Every subcommand explains itself with ``--help``; user mistakes end in one line on stderr and
exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f'expected 0 (torch decides) or a thread count; '
                                         f'got {text!r}')
    return value


def _write_json(path: str | None, report: dict) -> None:
    if path:
        with open(path, 'w') as out:
            json.dump(report, out, indent=2)
        print(f'wrote {path}')


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('engine')
    group.add_argument('--device', default='auto',
                       help='auto (GPU if there is one), cpu, cuda or cuda:N (default: auto)')
    group.add_argument('--precision', default='auto', choices=('auto', 'fp32', 'fp16', 'bf16'),
                       help='trunk precision; auto is bf16 on GPUs that have it, fp32 on the '
                            'CPU (default: auto)')
    group.add_argument('--threads', type=_threads, default=0,
                       help='CPU threads for torch (default: 0, torch decides)')
    group.add_argument('--backend', default='torch',
                       choices=('torch', 'onnxruntime', 'openvino', 'auto'),
                       help='what runs the model: torch, an exported model on onnxruntime or '
                            'openvino (exported on the fly from a checkpoint), or auto: time '
                            'each installed one here and keep the fastest that agrees '
                            '(default: torch)')


def _add_model_options(parser: argparse.ArgumentParser, *, title: str = 'model (used without '
                       '--checkpoint)', defaults: bool = True) -> None:
    """Add the ModelConfig flags; without defaults, unset flags stay None (YAML decides)."""
    group = parser.add_argument_group(title)

    def default(value):
        return value if defaults else None
    group.add_argument('--backbone', default=default('resnet18'),
                       help='resnet18, resnet34, resnet50, mobilenet_v3_small, '
                            'mobilenet_v3_large, efficientnet_b0 or vgg16 (default: resnet18)')
    group.add_argument('--sequence', default=default('spatial'),
                       choices=('spatial', 'rows', 'columns'),
                       help='how the feature map becomes a sequence (default: spatial)')
    group.add_argument('--strip', type=int, default=default(1),
                       help='feature-map rows or columns per timestep (default: 1)')
    group.add_argument('--rnn', default=default('lstm'), choices=('lstm', 'gru'))
    group.add_argument('--hidden-size', type=int, default=default(256))
    group.add_argument('--num-layers', type=int, default=default(1))
    group.add_argument('--bidirectional', action='store_true', default=default(False))
    group.add_argument('--dropout', type=float, default=default(0.0))
    group.add_argument('--pooling', default=default('last'),
                       choices=('last', 'mean', 'max', 'attention'))
    group.add_argument('--input-size', type=_size, default=default((224, 224)), metavar='HxW',
                       help='model input height x width (default: 224x224)')
    group.add_argument('--temporal', default=default(''), choices=('', 'gru', 'lstm'),
                       help='a recurrent stage across frames, its state carried per camera: '
                            'gru or lstm; empty (default) classifies each frame alone')
    group.add_argument('--temporal-hidden-size', type=int, default=default(128),
                       help='state size of the temporal stage (default: 128)')


def _model_config(args: argparse.Namespace, num_classes: int):
    from cnn_rnn_perception.model import ModelConfig
    return ModelConfig(num_classes=num_classes, **_model_flags(args))


MODEL_FLAGS = ('backbone', 'sequence', 'strip', 'rnn', 'hidden_size', 'num_layers',
               'bidirectional', 'dropout', 'pooling', 'input_size', 'temporal',
               'temporal_hidden_size')


def _model_flags(args: argparse.Namespace) -> dict:
    """Return the model flags that were given (all of them where they have defaults)."""
    return {name: getattr(args, name) for name in MODEL_FLAGS
            if getattr(args, name, None) is not None}


def _classify(args: argparse.Namespace) -> int:
    from cnn_rnn_perception.engine import create_engine, EngineSettings
    from cnn_rnn_perception.synthetic import camera_frames, NAVIGATION_LABELS
    import numpy as np

    settings = EngineSettings(device=args.device, precision=args.precision,
                              compile_trunk=args.compile, backend=args.backend)
    config = None if args.checkpoint else _model_config(args, len(NAVIGATION_LABELS))
    engine = create_engine(args.checkpoint, settings, config=config, labels=NAVIGATION_LABELS)
    source = args.checkpoint or ('random weights: labels mean nothing until you load a '
                                 'trained checkpoint')
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
    from cnn_rnn_perception.bench import format_table, run_backend_comparison, run_benchmark
    from cnn_rnn_perception.engine import EngineSettings
    settings = EngineSettings(device=args.device, precision=args.precision,
                              compile_trunk=not args.no_compile,
                              cuda_graphs=not args.no_cuda_graphs,
                              max_batch=max(args.batch_sizes), backend=args.backend)
    width, height = args.frame_size
    if args.backends:
        report = run_backend_comparison(
            _model_config(args, args.num_classes), settings=settings, backends=args.backends,
            frame_size=(height, width), batch_sizes=args.batch_sizes,
            rounds=max(args.iterations // 5, 1), progress=not args.no_progress)
    else:
        report = run_benchmark(_model_config(args, args.num_classes), settings=settings,
                               frame_size=(height, width), batch_sizes=args.batch_sizes,
                               iterations=args.iterations, progress=not args.no_progress)
    print(format_table(report))
    _write_json(args.json, report)
    return 0


def _selftest(args: argparse.Namespace) -> int:
    from cnn_rnn_perception.selftest import format_report, model_for_selftest, run_selftest

    model, labels, preprocessing = model_for_selftest(args.checkpoint,
                                                      _model_config(args, args.num_classes))
    report = run_selftest(model, labels=labels, preprocessing=preprocessing, device=args.device,
                          precision=args.precision, batch_sizes=args.batch_sizes,
                          compile_trunk=not args.no_compile, progress=not args.no_progress)
    print(format_report(report))
    _write_json(args.json, report)
    return 0 if report['passed'] else 1


def _export(args: argparse.Namespace) -> int:
    from cnn_rnn_perception.export import export
    from cnn_rnn_perception.model import load_checkpoint

    checkpoint = load_checkpoint(args.checkpoint)
    print(f'exporting {args.checkpoint} ({checkpoint.config.backbone} '
          f'{checkpoint.config.sequence} {checkpoint.config.rnn}) to {args.format}')
    report = export(checkpoint.model, checkpoint.labels, checkpoint.preprocessing,
                    fmt=args.format, output=args.output)
    print(f'wrote {report.path} ({report.size_mb:.1f} MB): labels, config and preprocessing '
          f'in its metadata, batch size dynamic')
    print(f'parity on {report.frames} generated frames: max |p - torch fp32| = '
          f'{report.max_abs_diff:.2e} (limit 1e-04)')
    return 0


def _backends(text: str) -> list[str]:
    names = [name for name in text.split(',') if name]
    unknown = sorted(set(names) - {'torch', 'onnxruntime', 'openvino'})
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f'expected backends from torch,onnxruntime,openvino; got {text!r}')
    return names


def _float_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(',') if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected numbers like 15,30; got {text!r}') from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f'expected positive numbers; got {text!r}')
    return values


def _bench_node(args: argparse.Namespace) -> int:
    from cnn_rnn_perception.node_bench import format_node_table, run_node_benchmark

    height, width = args.input_size
    node_args = ['-p', f'device:={args.device}', '-p', f'precision:={args.precision}',
                 '-p', f'backend:={args.backend}',
                 '-p', f'compile:={"false" if args.no_compile else "true"}',
                 '-p', f'model.backbone:={args.backbone}',
                 '-p', f'model.sequence:={args.sequence}',
                 '-p', f'model.strip:={args.strip}', '-p', f'model.rnn:={args.rnn}',
                 '-p', f'model.hidden_size:={args.hidden_size}',
                 '-p', f'model.bidirectional:={str(args.bidirectional).lower()}',
                 '-p', f'model.pooling:={args.pooling}',
                 '-p', f'model.input_size:=[{height},{width}]']
    if args.checkpoint:
        node_args += ['-p', f'model.checkpoint:={args.checkpoint}']
    frame_width, frame_height = args.frame_size
    report = run_node_benchmark(cameras=args.cameras, rates_hz=args.rates,
                                duration_s=args.duration, warmup_s=args.warmup,
                                frame_size=(frame_height, frame_width), node_args=node_args,
                                progress=not args.no_progress)
    print(format_node_table(report))
    _write_json(args.json, report)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from cnn_rnn_perception.evaluate import (
        evaluate_bags, format_scores, plot_confusion, PredictionWriter, score_scene_recording)

    if args.scenes:
        if len(args.bags) != 1:
            raise ValueError('--scenes scores one replay recording against one bag')
        from cnn_rnn_perception.replay import parse_remaps
        result = score_scene_recording(args.scenes, args.bags[0], label_topic=args.label_topic,
                                       labels_csv=args.labels_csv,
                                       remap=parse_remaps(args.remap))
    else:
        if not args.checkpoint:
            raise ValueError('evaluate needs --checkpoint (a trained model), or --scenes to '
                             'score a replay recording')
        from cnn_rnn_perception.engine import create_engine, EngineSettings
        settings = EngineSettings(device=args.device, precision=args.precision,
                                  compile_trunk=args.compile, max_batch=args.batch_size,
                                  backend=args.backend, reset_after_s=args.reset_after_s)
        engine = create_engine(args.checkpoint, settings)
        result = evaluate_bags(args.bags, engine, topics=args.topics,
                               label_topic=args.label_topic, labels_csv=args.labels_csv,
                               batch_size=args.batch_size, predictions_path=args.output,
                               smoothing=args.smoothing, progress=not args.no_progress)
        engine.close()
    if args.scenes and args.output:
        writer = PredictionWriter(args.output)
        for prediction in result['predictions']:
            writer.write(prediction)
        writer.close()
    summary = result['summary']
    print(f'{summary["frames"]} frames from {len(summary["bags"])} bag(s)'
          + (f', {summary["bad_frames"]} bad frames skipped' if summary.get('bad_frames') else '')
          + (f', {summary["frames_per_s"]:.1f} frames/s ({summary["throughput_vs_engine"]:.0%} '
             "of the engine's own throughput)" if summary.get('throughput_vs_engine') else ''))
    for topic, reason in summary.get('bad_frame_reasons', {}).items():
        print(f'  {topic}: {summary["bad_frames_by_topic"][topic]} bad, last: {reason}')
    if summary['accuracy'] is not None:
        print(format_scores(summary))
        if args.confusion_png:
            plot_confusion(summary, args.confusion_png)
            print(f'wrote {args.confusion_png}')
    elif args.label_topic or args.labels_csv:
        print('no frame had a label at or before it: nothing scored')
    if args.output:
        print(f'wrote {args.output}')
    _write_json(args.summary, summary)
    if args.min_accuracy is not None:
        if summary['accuracy'] is None:
            raise ValueError('--min-accuracy needs ground truth: --label-topic or --labels-csv')
        if summary['accuracy'] < args.min_accuracy:
            print(f'FAIL: accuracy {summary["accuracy"]:.4f} is below --min-accuracy '
                  f'{args.min_accuracy}', file=sys.stderr)
            return 1
    return 0


def _replay(args: argparse.Namespace) -> int:
    from cnn_rnn_perception.replay import parse_remaps, replay_bag

    record = replay_bag(args.bag, topics=args.topics, label_topic=args.label_topic,
                        rate=0.0 if args.as_fast_as_possible else args.rate, loop=args.loop,
                        remap=parse_remaps(args.remap), reliable=args.qos == 'reliable',
                        scene_topic=args.scene_topic if (args.lockstep or args.record)
                        else None, lockstep=args.lockstep, record_path=args.record,
                        wait_subscribers_s=args.wait, progress=not args.no_progress)
    published = ', '.join(f'{topic} {count}' for topic, count in record['published'].items())
    print(f'published {published}')
    if args.record:
        print(f'recorded {record["scenes"]} scene messages to {args.record}')
    if record['lockstep_timeouts']:
        print(f'{record["lockstep_timeouts"]} frames got no scene result in time')
    return 0


TRAIN_FLAGS = ('epochs', 'batch_size', 'optimizer', 'lr', 'weight_decay', 'schedule', 'seed',
               'workers', 'val_split', 'augment', 'hflip', 'freeze_trunk', 'device',
               'clip_length', 'steadiness', 'val_block_s', 'reset_after_s', 'init_from')


def _train_settings(args: argparse.Namespace):
    """Build TrainSettings from --config YAML, then the flags given on top of it."""
    import dataclasses

    from cnn_rnn_perception.model import ModelConfig
    from cnn_rnn_perception.train import TrainSettings
    import yaml

    values: dict = {}
    if args.config:
        with open(args.config) as handle:
            values = yaml.safe_load(handle) or {}
        known = {f.name for f in dataclasses.fields(TrainSettings)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f'{args.config}: unknown keys {unknown}; known: {sorted(known)}')
    model = {**values.pop('model', {}), **_model_flags(args)}
    if args.trunk_weights:
        model['trunk_weights'] = args.trunk_weights
    values.update({name: getattr(args, name) for name in TRAIN_FLAGS
                   if getattr(args, name) is not None})
    return TrainSettings(model=ModelConfig(**{'num_classes': 1, **model}), **values)


def _train(args: argparse.Namespace) -> int:
    from cnn_rnn_perception.train import bag_runs, bag_samples, image_folder_samples, train

    settings = _train_settings(args)
    progress = not args.no_progress
    if settings.model.temporal and not args.bags:
        raise ValueError('--temporal trains on clips of recorded drives: give --bags with '
                         '--label-topic')
    if args.bags:
        if not args.label_topic:
            raise ValueError('training from bags needs --label-topic')
        if settings.model.temporal:
            classes, split, skipped = bag_runs(args.bags, args.label_topic, settings,
                                               progress=progress)
            train_set, val_set = split.train, split.val
            counts = (sum(map(len, train_set)), sum(map(len, val_set)))
            print(f'{counts[0]} training and {counts[1]} validation frames in '
                  f'{len(train_set)} and {len(val_set)} runs, clips of {settings.clip_length}')
        else:
            classes, train_set, val_set, skipped, how = bag_samples(
                args.bags, args.label_topic, settings, progress=progress)
            split = None
            counts = (len(train_set.items), len(val_set.items))
            print(f'{counts[0]} training and {counts[1]} validation frames')
        print(split.description if split else how)
    elif args.data:
        classes, train_set, val_set, skipped = image_folder_samples(
            args.data, settings.val_split, settings.seed)
        print(f'{len(train_set.items)} training and {len(val_set.items)} validation images')
    else:
        raise ValueError('give an image folder (DATA) or --bags with --label-topic')
    if skipped:
        print(f'skipped {len(skipped)} unreadable images or frames, e.g. {skipped[0]}')
    print(f'classes: {", ".join(classes)}')
    result = train(settings, classes=classes, train_samples=train_set, val_samples=val_set,
                   output=args.output, resume=args.resume, progress=not args.no_progress)
    if os.environ.get('RANK', '0') == '0':  # under torchrun, the process that saved them
        print(f'best validation accuracy {result["best_val_accuracy"]:.4f}; checkpoints, '
              f'metrics.csv and curves.png in {result["output"]}')
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.held_out is not None and args.held_out < 1:
        raise ValueError(f'--held-out must be at least 1; got {args.held_out}')
    if args.temporal:
        from cnn_rnn_perception.temporal_demo import run_temporal_demo
        return run_temporal_demo(args.cache or '.cache/demo-temporal', device=args.device,
                                 retrain=args.retrain, held_out=args.held_out)
    from cnn_rnn_perception.demo import run_demo
    return run_demo(args.cache or '.cache/demo', device=args.device, retrain=args.retrain)


def _synth(args: argparse.Namespace) -> int:
    from cnn_rnn_perception.synth import (
        write_ego_motion_drive, write_image_folder, write_recording)

    width, height = args.size
    progress = not args.no_progress
    if args.drive != 'ego-motion':
        root = write_image_folder(f'{args.output}/images', train_per_class=args.train_per_class,
                                  val_per_class=args.val_per_class, seed=args.seed,
                                  height=height, width=width, progress=progress)
        print(f'wrote {root}/train and {root}/val')
    for index in range(args.recordings):
        seed = args.seed + 7919 * (index + 1)
        output = f'{args.output}/recording_{index}'
        if args.drive == 'ego-motion':
            path = write_ego_motion_drive(output, seconds=args.seconds, rate_hz=args.rate,
                                          seed=seed, height=height, width=width,
                                          storage=args.storage, progress=progress)
        else:
            path = write_recording(output, scenes=args.scenes, rate_hz=args.rate, seed=seed,
                                   seconds_per_scene=args.seconds_per_scene, height=height,
                                   width=width, storage=args.storage,
                                   occluders=args.drive == 'occluded', progress=progress)
        print(f'wrote {path}')
    return 0


def _bench_order(args: argparse.Namespace) -> int:
    from cnn_rnn_perception.bench import render_table
    from cnn_rnn_perception.proof import run_digit_benchmark
    rows = run_digit_benchmark(train_pairs=args.train_pairs, test_pairs=args.test_pairs,
                               epochs=args.epochs, seed=args.seed)
    names = {'gap': 'global average pooling', 'columns': 'columns + bidirectional LSTM',
             'shuffled': 'columns shuffled per sample (control)'}
    print('\n'.join(render_table(
        ('head', 'train accuracy', 'test accuracy', 'seconds'),
        [(names[r.head], f'{r.train_accuracy:.3f}', f'{r.test_accuracy:.3f}',
          f'{r.seconds:.0f}') for r in rows])))
    print(f'\ntwo handwritten digits side by side, label: is the left one larger; '
          f'{args.train_pairs} training pairs, {args.test_pairs} test pairs of unseen '
          'handwriting; chance is 0.5')
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
        'demo', help='the whole product: train on synthetic scenes, run the node, replay a bag',
        description='Draw synthetic navigation scenes, train a model on them (both cached), '
                    'start perception_node as its own process, replay a held-out recording '
                    'into it while printing its results, and end with the accuracy against '
                    "the recording's labels, the latency and the frame accounting. Exit code "
                    '1 when accuracy is below 90%. --temporal instead compares per-frame and '
                    'temporal models on drives where time matters (ego-motion, figures '
                    'crossing the view): accuracy and flicker side by side; exit code 1 when '
                    'a target is missed.')
    demo.add_argument('--temporal', action='store_true',
                      help='the temporal demo (cache default: .cache/demo-temporal)')
    demo.add_argument('--cache', help='where data, model and logs are kept (default: '
                                      '.cache/demo)')
    demo.add_argument('--retrain', action='store_true', help='train again, ignoring the cache')
    demo.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    demo.add_argument('--held-out', type=int, metavar='N',
                      help='with --temporal: held-out drives per task (default: 2 ego-motion, '
                           '5 scene drives); more give steadier figures and take longer')
    demo.set_defaults(handler=_demo)

    classify = commands.add_parser(
        'classify', help='classify a few generated camera frames and print labels and timings',
        description='Build a model (or load --checkpoint), classify generated camera frames '
                    'one at a time, and print each label with the time each stage took.')
    classify.add_argument('--checkpoint', help='a checkpoint written by this package')
    classify.add_argument('--frames', type=int, default=8, help='how many frames (default: 8)')
    classify.add_argument('--frame-size', type=_size, default=(640, 480), metavar='WxH',
                          help='camera frame width x height (default: 640x480)')
    classify.add_argument('--compile', action='store_true',
                          help='torch.compile the trunk: faster frames, slower start')
    _add_engine_options(classify)
    _add_model_options(classify)
    classify.set_defaults(handler=_classify)

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
    bench.add_argument('--backends', type=_backends, metavar='NAME[,NAME...]',
                       help='put these backends (torch, onnxruntime, openvino) beside the '
                            "seed's way in one interleaved run, with parity per row")
    bench.add_argument('--json', metavar='PATH', help='also write the report as JSON')
    bench.add_argument('--no-progress', action='store_true', help='no progress bars')
    _add_engine_options(bench)
    _add_model_options(bench)
    bench.set_defaults(handler=_bench)

    export = commands.add_parser(
        'export', help='export a checkpoint to ONNX or OpenVINO IR for deployment runtimes',
        description='Export the whole model (trunk, sequencer, RNN, pooling, head, softmax) with '
                    'a dynamic batch axis; the labels, model config and preprocessing go into '
                    "the file's metadata, so the file alone runs it (model.checkpoint of the "
                    'node, with backend onnxruntime, openvino or auto). The export is checked '
                    'on generated frames against the fp32 torch model and removed if any '
                    'probability differs by more than 1e-4.')
    export.add_argument('checkpoint', metavar='CHECKPOINT')
    export.add_argument('--format', required=True, choices=('onnx', 'openvino'),
                        help='onnx (ONNX Runtime, TensorRT) or openvino (IR: .xml and .bin)')
    export.add_argument('--output', required=True, metavar='PATH',
                        help='model.onnx, or model.xml for openvino')
    export.set_defaults(handler=_export)

    selftest = commands.add_parser(
        'selftest', help='check every engine path on this device against an fp32 reference',
        description='Run the engine through every path it has on the device (eager, compiled, '
                    'static buffers or CUDA graphs, carried recurrent state) on the same frames '
                    '(mixed resolutions, channel counts and colour orders, and a uniform batch) '
                    'at every batch size, compare each to the same weights in fp32 eager, and '
                    'print path, largest probability difference, time per frame and peak '
                    'memory. Exits 1 when a path disagrees beyond its tolerance (fp32 1e-4, '
                    'fp16 1e-2, bf16 3e-2) or fails. Run it after installing, to trust a GPU.')
    selftest.add_argument('--checkpoint', help='test this model (default: the model flags, '
                                               'seeded random weights)')
    selftest.add_argument('--batch-sizes', type=_int_list, default=list(range(1, 9)),
                          metavar='N[,N...]', help='batch sizes to check (default: 1 to 8)')
    selftest.add_argument('--num-classes', type=int, default=6)
    selftest.add_argument('--no-compile', action='store_true',
                          help='skip torch.compile (faster on a CPU, where it takes seconds '
                               'per batch size)')
    selftest.add_argument('--json', metavar='PATH',
                          help='also write the report as JSON ("passed" and one entry a path)')
    selftest.add_argument('--no-progress', action='store_true', help='no progress bar')
    _add_engine_options(selftest)
    _add_model_options(selftest)
    selftest.set_defaults(handler=_selftest)

    bench_node = commands.add_parser(
        'bench-node', help='end-to-end latency of the running node (camera to ~/scene)',
        description='Start perception_node as its own process, publish camera frames stamped '
                    'at send time, and time each ~/scene result: end-to-end p50/p95/p99 next '
                    "to the engine's own time for the same frames, latency drift over the run "
                    "and the node's memory. DDS stays on loopback.")
    bench_node.add_argument('--cameras', type=_int_list, default=[1, 4], metavar='N[,N...]',
                            help='camera counts to measure (default: 1,4)')
    bench_node.add_argument('--rates', type=_float_list, default=[15.0, 30.0],
                            metavar='HZ[,HZ...]', help='frame rates per camera (default: 15,30)')
    bench_node.add_argument('--duration', type=float, default=20.0,
                            help='measured seconds per (cameras, rate) (default: 20)')
    bench_node.add_argument('--warmup', type=float, default=3.0,
                            help='unmeasured seconds first (default: 3)')
    bench_node.add_argument('--frame-size', type=_size, default=(640, 480), metavar='WxH',
                            help='rgb8 frame width x height (default: 640x480)')
    bench_node.add_argument('--checkpoint', help='a checkpoint for the node to load')
    bench_node.add_argument('--no-compile', action='store_true', help='run the trunk eagerly')
    bench_node.add_argument('--json', metavar='PATH', help='also write the report as JSON')
    bench_node.add_argument('--no-progress', action='store_true', help='no progress bars')
    _add_engine_options(bench_node)
    _add_model_options(bench_node)
    bench_node.set_defaults(handler=_bench_node)

    evaluate = commands.add_parser(
        'evaluate', help='classify every frame of recorded bags and score against labels',
        description='Run a checkpoint over every image of one or more bags (rosbag2 '
                    'directories, .db3 or .mcap files, ROS 1 .bag), write per-frame '
                    'predictions, and with ground truth report accuracy, per-class '
                    'precision/recall, flicker (label changes per minute against the ground '
                    "truth's own) and a confusion matrix. Each topic of each bag is one "
                    'stream in stamp order: a temporal model carries and resets its state as '
                    'in the node. --min-accuracy makes the exit code fail below a threshold, '
                    'for CI.')
    evaluate.add_argument('bags', nargs='+', metavar='BAG')
    evaluate.add_argument('--checkpoint', help='the model to evaluate')
    evaluate.add_argument('--topics', nargs='+', metavar='TOPIC',
                          help='image topics (default: every Image and CompressedImage topic)')
    evaluate.add_argument('--label-topic', help='std_msgs/String ground-truth topic; a frame '
                          'takes the latest label recorded at or before it')
    evaluate.add_argument('--labels-csv', help='sidecar CSV of stamp,label rows (stamps in '
                          'seconds, matched to frame header stamps)')
    evaluate.add_argument('--batch-size', type=int, default=16)
    evaluate.add_argument('--output', metavar='FILE.csv|FILE.jsonl',
                          help='write per-frame predictions')
    evaluate.add_argument('--summary', metavar='FILE.json', help='write the summary as JSON')
    evaluate.add_argument('--confusion-png', metavar='FILE.png',
                          help='draw the confusion matrix')
    evaluate.add_argument('--min-accuracy', type=float,
                          help='exit with code 1 when accuracy is below this')
    evaluate.add_argument('--scenes', metavar='FILE.jsonl', help="score a replay run's "
                          'recorded ~/scene output instead of running a model')
    evaluate.add_argument('--remap', nargs='+', default=[], metavar='FROM:=TO',
                          help='with --scenes: the remaps the replay was given, so scenes on '
                               'a remapped topic find their frames in the bag')
    evaluate.add_argument('--smoothing', type=float, default=0.0,
                          help="average each stream's probabilities over time with this "
                               "weight, as the node's smoothing parameter does (default: 0)")
    evaluate.add_argument('--reset-after-s', type=float, default=1.0,
                          help='temporal models: a stream whose frames are further apart than '
                               'this starts afresh, as temporal.reset_after_s in the node '
                               '(default: 1.0)')
    evaluate.add_argument('--compile', action='store_true', help='torch.compile the trunk')
    evaluate.add_argument('--no-progress', action='store_true', help='no progress bar')
    _add_engine_options(evaluate)
    evaluate.set_defaults(handler=_evaluate)

    replay = commands.add_parser(
        'replay', help="publish a bag's image and label topics into ROS (like ros2 bag play)",
        description="Publish a rosbag2's image topics (and label topic) with their recorded "
                    'header stamps: at the recorded rate, scaled, as fast as possible, or in '
                    "lockstep with the node. --record saves the node's ~/scene output for "
                    '"evaluate --scenes".')
    replay.add_argument('bag', metavar='BAG')
    replay.add_argument('--topics', nargs='+', metavar='TOPIC',
                        help='image topics (default: every image topic)')
    replay.add_argument('--label-topic', help='also publish this std_msgs/String topic')
    replay.add_argument('--rate', type=float, default=1.0,
                        help='speed relative to the recording (default: 1.0)')
    replay.add_argument('--as-fast-as-possible', action='store_true',
                        help='no pauses between messages')
    replay.add_argument('--lockstep', action='store_true',
                        help="wait for each frame's ~/scene result before the next frame")
    replay.add_argument('--loop', action='store_true', help='start again at the end')
    replay.add_argument('--remap', nargs='+', default=[], metavar='FROM:=TO',
                        help='publish a bag topic under another name')
    replay.add_argument('--qos', choices=('best_effort', 'reliable'), default='best_effort',
                        help='publisher reliability (default: best_effort, like a camera)')
    replay.add_argument('--scene-topic', default='/cnn_rnn_perception/scene',
                        help="the node's scene topic, for --lockstep and --record")
    replay.add_argument('--record', metavar='FILE.jsonl', help='record ~/scene to JSONL')
    replay.add_argument('--wait', type=float, default=30.0,
                        help='seconds to wait for subscribers (default: 30)')
    replay.add_argument('--no-progress', action='store_true', help='no progress bar')
    replay.set_defaults(handler=_replay)

    trainer = commands.add_parser(
        'train', help='train a scene model from an image folder or labelled bags',
        description='Train on DATA (DATA/train/CLASS/*.png and DATA/val/CLASS/*.png, or '
                    'DATA/CLASS/*.png split by --val-split) or on --bags with a --label-topic. '
                    'Writes best.pt and last.pt (checkpoints the node loads), metrics.csv and '
                    'curves.png to --output. Several processes: torchrun --nproc_per_node N '
                    '$(which cnn_rnn_perception) train ...')
    trainer.add_argument('data', nargs='?', help='an ImageFolder-style directory')
    trainer.add_argument('--bags', nargs='+', metavar='BAG', help='train on recorded bags')
    trainer.add_argument('--label-topic', help='std_msgs/String label topic of --bags')
    trainer.add_argument('--config', metavar='FILE.yaml', help='settings file; flags override')
    trainer.add_argument('--output', default='runs/train', help='(default: runs/train)')
    trainer.add_argument('--resume', action='store_true', help='continue from OUTPUT/last.pt')
    trainer.add_argument('--epochs', type=int)
    trainer.add_argument('--batch-size', type=int, help='global batch size (default: 32)')
    trainer.add_argument('--optimizer', choices=('adamw', 'sgd'))
    trainer.add_argument('--lr', type=float, help='learning rate (default: 1e-3)')
    trainer.add_argument('--weight-decay', type=float)
    trainer.add_argument('--schedule', choices=('cosine', 'step', 'constant'))
    trainer.add_argument('--seed', type=int)
    trainer.add_argument('--workers', type=int, help='DataLoader workers (default: 2)')
    trainer.add_argument('--val-split', type=float,
                         help='validation fraction without a val/ folder (default: 0.2)')
    trainer.add_argument('--no-augment', dest='augment', action='store_const', const=False,
                         help='no colour jitter, blur, crops or tilts')
    trainer.add_argument('--hflip', action='store_const', const=True,
                         help='also flip horizontally: only for labels that do not name a '
                              'side (refused for left/right labels)')
    trainer.add_argument('--freeze-trunk', action='store_const', const=True,
                         help='train only the recurrent part and head')
    trainer.add_argument('--trunk-weights', help='local torchvision weights file for the trunk')
    trainer.add_argument('--init-from', metavar='CHECKPOINT',
                         help='start from this checkpoint where names and shapes match, e.g. '
                              'a temporal model from a per-frame model of the same trunk')
    trainer.add_argument('--device', help='auto, cpu, cuda or cuda:N (default: auto)')
    trainer.add_argument('--no-progress', action='store_true', help='no progress bars')
    bags = trainer.add_argument_group('bags and temporal models')
    bags.add_argument('--clip-length', type=int,
                      help='with --temporal: consecutive frames per clip; each lane carries '
                           'its state from clip to clip and back-propagates this far '
                           '(default: 16). --batch-size then counts clips')
    bags.add_argument('--steadiness', type=float,
                      help='with --temporal: weight of a penalty on label probabilities '
                           'changing between neighbouring frames whose true label is the '
                           'same; against brief flips while a scene stays (default: 0)')
    bags.add_argument('--val-block-s', type=float,
                      help='bags are validated on held-out time blocks this long, never on '
                           'random frames (default: 10)')
    bags.add_argument('--reset-after-s', type=float,
                      help='a stamp gap longer than this ends a run, as it resets the state '
                           'of a temporal model in the node (default: 1.0)')
    _add_model_options(trainer, title='model (flags override --config)', defaults=False)
    trainer.set_defaults(handler=_train)

    synth = commands.add_parser(
        'synth', help='draw synthetic navigation scenes as images and bags',
        description='Write OUTPUT/images/{train,val}/CLASS/*.png and OUTPUT/recording_N '
                    '(rosbag2: /camera/image_raw, /camera/camera_info and /scene_label) for '
                    'the classes corridor, open_space, doorway_left, doorway_right, junction '
                    'and blocked. Deterministic by --seed.')
    synth.add_argument('output')
    synth.add_argument('--train-per-class', type=int, default=200)
    synth.add_argument('--val-per-class', type=int, default=40)
    synth.add_argument('--recordings', type=int, default=1)
    synth.add_argument('--drive', choices=('scenes', 'occluded', 'ego-motion'), default='scenes',
                       help='what the recordings show: scenes (default); occluded: scenes '
                            'with figures crossing close to the camera, the label unchanged; '
                            'ego-motion: a floor seen while moving, labelled forward, '
                            'turning_left, turning_right or stopped, which no single frame '
                            'tells (recordings only)')
    synth.add_argument('--scenes', type=int, default=12, help='scenes per recording')
    synth.add_argument('--seconds-per-scene', type=float, default=2.0)
    synth.add_argument('--seconds', type=float, default=60.0,
                       help='length of each ego-motion recording (default: 60)')
    synth.add_argument('--rate', type=float, default=15.0, help='recording frame rate (Hz)')
    synth.add_argument('--size', type=_size, default=(320, 240), metavar='WxH')
    synth.add_argument('--storage', choices=('sqlite3', 'mcap'), default='sqlite3')
    synth.add_argument('--seed', type=int, default=0)
    synth.add_argument('--no-progress', action='store_true')
    synth.set_defaults(handler=_synth)

    order = commands.add_parser(
        'bench-order', help='show that the recurrent head sees order where pooling cannot',
        description="Two handwritten digits (scikit-learn's bundled 8x8 digits) side by side; "
                    'the label is whether the left one is larger. The same trunk is trained '
                    'with global average pooling, with the columns sequence and a '
                    'bidirectional LSTM, and with the columns shuffled per sample.')
    order.add_argument('--train-pairs', type=int, default=3000)
    order.add_argument('--test-pairs', type=int, default=1000)
    order.add_argument('--epochs', type=int, default=6)
    order.add_argument('--seed', type=int, default=0)
    order.add_argument('--threads', type=_threads, default=0,
                       help='CPU threads for torch (default: 0, torch decides)')
    order.set_defaults(handler=_bench_order)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; user errors print one line and return 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format='%(levelname)s %(name)s: %(message)s')
    if getattr(args, 'threads', 0):
        # The command owns its process, so it may set torch's thread count; the library never
        # does, since that changes what every other computation in a process returns.
        import torch
        torch.set_num_threads(args.threads)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f'cnn_rnn_perception {args.command}: error: {error}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == '__main__':
    sys.exit(main())
