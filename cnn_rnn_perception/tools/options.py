"""
Flags more than one command takes, declared once: the table ``FLAGS``, and groups of them.

A command adds what it needs with ``add(parser, '--seed', '--json', ...)`` (a default or help
that differs for one command is given there), the engine group with ``add_engine_arguments``
and the model group with ``add_model_arguments``, which is generated from ``ModelConfig``'s
fields, so a new model field is a new flag without a line here. ``--config FILE.yaml`` sets
the parser's defaults, so flags given on the command line win without a hand-written merge.

Imports nothing heavy: ``cnn_rnn_perception --help`` must stay fast. The model module (and so
torch) is imported only by a command that adds the model group.
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence


def size(text: str) -> tuple[int, int]:
    """Parse 'AxB' into (A, B)."""
    try:
        first, second = (int(part) for part in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a size like 224x224; got {text!r}') from None
    return first, second


def int_list(text: str) -> list[int]:
    """Parse '1,8,32' into positive whole numbers."""
    try:
        values = [int(part) for part in text.split(',') if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected numbers like 1,8,32; got {text!r}') from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f'expected positive numbers; got {text!r}')
    return values


def float_list(text: str) -> list[float]:
    """Parse '15,30' into positive numbers."""
    try:
        values = [float(part) for part in text.split(',') if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected numbers like 15,30; got {text!r}') from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f'expected positive numbers; got {text!r}')
    return values


def threads(text: str) -> int:
    """Parse a thread count; 0 leaves it to torch."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f'expected 0 (torch decides) or a thread count; '
                                         f'got {text!r}')
    return value


def flag(**settings: Any) -> dict[str, Any]:
    """Return the argparse settings of one command-line option, as given."""
    return settings


# Every flag that more than one command takes, with its usual default and help.
FLAGS: dict[str, dict[str, Any]] = {
    '--checkpoint': flag(help='a checkpoint written by this package'),
    '--json': flag(metavar='PATH', help='also write the report as JSON'),
    '--no-progress': flag(action='store_true', help='no progress bars'),
    '--no-compile': flag(action='store_true', help='run the trunk eagerly'),
    '--compile': flag(action='store_true',
                      help='torch.compile the trunk: faster frames, slower start'),
    '--frame-size': flag(type=size, default=(640, 480), metavar='WxH',
                         help='camera frame width x height (default: 640x480)'),
    '--batch-sizes': flag(type=int_list, default=[1], metavar='N[,N...]',
                          help='batch sizes to run (default: 1)'),
    '--batch-size': flag(type=int, help='frames per batch'),
    '--num-classes': flag(type=int, default=10, help='classes of the generated model'),
    '--seed': flag(type=int, default=0, help='random seed (default: 0)'),
    '--epochs': flag(type=int, help='passes over the training data'),
    '--device': flag(default='auto', help='auto (GPU if there is one), cpu, cuda or cuda:N '
                                          '(default: auto)'),
    '--threads': flag(type=threads, default=0,
                      help='CPU threads for torch (default: 0, torch decides)'),
    '--topics': flag(nargs='+', metavar='TOPIC',
                     help='image topics (default: every Image and CompressedImage topic)'),
    '--label-topic': flag(help='std_msgs/String ground-truth topic; a frame takes the latest '
                               'label recorded at or before it'),
    '--remap': flag(nargs='+', default=[], metavar='FROM:=TO',
                    help='publish a bag topic under another name'),
    '--rate': flag(type=float, default=1.0, help='speed relative to the recording'),
    '--reset-after-s': flag(type=float, default=1.0,
                            help='temporal models: a stream whose frames are further apart '
                                 'than this starts afresh, as temporal.reset_after_s in the '
                                 'node (default: 1.0)'),
    '--output': flag(help='where to write the result'),
    '--config': flag(metavar='FILE.yaml',
                     help="settings file: its keys are the flags' names (model flags under "
                          '"model:"); flags given here override it'),
}


def add(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *names: str,
        **overrides: Any) -> None:
    """Add flags from ``FLAGS``; ``overrides`` (default, help, ...) apply to each of them."""
    for name in names:
        parser.add_argument(name, **{**FLAGS[name], **overrides})


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags that choose how the engine runs the model."""
    from cnn_rnn_perception.core.engine.base import BACKENDS, PRECISIONS

    group = parser.add_argument_group('engine')
    add(group, '--device', '--threads')
    group.add_argument('--precision', default='auto', choices=PRECISIONS,
                       help='trunk precision; auto is bf16 on GPUs that have it, fp32 on the '
                            'CPU (default: auto)')
    group.add_argument('--backend', default='torch', choices=BACKENDS,
                       help='what runs the model: torch, an exported model on onnxruntime or '
                            'openvino (exported on the fly from a checkpoint), or auto: time '
                            'each installed one here and keep the fastest that agrees '
                            '(default: torch)')
    group.add_argument('--auto-rate-hz', type=float, default=15.0,
                       help='with --backend auto: time each candidate at this frame rate, as '
                            'frames reach the node (0: back to back; default: %(default)s)')


def engine_settings(args: argparse.Namespace, **overrides: Any):
    """Return the EngineSettings the engine flags (and the command's ``overrides``) describe."""
    from cnn_rnn_perception.core.engine import EngineSettings

    compile_trunk = (not args.no_compile if hasattr(args, 'no_compile')
                     else getattr(args, 'compile', True))
    return EngineSettings(**{'device': args.device, 'precision': args.precision,
                             'backend': args.backend, 'compile_trunk': compile_trunk,
                             'auto_rate_hz': args.auto_rate_hz, **overrides})


def add_model_arguments(parser: argparse.ArgumentParser,
                        title: str = 'model (used without --checkpoint)') -> None:
    """Add one flag per user-set ModelConfig field: --backbone, --hidden-size, ..."""
    from cnn_rnn_perception.core.model_config import user_settings

    group = parser.add_argument_group(title)
    for setting in user_settings():
        meta, default = setting.metadata, setting.default
        text = f'{meta["help"]} (default: {_shown(default)})'
        flag = '--' + setting.name.replace('_', '-')
        if isinstance(default, bool):
            group.add_argument(flag, action='store_true', default=default, help=text)
        elif isinstance(default, tuple):
            group.add_argument(flag, type=size, default=default, metavar='HxW', help=text)
        else:
            group.add_argument(flag, type=type(default), default=default,
                               choices=meta['choices'] or None, help=text)


def _shown(default: Any) -> str:
    if isinstance(default, tuple):
        return 'x'.join(map(str, default))
    return repr(default) if default == '' else str(default)


def model_config(args: argparse.Namespace, num_classes: int):
    """Return the ModelConfig the model flags describe."""
    from cnn_rnn_perception.core.model_config import ModelConfig, user_settings

    return ModelConfig(num_classes=num_classes,
                       **{setting.name: getattr(args, setting.name)
                          for setting in user_settings()})


def apply_config(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """
    Make a ``--config FILE.yaml`` in ``argv`` the defaults of ``parser``: flags still win.

    Keys are flag names with underscores (``batch_size``); the model flags go under
    ``model:``. An unknown key is an error that lists the known ones.
    """
    found, _ = _config_only().parse_known_args(argv)
    if not found.config:
        return
    import yaml

    with open(found.config) as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise ValueError(f'{found.config}: expected a mapping of settings')
    values = {**(values.pop('model', None) or {}), **values}
    known = {action.dest for action in parser._actions} - {'help', 'config'}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f'{found.config}: unknown keys {unknown}; known: {sorted(known)}')
    if 'input_size' in values:
        values['input_size'] = tuple(values['input_size'])
    parser.set_defaults(**values)


def _config_only() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    add(parser, '--config')
    return parser
