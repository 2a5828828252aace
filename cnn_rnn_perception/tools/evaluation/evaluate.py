"""
Offline evaluation: the engine over every frame of one or more bags, scored against labels.

The command: its flags, and what it prints and writes. The run itself is
``evaluation.runner`` (bags through the engine, or a replay's recorded ``~/scene`` output, as
predictions); the scores are ``evaluation.metrics``; the tables and the plot ``report``.

Under ``torchrun`` the bags are shared out among the processes (whole bags: a bag's streams
and its robot decision stay in one process), and process 0 merges the predictions into the
one summary and predictions file a single process would write.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import sys
from typing import Any

from cnn_rnn_perception.core.engine import create_engine
from cnn_rnn_perception.core.navigation import decision_fields, DecisionSettings
from cnn_rnn_perception.tools import options
from cnn_rnn_perception.tools.distributed import Distributed
from cnn_rnn_perception.tools.evaluation.runner import (
    evaluate_bags, merge_results, PredictionWriter, score_scene_recording)
from cnn_rnn_perception.tools.report import format_scores, plot_confusion, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the evaluate command's flags."""
    parser.description = (
        'Run a checkpoint over every image of one or more bags (rosbag2 directories, .db3 or '
        '.mcap files, ROS 1 .bag), write per-frame predictions, and with ground truth report '
        'accuracy, per-class precision/recall, flicker (label changes per minute against the '
        "ground truth's own) and a confusion matrix. Each topic of each bag is one stream in "
        'stamp order: a temporal model carries and resets its state as in the node. '
        '--min-accuracy makes the exit code fail below a threshold, for CI. Many bags over '
        'several processes or machines: torchrun --nproc_per_node N $(which '
        'cnn_rnn_perception) evaluate ... shares the bags out and process 0 writes the one '
        'merged summary and predictions.')
    parser.add_argument('bags', nargs='+', metavar='BAG')
    options.add(parser, '--checkpoint', help='the model to evaluate')
    options.add(parser, '--topics', '--label-topic')
    parser.add_argument('--labels-csv', help='sidecar CSV of stamp,label rows (stamps in '
                        'seconds, matched to frame header stamps)')
    options.add(parser, '--batch-size', default=16, help='frames per batch (default: 16)')
    options.add(parser, '--output', metavar='FILE.csv|FILE.jsonl',
                help='write per-frame predictions')
    parser.add_argument('--summary', metavar='FILE.json', help='write the summary as JSON')
    parser.add_argument('--confusion-png', metavar='FILE.png',
                        help='draw the confusion matrix')
    parser.add_argument('--min-accuracy', type=float,
                        help='exit with code 1 when accuracy is below this')
    parser.add_argument('--scenes', metavar='FILE.jsonl', help="score a replay run's "
                        'recorded ~/scene output instead of running a model')
    options.add(parser, '--remap', help='with --scenes: the remaps the replay was given, so '
                                        'scenes on a remapped topic find their frames in the '
                                        'bag')
    parser.add_argument('--smoothing', type=float, default=0.0,
                        help="average each stream's probabilities over time with this "
                             "weight, as the node's smoothing parameter does (default: 0)")
    decision = parser.add_argument_group(
        "the robot's decision (the node's navigation.* parameters; tune them here on your "
        'bags, then set them on the robot)')
    for setting in decision_fields():
        meta = setting.metadata
        decision.add_argument(meta['flag'], dest=setting.name, type=float,
                              default=setting.default,
                              help=f'{meta["help"]} As the node\'s {meta["parameter"]} '
                                   '(default: %(default)s)')
    options.add(parser, '--reset-after-s', '--compile', '--no-progress')
    options.add_engine_arguments(parser)


def decision_settings(args: argparse.Namespace) -> DecisionSettings:
    """Return the decision settings the flags ask for, checked."""
    settings = DecisionSettings(**{setting.name: getattr(args, setting.name)
                                   for setting in decision_fields()})
    settings.check()
    return settings


def _evaluate_shared_out(args: argparse.Namespace) -> dict[str, Any] | None:
    """
    Evaluate ``args.bags``: all of them, or under torchrun this process's share.

    Returns the (merged) result in process 0, None in the others.
    """
    distributed = Distributed.from_environment()
    settings = options.engine_settings(args, max_batch=args.batch_size,
                                       reset_after_s=args.reset_after_s)
    settings = replace(settings, device=distributed.device_for(settings.device))
    # gloo carries Python objects on any machine, with or without GPUs; shares of a fleet's
    # bags can take hours longer than others, which the collective must wait for.
    distributed.start('gloo', timeout_s=24 * 3600)
    share = list(args.bags)[distributed.rank::distributed.world]
    with create_engine(args.checkpoint, settings) as engine:
        result = evaluate_bags(share, engine, topics=args.topics,
                               label_topic=args.label_topic, labels_csv=args.labels_csv,
                               batch_size=args.batch_size,
                               predictions_path=args.output if distributed.world == 1 else None,
                               smoothing=args.smoothing,
                               progress=not args.no_progress and distributed.main,
                               decision=decision_settings(args))
        labels = list(engine.labels)
    if distributed.world == 1:
        return result
    try:
        gathered = distributed.gather_to_main(result)
    finally:
        distributed.finish()
    if gathered is None:
        return None
    merged = merge_results(gathered, [str(path) for path in args.bags], labels)
    writer = PredictionWriter(args.output)
    for prediction in merged['predictions']:
        writer.write(prediction)
    writer.close()
    return merged


def main(args: argparse.Namespace) -> int:
    """Score a model (or a replay recording) on bags and print the scores."""
    if args.scenes:
        if len(args.bags) != 1:
            raise ValueError('--scenes scores one replay recording against one bag')
        from cnn_rnn_perception.tools.evaluation.replay import parse_remaps
        result = score_scene_recording(args.scenes, args.bags[0], label_topic=args.label_topic,
                                       labels_csv=args.labels_csv,
                                       remap=parse_remaps(args.remap))
        writer = PredictionWriter(args.output)
        for prediction in result['predictions']:
            writer.write(prediction)
        writer.close()
    else:
        if not args.checkpoint:
            raise ValueError('evaluate needs --checkpoint (a trained model), or --scenes to '
                             'score a replay recording')
        result = _evaluate_shared_out(args)
        if result is None:
            return 0  # a process other than 0 under torchrun: process 0 reports
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
    write_json(args.summary, summary)
    if args.min_accuracy is not None:
        if summary['accuracy'] is None:
            raise ValueError('--min-accuracy needs ground truth: --label-topic or --labels-csv')
        if summary['accuracy'] < args.min_accuracy:
            print(f'FAIL: accuracy {summary["accuracy"]:.4f} is below --min-accuracy '
                  f'{args.min_accuracy}', file=sys.stderr)
            return 1
    return 0
