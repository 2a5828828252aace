"""
The ``export`` command: a checkpoint to ONNX (ONNX Runtime, TensorRT) or OpenVINO IR.

The file format itself (what goes in, how the engines read it) is ``core.engine.export_format``.
Before an export is called a success it is run on generated camera frames through the same
preprocessing as the torch model, and the largest probability difference from the fp32 eager
model must be within ``PARITY_FP32``; otherwise the file is removed and the export fails.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
import os
from pathlib import Path

from cnn_rnn_perception.core.engine import EngineSettings, open_exported, TorchEngine
from cnn_rnn_perception.core.engine.export_format import (
    check_exportable, export_onnx, export_openvino, FORMATS, PARITY_FP32)
from cnn_rnn_perception.core.model import CnnRnnClassifier, load_checkpoint, Preprocessing
from cnn_rnn_perception.core.sample_frames import selftest_frames
from cnn_rnn_perception.tools import options


@dataclass
class ExportReport:
    """What ``export`` wrote and how closely the file reproduces the torch model."""

    path: str
    file_format: str
    max_abs_diff: float
    frames: int
    size_mb: float


def export(model: CnnRnnClassifier, labels: list[str], preprocessing: Preprocessing, *,
           fmt: str, output: str | os.PathLike, frames: int = 6) -> ExportReport:
    """Export, then check parity on generated frames; a file that disagrees is removed."""
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
        with TorchEngine(model, labels=labels, preprocessing=preprocessing,
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the export command's flags."""
    parser.description = (
        'Export the whole model (trunk, sequencer, RNN, pooling, head, softmax) with a dynamic '
        "batch axis; the labels, model config and preprocessing go into the file's metadata, "
        'so the file alone runs it (model.checkpoint of the node, with backend onnxruntime, '
        'openvino or auto). The export is checked on generated frames against the fp32 torch '
        'model and removed if any probability differs by more than 1e-4.')
    parser.add_argument('checkpoint', metavar='CHECKPOINT')
    parser.add_argument('--format', required=True, choices=FORMATS,
                        help='onnx (ONNX Runtime, TensorRT) or openvino (IR: .xml and .bin)')
    options.add(parser, '--output', required=True, metavar='PATH',
                help='model.onnx, or model.xml for openvino')


def main(args: argparse.Namespace) -> int:
    """Export, check and report."""
    checkpoint = load_checkpoint(args.checkpoint)
    print(f'exporting {args.checkpoint} ({checkpoint.config.backbone} '
          f'{checkpoint.config.sequence} {checkpoint.config.rnn}) to {args.format}')
    report = export(checkpoint.model, checkpoint.labels, checkpoint.preprocessing,
                    fmt=args.format, output=args.output)
    print(f'wrote {report.path} ({report.size_mb:.1f} MB): labels, config and preprocessing '
          f'in its metadata, batch size dynamic')
    print(f'parity on {report.frames} generated frames: max |p - torch fp32| = '
          f'{report.max_abs_diff:.2e} (limit {PARITY_FP32:.0e})')
    return 0
