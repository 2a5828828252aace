"""
Export a checkpoint for deployment runtimes: ONNX (ONNX Runtime, TensorRT) and OpenVINO IR.

The whole model goes into the file, softmax included (images [B, 3, H, W] normalised, batch
dynamic, to probabilities [B, classes]), with the labels, the model config and the
preprocessing in the file's own metadata, so the exported file alone is enough to run it.
Before an export is called a success it is run on generated camera frames through the same
preprocessing as the torch model, and the largest probability difference from the fp32 eager
model must be within ``PARITY_FP32``; otherwise the file is removed and the export fails.
"""

from __future__ import annotations

from dataclasses import dataclass
import json
import os
from pathlib import Path
import tempfile

from cnn_rnn_perception.model import (
    CHECKPOINT_FORMAT, CheckpointInfo, CnnRnnClassifier, ModelConfig, Preprocessing)
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


@dataclass
class ExportReport:
    """What ``export`` wrote and how closely the file reproduces the torch model."""

    path: str
    file_format: str
    max_abs_diff: float
    frames: int
    size_mb: float


def check_exportable(config: ModelConfig) -> None:
    """Refuse what the exported files cannot hold: the temporal stage's per-camera state."""
    if config.temporal:
        raise ValueError(f'this model has a temporal stage ({config.temporal}): its state '
                         'per camera is carried by the torch backend only, and export does '
                         'not write it; run the checkpoint with backend torch')


def export(model: CnnRnnClassifier, labels: list[str], preprocessing: Preprocessing, *,
           fmt: str, output: str | os.PathLike, frames: int = 6) -> ExportReport:
    """Export, then check parity on generated frames; a file that disagrees is removed."""
    from cnn_rnn_perception.engine import EngineSettings, InferenceEngine
    from cnn_rnn_perception.engine.exported import open_exported
    from cnn_rnn_perception.selftest import selftest_frames

    if fmt not in FORMATS:
        raise ValueError(f'format must be one of {", ".join(FORMATS)}; got {fmt!r}')
    check_exportable(model.config)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    writer = export_onnx if fmt == 'onnx' else export_openvino
    writer(model, labels, preprocessing, output)
    written = [output] + ([output.with_suffix('.bin')] if fmt == 'openvino' else [])
    try:
        test_frames, orders = selftest_frames(frames)
        settings = EngineSettings(device='cpu', precision='fp32', compile_trunk=False,
                                  max_batch=frames, warmup_iterations=1)
        with InferenceEngine(model, labels=labels, preprocessing=preprocessing,
                             settings=settings) as reference:
            want = [r.probabilities for r in reference.infer(test_frames, color_order=orders)]
        backend = 'onnxruntime' if fmt == 'onnx' else 'openvino'
        with open_exported(output, EngineSettings(device='cpu', backend=backend,
                                                  max_batch=frames)) as exported:
            got = [r.probabilities for r in exported.infer(test_frames, color_order=orders)]
        difference = max(float(abs(a - b).max()) for a, b in zip(got, want))
        if difference > PARITY_FP32:
            raise ValueError(f'the exported model differs from the torch model by up to '
                             f'{difference:.2e} in probability (limit {PARITY_FP32:.0e}); '
                             'not written')
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    size = sum(path.stat().st_size for path in written) / 2**20
    return ExportReport(str(output), fmt, difference, frames, size)
