"""
The exported-model format: the ONNX and OpenVINO IR files this package writes and reads.

The whole model goes into the file, softmax included (images [B, 3, H, W] normalised, batch
dynamic, to probabilities [B, classes]), with the labels, the model config and the
preprocessing in the file's own metadata, so the exported file alone is enough to run it.
The engines read it (``read_exported``); the ``export`` command writes it and checks that
the file reproduces the torch model within ``PARITY_FP32``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import tempfile

from cnn_rnn_perception.core.model import (
    CHECKPOINT_FORMAT, CheckpointInfo, CnnRnnClassifier, inspect_checkpoint, ModelConfig,
    Preprocessing)
import torch

FORMATS = ('onnx', 'openvino')
METADATA_KEY = 'cnn_rnn_perception'
EXPORT_FORMAT = 'cnn_rnn_perception.export/1'
PARITY_FP32 = 1e-4
# Extensions an exported model has; anything else is a torch checkpoint.
EXPORTED_SUFFIXES = ('.onnx', '.xml')
INSTALL_HINT = {'onnxruntime': 'pip install onnxruntime (or: pip install .[onnx])',
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
                       'preprocessing': preprocessing.to_dict()})


def read_exported(path: str | os.PathLike) -> CheckpointInfo:
    """Return the config, labels and preprocessing stored in an exported file."""
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
    data = json.loads(text)
    if data.get('format') != EXPORT_FORMAT:
        raise ValueError(f'{str(path)!r}: unknown export format {data.get("format")!r}')
    return CheckpointInfo(ModelConfig.from_dict(data['config']), list(data['labels']),
                          Preprocessing(**data['preprocessing']))


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
    return read_exported(path) if is_exported(path) else inspect_checkpoint(path)
