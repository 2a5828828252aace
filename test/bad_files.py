"""
Files a user can name that the node must refuse, each with the words its reason must hold.

Directories, a FIFO (reading one blocks), unreadable, binary, truncated and malformed files,
exported models with metadata that is missing, not JSON or not an object: what the node's
parameter checks meet in the field. Shared by the parameter tests and the fuzzing test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cnn_rnn_perception.core.engine.export_format import EXPORT_FORMAT, METADATA_KEY


def unreadable_file(folder: Path) -> Path | None:
    """Return a file this process cannot read, or None where there is none to be had."""
    if os.geteuid() != 0:
        path = folder / 'unreadable.yaml'
        path.write_text('scenes: {}\n')
        path.chmod(0)
        return path
    # Root reads any mode; a write-only sysctl is refused to root too.
    sysctl = Path('/proc/sys/vm/compact_memory')
    return sysctl if sysctl.exists() and not os.access(sysctl, os.R_OK) else None


def _onnx_with_metadata(path: Path, text: str | None) -> Path:
    import onnx
    from onnx import helper, TensorProto

    graph = helper.make_graph(
        [helper.make_node('Identity', ['x'], ['y'])], 'identity',
        [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    if text is not None:
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, text
    onnx.save(model, str(path))
    return path


def common_bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Bad files for any parameter that names a file: name -> (path, words of the reason)."""
    folder.mkdir(parents=True, exist_ok=True)
    fifo = folder / 'camera.fifo'
    if not fifo.exists():
        os.mkfifo(fifo)
    files = {'directory': (folder, 'is a directory'),
             'fifo': (fifo, 'is not a regular file'),
             'missing': (folder / 'missing.yaml', 'file not found')}
    unreadable = unreadable_file(folder)
    if unreadable is not None:
        files['unreadable'] = (unreadable, 'permission denied')
    return files


def bad_policy_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Policy files the node must refuse: name -> (path, words of the reason)."""
    files = common_bad_files(folder)
    for name, content, reason in (
            ('binary', b'\x00\xff\xfe\x00', 'is not text'),
            ('truncated', b'scenes:\n  corridor: {speed_limit: 5', 'is not valid YAML'),
            ('a string', b'"scenes"\n', 'expected a mapping'),
            ('a number key', b'scenes:\n  1: {}\n', 'is not a label'),
            ('mixed keys', b'scenes: {}\n1: 2\nx: 3\n', 'unknown top-level keys 1, x')):
        path = folder / f'{name.replace(" ", "_")}.yaml'
        path.write_bytes(content)
        files[f'policy {name}'] = (path, reason)
    return files


def bad_model_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """model.checkpoint values the node must refuse: name -> (path, words of the reason)."""
    files = common_bad_files(folder)
    (folder / 'model.onnx').mkdir(exist_ok=True)
    files['a directory named .onnx'] = (folder / 'model.onnx', 'is a directory')
    (folder / 'garbage.onnx').write_bytes(b'not a protobuf at all')
    files['garbage onnx'] = (folder / 'garbage.onnx', 'cannot read exported model')
    (folder / 'garbage.pt').write_bytes(b'PK\x03\x04 truncated zip')
    files['garbage checkpoint'] = (folder / 'garbage.pt', 'truncated, or not a torch file')
    for name, text, reason in (
            ('no metadata', None, 'was not exported by cnn_rnn_perception'),
            ('metadata not json', '{', 'its metadata is not JSON'),
            ('metadata a list', '[1, 2]', 'its metadata is a list, not a JSON object'),
            ('metadata without config', json.dumps({'format': EXPORT_FORMAT}),
             "the exported metadata has no 'config'"),
            ('labels not a list', json.dumps({'format': EXPORT_FORMAT, 'config': {},
                                              'labels': 5, 'preprocessing': {}}),
             'the exported metadata is malformed')):
        path = _onnx_with_metadata(folder / f'{name.replace(" ", "_")}.onnx', text)
        files[f'exported, {name}'] = (path, reason)
    return files
