"""
The exported-model format: the ONNX and OpenVINO IR files this package writes and reads.

The whole model goes into the file, softmax included (images [B, 3, H, W] normalised, batch
dynamic, to probabilities [B, classes]), with the labels, the model config and the
preprocessing in the file's own metadata, so the exported file alone is enough to run it.
The engines read it (``read_exported``); the ``export`` command writes it and checks that
the file reproduces the torch model within ``PARITY_FP32``.

Reduced precision lives in files of its own beside the fp32 one (``model.xml`` ->
``model.int8.xml``, ``model.bf16.xml``; ``variant_path``), each saying in its metadata what
precision it runs in and the accuracy figures it was accepted on. The ``export`` command keeps
one only after it passed its accuracy gate on a labelled held-out bag; ``backend: auto`` finds
them beside the fp32 file and times them with the rest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import tempfile
from typing import Any, Sequence

from cnn_rnn_perception.core.checkpoint import (
    CHECKPOINT_FORMAT, CheckpointInfo, inspect_checkpoint)
from cnn_rnn_perception.core.errors import ConfigurationError, readable_file, reading
from cnn_rnn_perception.core.model import CnnRnnClassifier
from cnn_rnn_perception.core.model_config import ModelConfig, Preprocessing
import numpy as np
import torch

FORMATS = ('onnx', 'openvino')
# What an exported file computes in. int8: weights and activations quantized (NNCF);
# bf16: the fp32 file's weights, computed in bf16 by OpenVINO on CPUs with the units.
FILE_PRECISIONS = ('fp32', 'bf16', 'int8')
REDUCED_PRECISIONS = ('int8', 'bf16')
# What int8 quantizes. trunk: the CNN's convolutions, where the time goes, with the recurrent
# encoder and the head kept in float; all: every op NNCF can quantize. On the demo model,
# all (the LSTM quantized too) kept the fp32 top-1 on 16.7% of held-out frames; trunk on
# 100%, at the same speed.
INT8_SCOPES = {'trunk': ('LSTMSequence', 'GRUSequence', 'RNNSequence', 'MatMul'), 'all': ()}
METADATA_KEY = 'cnn_rnn_perception'
EXPORT_FORMAT = 'cnn_rnn_perception.export/1'
PARITY_FP32 = 1e-4
# Extensions an exported model has; anything else is a torch checkpoint.
EXPORTED_SUFFIXES = ('.onnx', '.xml')
INSTALL_HINT = {'nncf': 'pip install nncf (or: pip install .[openvino])',
                'onnxruntime': 'pip install onnxruntime (or: pip install .[onnx])',
                'openvino': 'pip install openvino (or: pip install .[openvino])',
                'onnx': 'pip install onnx onnxscript (or: pip install .[onnx])',
                'onnxscript': 'pip install onnx onnxscript (or: pip install .[onnx])'}


class _Probabilities(torch.nn.Module):
    """The classifier with its softmax: what an exported file computes."""

    def __init__(self, model: CnnRnnClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(images), dim=1)


def require(module: str):
    """Import an optional runtime, or fail with the pip command that installs it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise RuntimeError(f'{module} is not installed: {INSTALL_HINT[module]}') from error


def is_exported(path: str | os.PathLike) -> bool:
    """Return whether ``path`` names an exported model rather than a torch checkpoint."""
    return Path(path).suffix.lower() in EXPORTED_SUFFIXES


def _metadata(model: CnnRnnClassifier, labels: list[str], preprocessing: Preprocessing) -> str:
    return json.dumps({'format': EXPORT_FORMAT, 'checkpoint_format': CHECKPOINT_FORMAT,
                       'config': model.config.to_dict(), 'labels': list(labels),
                       'preprocessing': preprocessing.to_dict(), 'precision': 'fp32'})


def variant_path(path: str | os.PathLike, precision: str) -> Path:
    """Return where the ``precision`` variant of an exported file lives: beside it."""
    path = Path(path)
    if precision not in REDUCED_PRECISIONS:
        raise ValueError(f'precision must be one of {", ".join(REDUCED_PRECISIONS)}; '
                         f'got {precision!r}')
    return path.with_name(f'{path.stem}.{precision}{path.suffix}')


def read_exported(path: str | os.PathLike) -> CheckpointInfo:
    """Return the config, labels and preprocessing stored in an exported file."""
    try:
        return checkpoint_info(read_export_metadata(path))
    except ConfigurationError as error:
        message = str(error)
        raise ConfigurationError(message if str(path) in message
                                 else f'{str(path)!r}: {message}') from None


def checkpoint_info(metadata: dict[str, Any]) -> CheckpointInfo:
    """Return the config, labels and preprocessing of an exported file's metadata."""
    try:
        return CheckpointInfo(ModelConfig.from_dict(metadata['config']),
                              [str(label) for label in metadata['labels']],
                              Preprocessing(**metadata['preprocessing']))
    except KeyError as error:
        raise ConfigurationError(f'the exported metadata has no {error}: export the model '
                                 'again with "cnn_rnn_perception export"') from None
    except (AttributeError, TypeError) as error:
        raise ConfigurationError(f'the exported metadata is malformed ({error}): export the '
                                 'model again with "cnn_rnn_perception export"') from None


def read_export_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """
    Return everything an exported file says about itself, checked.

    Keys: config, labels, preprocessing (as stored), precision (one of FILE_PRECISIONS) and,
    for a reduced-precision file, acceptance (the figures its accuracy gate passed on).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'exported model not found: {str(path)!r}')
    try:
        if path.suffix.lower() == '.onnx':
            onnx = require('onnx')
            proto = onnx.load(str(path), load_external_data=False)
            stored = {entry.key: entry.value for entry in proto.metadata_props}
            text = stored.get(METADATA_KEY)
        else:
            openvino = require('openvino')
            model = openvino.Core().read_model(str(path))
            text = (model.get_rt_info([METADATA_KEY]).astype(str)
                    if model.has_rt_info([METADATA_KEY]) else None)
    except RuntimeError:
        raise
    except Exception as error:  # protobuf and OpenVINO parse errors have no common base
        raise ValueError(f'cannot read exported model {str(path)!r}: {error}') from error
    if not text:
        raise ValueError(f'{str(path)!r} was not exported by cnn_rnn_perception: it carries no '
                         'labels or preprocessing (export it with "cnn_rnn_perception export")')
    try:
        data = json.loads(text)
    except ValueError as error:
        raise ConfigurationError(f'{str(path)!r}: its metadata is not JSON ({error}): export '
                                 'the model again') from None
    if not isinstance(data, dict):
        raise ConfigurationError(f'{str(path)!r}: its metadata is a {type(data).__name__}, not '
                                 'a JSON object: export the model again')
    if data.get('format') != EXPORT_FORMAT:
        raise ValueError(f'{str(path)!r}: unknown export format {data.get("format")!r}')
    data.setdefault('precision', 'fp32')  # written before reduced precision existed
    if data['precision'] not in FILE_PRECISIONS:
        raise ValueError(f'{str(path)!r}: unknown precision {data["precision"]!r}')
    return data


def write_openvino_variant(fp32_path: str | os.PathLike, precision: str,
                           calibration: Sequence[np.ndarray] = (),
                           acceptance: dict[str, Any] | None = None,
                           subset_size: int = 300, int8_scope: str = 'trunk') -> Path:
    """
    Write the ``precision`` variant of an fp32 OpenVINO IR file beside it; return its path.

    int8 is NNCF's post-training quantization, its activation ranges calibrated on
    ``calibration`` (preprocessed float32 [1, 3, H, W] arrays: frames of the user's own
    bags), over ``int8_scope`` (``INT8_SCOPES``); bf16 is the same weights, marked to be
    computed in bf16. ``acceptance``: the figures of the accuracy gate, stored in the file (the
    gate is the ``export`` command's).
    """
    openvino = require('openvino')
    fp32_path = Path(fp32_path)
    output = variant_path(fp32_path, precision)
    data = read_export_metadata(fp32_path)
    if data['precision'] != 'fp32':
        raise ValueError(f'{str(fp32_path)!r} is already {data["precision"]}: give the fp32 '
                         'file')
    model = openvino.Core().read_model(str(fp32_path))
    if precision == 'int8':
        if not calibration:
            raise ValueError('int8 needs calibration frames: give --calibration with bags '
                             'of your own cameras')
        if int8_scope not in INT8_SCOPES:
            raise ValueError(f'int8 scope must be one of {", ".join(INT8_SCOPES)}; '
                             f'got {int8_scope!r}')
        nncf = require('nncf')
        present = {op.get_type_name() for op in model.get_ops()}
        kept = [kind for kind in INT8_SCOPES[int8_scope] if kind in present]
        model = nncf.quantize(model, nncf.Dataset(list(calibration)),
                              subset_size=min(subset_size, len(calibration)),
                              ignored_scope=nncf.IgnoredScope(types=kept))
        data['int8_scope'] = int8_scope
    _save_openvino(model, {**data, 'precision': precision, 'acceptance': acceptance or {}},
                   output)
    return output


def set_acceptance(path: str | os.PathLike, acceptance: dict[str, Any]) -> None:
    """Store the accuracy gate's figures in a reduced-precision OpenVINO IR file."""
    openvino = require('openvino')
    path = Path(path)
    data = read_export_metadata(path)
    _save_openvino(openvino.Core().read_model(str(path)), {**data, 'acceptance': acceptance},
                   path)


def _save_openvino(model: Any, metadata: dict[str, Any], output: Path) -> None:
    openvino = require('openvino')
    model.set_rt_info(json.dumps(metadata), [METADATA_KEY])
    # Staged, then moved: the file may be rewritten over the .bin its weights came from.
    with tempfile.TemporaryDirectory(dir=output.parent) as folder:
        staged = Path(folder) / output.name
        openvino.save_model(model, str(staged), compress_to_fp16=False)
        staged.with_suffix('.bin').replace(output.with_suffix('.bin'))
        staged.replace(output)


def reduced_variants(path: str | os.PathLike) -> dict[str, Path]:
    """Return the accepted reduced-precision files beside an fp32 exported file."""
    if not is_exported(path) or read_export_metadata(path)['precision'] != 'fp32':
        return {}
    variants = {}
    for precision in REDUCED_PRECISIONS:
        candidate = variant_path(path, precision)
        if candidate.is_file() and read_export_metadata(candidate).get('acceptance'):
            variants[precision] = candidate
    return variants


def export_onnx(model: CnnRnnClassifier, labels: list[str], preprocessing: Preprocessing,
                output: str | os.PathLike) -> Path:
    """Write ``model`` (with softmax, dynamic batch, metadata) to an ONNX file."""
    check_exportable(model.config)
    onnx = require('onnx')
    require('onnxscript')  # torch's exporter needs it; say so before it does, with the fix
    output = Path(output)
    wrapper = _Probabilities(model.eval()).eval()
    example = torch.zeros(2, 3, *preprocessing.input_size)
    batch = torch.export.Dim('batch', min=1, max=4096)
    with torch.no_grad():
        program = torch.onnx.export(wrapper, (example,), dynamo=True, optimize=True,
                                    input_names=['images'], output_names=['probabilities'],
                                    dynamic_shapes=({0: batch},), verbose=False)
    program.save(str(output))
    proto = onnx.load(str(output))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, _metadata(model, labels, preprocessing)
    onnx.save(proto, str(output))
    return output


def export_openvino(model: CnnRnnClassifier, labels: list[str], preprocessing: Preprocessing,
                    output: str | os.PathLike) -> Path:
    """Write ``model`` as OpenVINO IR (``.xml`` plus its ``.bin``), through ONNX."""
    openvino = require('openvino')
    output = Path(output)
    if output.suffix.lower() != '.xml':
        raise ValueError(f'an OpenVINO model is an .xml file (with a .bin beside it); got '
                         f'{str(output)!r}')
    with tempfile.TemporaryDirectory() as folder:
        onnx_path = export_onnx(model, labels, preprocessing, Path(folder) / 'model.onnx')
        converted = openvino.convert_model(str(onnx_path))
    converted.set_rt_info(_metadata(model, labels, preprocessing), [METADATA_KEY])
    openvino.save_model(converted, str(output), compress_to_fp16=False)
    return output


def check_exportable(config: ModelConfig) -> None:
    """Refuse what the exported files cannot hold: the temporal stage's per-camera state."""
    if config.temporal:
        raise ValueError(f'this model has a temporal stage ({config.temporal}): its state '
                         'per camera is carried by the torch backend only, and export does '
                         'not write it; run the checkpoint with backend torch')


def inspect_model_file(path: str | os.PathLike) -> CheckpointInfo:
    """
    Return what a model file holds (config, labels, preprocessing) without loading weights.

    The one answer to "checkpoint or exported model?": an exported file is read from its
    metadata, anything else as a checkpoint's header.
    """
    readable_file(path, 'model file')
    with reading(path, 'model file'):
        return read_exported(path) if is_exported(path) else inspect_checkpoint(path)
