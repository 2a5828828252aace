"""
The ``cnn_rnn_perception`` command: a table of subcommands, each a module of ``tools``.

Each command module has ``add_arguments(parser)`` and ``main(args)``, its flags beside the
code that reads them; every command also takes ``--config FILE.yaml`` as its defaults. Only
the chosen command's module is imported, so ``--help`` is fast and needs no torch. User
mistakes end in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from cnn_rnn_perception.tools import options

# name: (module in cnn_rnn_perception.tools, one line of help), grouped by the job.
COMMANDS: dict[str, tuple[str, str]] = {
    'demo': ('demo', 'the whole product: train on synthetic scenes, run the node, replay a bag'),
    # training
    'train': ('training.train', 'train a scene model from an image folder or labelled bags'),
    'export': ('training.export',
               'export a checkpoint to ONNX or OpenVINO IR for deployment runtimes'),
    # evaluation and replay
    'evaluate': ('evaluation.evaluate',
                 'classify every frame of recorded bags, score against labels'),
    'replay': ('evaluation.replay',
               "publish a bag's image and label topics into ROS (like ros2 bag play)"),
    # benchmarks and checks
    'bench': ('benchmarks.bench', "time the engine against the seed's way of running the model"),
    'bench-node': ('benchmarks.bench_node',
                   'end-to-end latency of the running node (camera to ~/scene)'),
    'bench-order': ('benchmarks.bench_order',
                    'show that the recurrent head sees order; pooling cannot'),
    'selftest': ('benchmarks.selftest', 'check every engine path on this device against fp32'),
    'classify': ('benchmarks.classify',
                 'classify generated camera frames; print labels and timings'),
    # synthetic data
    'synth': ('synthetic.synth', 'draw synthetic navigation scenes as images and bags'),
}


def command_module(name: str):
    """Import the module that implements command ``name``."""
    return importlib.import_module(f'cnn_rnn_perception.tools.{COMMANDS[name][0]}')


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Return the parser; the flags of ``command`` (and only of it) are added."""
    parser = argparse.ArgumentParser(
        prog='cnn_rnn_perception',
        description='CNN-RNN scene classification for ROS 2 robots: tools around the model. '
                    'The ROS node itself is the perception_node command. '
                    '"cnn_rnn_perception COMMAND --help" explains each command.')
    parser.add_argument('--log-level', default='WARNING',
                        choices=('DEBUG', 'INFO', 'WARNING', 'ERROR'))
    commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for name, (_, summary) in COMMANDS.items():
        subparser = commands.add_parser(name, help=summary, description=summary)
        if name == command:
            command_module(name).add_arguments(subparser)
            options.add(subparser, '--config')
            parser.chosen = subparser
    return parser


def _chosen(argv: Sequence[str]) -> str | None:
    return next((word for word in argv if word in COMMANDS), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; user errors print one line and return 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _chosen(argv)
    parser = build_parser(command)
    try:
        if command is not None:
            options.apply_config(parser.chosen, argv)
    except (ValueError, FileNotFoundError) as error:
        print(f'cnn_rnn_perception {command}: error: {error}', file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format='%(levelname)s %(name)s: %(message)s')
    if getattr(args, 'threads', 0):
        # The command owns its process, so it may set torch's thread count; the library never
        # does, since that changes what every other computation in a process returns.
        import torch
        torch.set_num_threads(args.threads)
    try:
        return command_module(args.command).main(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f'cnn_rnn_perception {args.command}: error: {error}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == '__main__':
    sys.exit(main())
