"""
The ``classify`` command: a model (or a checkpoint) on generated camera frames, one at a time.

Prints each frame's label and the time each stage took: the quickest way to see that the
engine runs on this machine and what a frame costs.
"""

from __future__ import annotations

import argparse

from cnn_rnn_perception.core.engine import create_engine
from cnn_rnn_perception.core.sample_frames import camera_frames, NAVIGATION_LABELS
from cnn_rnn_perception.tools import options
import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the classify command's flags."""
    parser.description = ('Build a model (or load --checkpoint), classify generated camera '
                          'frames one at a time, and print each label with the time each '
                          'stage took.')
    options.add(parser, '--checkpoint', '--frame-size', '--compile')
    parser.add_argument('--frames', type=int, default=8, help='how many frames (default: 8)')
    options.add_engine_arguments(parser)
    options.add_model_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """Classify the frames and print a line for each."""
    config = (None if args.checkpoint
              else options.model_config(args, len(NAVIGATION_LABELS)))
    engine = create_engine(args.checkpoint, options.engine_settings(args), config=config,
                           labels=NAVIGATION_LABELS)
    source = args.checkpoint or ('random weights: labels mean nothing until you load a '
                                 'trained checkpoint')
    width, height = args.frame_size
    print(f'model: {engine.describe()} ({source})')
    choice = getattr(engine, 'backend_choice', None)
    if choice is not None:
        print(choice.summary())
    print(f'classifying {args.frames} generated {width}x{height} camera frames, one at a time')
    latencies = []
    with engine:
        for index, frame in enumerate(camera_frames(args.frames, height, width)):
            result = engine.infer([frame], color_order='bgr', top_k=3)[0]
            times = result.times
            latencies.append(times.total_ms)
            others = ', '.join(f'{label} {score:.2f}' for label, score in result.top_k[1:])
            print(f'frame {index}: {result.label:<14} {result.score:.2f}  ({others})  '
                  f'preprocess {times.preprocess_ms:.1f} ms, forward {times.forward_ms:.1f} '
                  f'ms, postprocess {times.postprocess_ms:.2f} ms')
    print(f'latency per frame: p50 {np.percentile(latencies, 50):.1f} ms, '
          f'p95 {np.percentile(latencies, 95):.1f} ms over {len(latencies)} frames')
    return 0
