"""The package's shape: three floors, one source for each setting, a stable top level."""

import argparse
import ast
import dataclasses
from pathlib import Path
import re
import subprocess
import sys

from cnn_rnn_perception.core.model_config import ModelConfig, user_settings
from cnn_rnn_perception.core.navigation import decision_fields, DecisionSettings
from cnn_rnn_perception.ros.parameters import (
    decision_settings, model_config, model_parameters, parameter_table, PARAMETERS, SPECS,
    validate_startup)
from cnn_rnn_perception.tools import cli, options
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'cnn_rnn_perception'
ROOT = PACKAGE.parent
FLOORS = {'core': 0, 'ros': 1, 'tools': 2}
# The rooms of tools/, each on a floor: a room imports only from rooms on floors below it.
TOOL_FLOORS = {
    'options': 0, 'report': 0, 'distributed': 0, 'environment': 0,
    'evaluation': 1,
    'training': 2, 'synthetic': 2, 'benchmarks': 2,
    'temporal_demo': 3, 'demo': 4,
    'cli': 1,  # the command table: it names the commands, importing none of them
}
# The ROS adapter's parts that run without ROS (tested on Humble's Python without rclpy).
ROS_FREE = ('cnn_rnn_perception.ros.cameras', 'cnn_rnn_perception.ros.engine_slot',
            'cnn_rnn_perception.ros.worker')
MAX_FILE_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports() -> dict[str, set[str]]:
    """Each package module and the package modules it imports, lazily or not."""
    modules = {_module_name(path): path for path in PACKAGE.rglob('*.py')}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f'{node.module}.{alias.name}' for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            found |= {target for target in targets if target in modules and target != name}
        graph[name] = found
    return graph


def _floor(module: str) -> int | None:
    parts = module.split('.')
    return FLOORS.get(parts[1]) if len(parts) > 1 else None


def test_core_ros_and_tools_import_only_downwards():
    upward = [(module, target) for module, targets in _imports().items()
              for target in targets
              if _floor(module) is not None and _floor(target) is not None
              and _floor(target) > _floor(module)]
    assert upward == []


def test_no_module_imports_itself_back_through_others():
    graph = _imports()
    # Package __init__ files that re-export their own submodules are not cycles of code.
    edges = {module: {t for t in targets if not module.startswith(t + '.')}
             for module, targets in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(module, path):
        state[module] = 1
        for target in edges[module]:
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def _tool_room(module: str) -> str | None:
    parts = module.split('.')
    return parts[2] if len(parts) > 2 and parts[1] == 'tools' else None


def test_every_tools_room_has_a_floor_and_imports_only_from_below():
    rooms = {_tool_room(_module_name(path)) for path in (PACKAGE / 'tools').rglob('*.py')}
    assert rooms - {None} == set(TOOL_FLOORS), 'a new room of tools/ needs its floor here'
    upward = [(module, target) for module, targets in _imports().items()
              for target in targets
              if _tool_room(module) and _tool_room(target)
              and _tool_room(module) != _tool_room(target)
              and TOOL_FLOORS[_tool_room(target)] >= TOOL_FLOORS[_tool_room(module)]]
    assert upward == []


def test_the_ros_free_parts_of_the_adapter_import_no_ros():
    graph = _imports()
    for module in ROS_FREE:
        path = PACKAGE.parent / (module.replace('.', '/') + '.py')
        imported = {alias.name.split('.')[0] for node in ast.walk(ast.parse(path.read_text()))
                    for alias in (node.names if isinstance(node, ast.Import) else [])}
        imported |= {node.module.split('.')[0] for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & {'rclpy', 'rcl_interfaces', 'sensor_msgs', 'std_msgs'}, module
        assert graph[module] <= set(ROS_FREE) | {m for m in graph if _floor(m) == 0}, module


def test_no_file_is_longer_than_a_newcomer_reads_at_once():
    long = {str(path.relative_to(ROOT)): lines for path in PACKAGE.rglob('*.py')
            for lines in [len(path.read_text().splitlines())] if lines > MAX_FILE_LINES}
    assert long == {}


def test_the_top_level_offers_the_documented_names_without_importing_torch():
    import cnn_rnn_perception
    for name in cnn_rnn_perception.__all__:
        assert getattr(cnn_rnn_perception, name) is not None, name
    assert {'ModelConfig', 'CnnRnnClassifier', 'save_checkpoint', 'load_checkpoint',
            'inspect_checkpoint', 'inspect_model_file', 'create_engine', 'EngineSettings',
            'message_to_frame'} <= set(cnn_rnn_perception.__all__)
    fresh = subprocess.run(
        [sys.executable, '-c', 'import sys, cnn_rnn_perception, cnn_rnn_perception.tools.cli; '
                               "print('torch' in sys.modules)"],
        capture_output=True, text=True, check=True)
    assert fresh.stdout.strip() == 'False'


DOCS = sorted((ROOT / 'docs').glob('*.md'))


def test_the_readme_and_docs_examples_use_only_the_top_level():
    blocks = [block.split('```', 1)[0] for page in [ROOT / 'README.md', *DOCS]
              for block in page.read_text().split('```python')[1:]]
    assert len(blocks) > 1
    for block in blocks:
        for line in block.splitlines():
            if line.startswith(('from cnn_rnn_perception', 'import cnn_rnn_perception')):
                assert line.startswith('from cnn_rnn_perception import '), line


def test_the_readme_is_a_front_door_to_every_docs_page():
    readme = (ROOT / 'README.md').read_text()
    lines = readme.splitlines()
    assert len(lines) < 300
    first = '\n'.join(lines[:60])
    assert 'make demo' in first and 'accuracy on the held-out recording' in first
    assert DOCS and [page.name for page in DOCS if f'(docs/{page.name}' not in readme] == []
    for page in DOCS:  # links between pages point at pages that exist
        for target in re.findall(r'\]\(([a-z_-]+\.md)', page.read_text()):
            assert (ROOT / 'docs' / target).exists(), (page.name, target)


def test_the_docs_parameter_table_is_the_one_the_parameters_make():
    page = (ROOT / 'docs' / 'node-and-parameters.md').read_text()
    table = page.split('-->\n', 1)[1].split('\n<!-- end parameters -->')[0] \
        if '<!-- parameters:' in page else ''
    assert table == parameter_table(), 'regenerate it with ros.parameters.parameter_table()'


def test_the_command_is_a_short_table_whose_help_needs_no_torch():
    assert len((PACKAGE / 'tools' / 'cli.py').read_text().splitlines()) < 150
    for name, (module, _) in cli.COMMANDS.items():
        command = cli.command_module(name)
        assert callable(command.add_arguments) and callable(command.main), module
    shown = subprocess.run(
        [sys.executable, '-c', 'import sys\nfrom cnn_rnn_perception.tools import cli\n'
                               "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
                               "print('torch' in sys.modules)"],
        capture_output=True, text=True, check=True)
    assert shown.stdout.strip().endswith('False')
    assert all(name in shown.stdout for name in cli.COMMANDS)


def test_no_flag_is_declared_in_two_places():
    declared = list(options.FLAGS)
    for path in (PACKAGE / 'tools').rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == 'add_argument'):
                declared += [arg.value for arg in node.args if isinstance(arg, ast.Constant)
                             and isinstance(arg.value, str) and arg.value.startswith('--')]
    repeated = {flag for flag in declared if declared.count(flag) > 1}
    # Two flags that only share a name: synth's (scenes per recording) and evaluate's (a
    # replay's recorded output). Renaming either would change what users type.
    assert repeated - {'--scenes'} == set()


def _parser_of(command: str) -> argparse.ArgumentParser:
    parser = cli.build_parser(command)
    return parser.chosen


def test_model_flags_and_model_parameters_come_from_every_model_config_field():
    settable = {f.name for f in dataclasses.fields(ModelConfig)} - {'num_classes'}
    assert {setting.name for setting in user_settings()} == settable
    default = ModelConfig()
    for command in ('classify', 'bench', 'bench-node', 'selftest', 'train'):
        flags = {action.dest: action for action in _parser_of(command)._actions}
        for name in settable:
            assert name in flags, f'{command} has no --{name.replace("_", "-")}'
            assert flags[name].default == getattr(default, name), (command, name)
    for name in settable:
        spec = SPECS[f'model.{name}']
        value = getattr(default, name)
        assert spec.default == (list(value) if isinstance(value, tuple) else value), name
        assert spec.description and not spec.live
    assert 'model.num_classes' not in SPECS


def test_model_parameters_and_model_config_are_each_others_inverse():
    config = ModelConfig(num_classes=3, backbone='mobilenet_v3_small', sequence='columns',
                         strip=1, rnn='gru', hidden_size=24, bidirectional=True,
                         dropout=0.1, pooling='attention', input_size=(96, 128),
                         temporal='gru', temporal_hidden_size=16)
    values = {spec.name: spec.default for spec in PARAMETERS}
    values.update(model_parameters(config), labels=['a', 'b', 'c'])
    assert validate_startup(values) is None
    assert model_config(values) == config


@pytest.mark.parametrize('command', ['train', 'bench'])
def test_a_config_file_sets_defaults_and_flags_still_win(tmp_path, command):
    settings = tmp_path / 'settings.yaml'
    settings.write_text('epochs: 3\nmodel:\n  hidden_size: 24\n  input_size: [64, 96]\n')
    parser = cli.build_parser('train').chosen
    options.apply_config(parser, ['train', '--config', str(settings)])
    args = parser.parse_args(['--hidden-size', '40'])
    assert (args.epochs, args.hidden_size, args.input_size) == (3, 40, (64, 96))
    if command == 'bench':  # bench has no --epochs: the file is refused, naming the key
        with pytest.raises(ValueError, match=r"unknown keys \['epochs'\]"):
            options.apply_config(cli.build_parser('bench').chosen,
                                 ['bench', '--config', str(settings)])


def test_tools_find_the_dds_profile_of_a_source_checkout():
    from cnn_rnn_perception.tools.environment.ros_env import dds_profile
    assert dds_profile() == str(PACKAGE.parent / 'config' / 'fastdds_shm.xml')


def test_decision_settings_are_written_once_and_read_by_the_node_and_evaluate():
    flags = {action.dest: action for action in _parser_of('evaluate')._actions}
    args = _parser_of('evaluate').parse_args(['bag'])
    from cnn_rnn_perception.tools.evaluation.evaluate import decision_settings as from_flags
    assert from_flags(args) == DecisionSettings()
    values = {spec.name: spec.default for spec in PARAMETERS}
    assert decision_settings(values) == DecisionSettings()
    sources = {path: path.read_text() for path in PACKAGE.rglob('*.py')}
    for setting in decision_fields():
        meta = setting.metadata
        spec = SPECS[meta['parameter']]
        assert (spec.default, spec.minimum, spec.maximum, spec.live) == (
            setting.default, *meta['limits'], True), setting.name
        assert spec.description == meta['help']
        flag = flags[setting.name]
        assert flag.option_strings == [meta['flag']] and flag.default == setting.default
        assert meta['help'] in flag.help
        # A copy of the help anywhere else would drift from this one.
        opening = meta['help'][:40]
        holders = [path.name for path, text in sources.items() if opening in text]
        assert holders == ['navigation.py'], (setting.name, holders)
