"""
The ``export`` command: a checkpoint to ONNX (ONNX Runtime, TensorRT) or OpenVINO IR.

The file format itself (what goes in, how the engines read it) is ``core.engine.export_format``.
Before an export is called a success it is run on generated camera frames through the same
preprocessing as the torch model, and the largest probability difference from the fp32 eager
model must be within ``PARITY_FP32``; otherwise the file is removed and the export fails.

Reduced precision (``--int8``, ``--bf16``, OpenVINO IR) is written beside the fp32 file and
kept only if it passes the accuracy gate on labelled held-out bags (``--validation``): its
accuracy within ``MAX_ACCURACY_DROP`` of the fp32 file's, and its top-1 the same as the fp32
file's on at least ``MIN_AGREEMENT`` of the frames. int8 is NNCF's post-training quantization,
calibrated on frames of the user's own bags (``--calibration``).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
import os
from pathlib import Path
import time
from typing import Any, Callable, Iterator, Sequence

from cnn_rnn_perception.core.checkpoint import load_checkpoint
from cnn_rnn_perception.core.engine import cpu_has_bf16, EngineSettings, open_exported, TorchEngine
from cnn_rnn_perception.core.engine.export_format import (
    check_exportable, export_onnx, export_openvino, FORMATS, INT8_SCOPES, PARITY_FP32,
    read_exported, REDUCED_PRECISIONS, set_acceptance, write_openvino_variant)
from cnn_rnn_perception.core.engine.factory import describe_acceptance
from cnn_rnn_perception.core.image_conversion import ImageRejected, message_to_frame
from cnn_rnn_perception.core.model import CnnRnnClassifier
from cnn_rnn_perception.core.model_config import Preprocessing
from cnn_rnn_perception.core.preprocess import frames_to_array_cpu
from cnn_rnn_perception.core.sample_frames import selftest_frames
from cnn_rnn_perception.tools import options
from cnn_rnn_perception.tools.evaluation.bags import BagFrame, BagSource
import numpy as np

# The accuracy gate a reduced-precision file must pass to be kept.
MAX_ACCURACY_DROP = 0.005  # accuracy, as a fraction: 0.5 points
MIN_AGREEMENT = 0.99  # of frames whose top-1 is the fp32 file's
REFUSED_EXIT_CODE = 3


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


@dataclass
class Gate:
    """One reduced-precision file against the fp32 file on the labelled held-out frames."""

    precision: str
    accepted: bool
    accuracy: float
    fp32_accuracy: float
    agreement: float
    frames: int
    ms_per_frame: float
    fp32_ms_per_frame: float
    path: str | None  # None: refused, and removed
    reason: str = ''

    def acceptance(self) -> dict[str, Any]:
        """Return what the file records about the gate it passed."""
        return {key: value for key, value in asdict(self).items()
                if key not in ('accepted', 'path', 'reason')}


def calibration_frames(bags: Sequence[str], preprocessing: Preprocessing, count: int,
                       topics: Sequence[str] | None = None) -> list[np.ndarray]:
    """
    Return up to ``count`` frames spread evenly over the bags, preprocessed as the engine.

    Only the picked frames are decoded and kept: a long drive costs its reading time, not its
    size in memory.
    """
    total = 0
    for path in bags:
        with BagSource(path) as bag:
            total += bag.message_count(bag.image_topics(topics))
    wanted = set(np.linspace(0, total - 1, min(count, total)).round().astype(int).tolist())
    picked = [frames_to_array_cpu([frame], [order], preprocessing)
              for _, frame, order in _decoded(bags, topics, keep=wanted.__contains__)]
    if not picked:
        raise ValueError(f'no readable image frames in the calibration bags {list(bags)}')
    return picked


def _decoded(bags: Sequence[str], topics: Sequence[str] | None, label_topic: str | None = None,
             keep: Callable[[int], bool] = lambda index: True
             ) -> Iterator[tuple[BagFrame, np.ndarray, str]]:
    """Yield (record, frame, colour order) for each image message ``keep`` takes, by index."""
    index = -1
    for path in bags:
        with BagSource(path) as bag:
            labels = bag.labels(label_topic) if label_topic else None
            for item in bag.frames(bag.image_topics(topics), labels):
                index += 1
                if not isinstance(item, BagFrame) or not keep(index):
                    continue
                try:
                    frame, order = message_to_frame(item.message)
                except ImageRejected:
                    continue  # calibration and the gate use the frames the node would use
                item.message = None
                yield item, frame, order


def _check_labelled(bags: Sequence[str], label_topic: str) -> None:
    for path in bags:
        with BagSource(path) as bag:
            if not len(bag.labels(label_topic)):
                raise ValueError(f'the validation bag {path!r} has no labels on '
                                 f'{label_topic!r}: give a labelled held-out bag and its '
                                 '--label-topic (a std_msgs/String topic)')


def gate_reduced(fp32_path: str | os.PathLike, precision: str, *,
                 validation: Sequence[str], label_topic: str,
                 calibration: Sequence[str] = (), calibration_count: int = 300,
                 int8_scope: str = 'trunk', topics: Sequence[str] | None = None) -> Gate:
    """
    Write the ``precision`` variant of an fp32 OpenVINO file, then keep it only if it passes.

    Both files classify every labelled frame of the ``validation`` bags, frame by frame in one
    pass; the variant is kept when its accuracy is within ``MAX_ACCURACY_DROP`` of fp32's and
    its top-1 equals fp32's on at least ``MIN_AGREEMENT`` of them. Otherwise it is removed, and
    the fp32 file stays.
    """
    if precision not in REDUCED_PRECISIONS:
        raise ValueError(f'precision must be one of {", ".join(REDUCED_PRECISIONS)}')
    if precision == 'bf16' and not cpu_has_bf16():
        raise ValueError('this CPU has no bf16 units (avx512_bf16, AMX): OpenVINO would compute '
                         'in f32 here, so the bf16 file cannot be checked; export on a CPU '
                         "that has them (the robot's, or one like it)")
    fp32_path = Path(fp32_path)
    _check_labelled(validation, label_topic)
    preprocessing = read_exported(fp32_path).preprocessing
    calibrated = (calibration_frames(calibration, preprocessing, calibration_count, topics)
                  if precision == 'int8' else [])
    path = write_openvino_variant(fp32_path, precision, calibrated,
                                  subset_size=calibration_count, int8_scope=int8_scope)
    settings = EngineSettings(device='cpu', backend='openvino')
    right = np.zeros(2, int)  # fp32, reduced
    agreed = frames = 0
    seconds = np.zeros(2)
    try:
        with open_exported(fp32_path, settings) as full, open_exported(path, settings) as reduced:
            for record, frame, order in _decoded(validation, topics, label_topic):
                if record.label is None:
                    continue
                said = []
                for index, engine in enumerate((full, reduced)):
                    started = time.perf_counter()
                    said.append(engine.infer([frame], color_order=order)[0].label)
                    seconds[index] += time.perf_counter() - started
                right += [label == record.label for label in said]
                agreed += said[0] == said[1]
                frames += 1
        if not frames:
            raise ValueError(f'no frame of the validation bags {list(validation)} falls after '
                             f'a label on {label_topic!r}')
    except BaseException:
        _remove(path)
        raise
    gate = Gate(precision=precision, accepted=False, accuracy=float(right[1] / frames),
                fp32_accuracy=float(right[0] / frames), agreement=agreed / frames,
                frames=frames, ms_per_frame=float(seconds[1] * 1e3 / frames),
                fp32_ms_per_frame=float(seconds[0] * 1e3 / frames), path=None)
    drop = gate.fp32_accuracy - gate.accuracy
    reasons = ([f'accuracy drops {100 * drop:.1f} points (at most '
                f'{100 * MAX_ACCURACY_DROP:.1f} allowed)'] if drop > MAX_ACCURACY_DROP else [])
    reasons += ([f'top-1 agrees with fp32 on {100 * gate.agreement:.1f}% of frames (at least '
                 f'{100 * MIN_AGREEMENT:.0f}% needed)'] if gate.agreement < MIN_AGREEMENT
                else [])
    if reasons:
        _remove(path)
        gate.reason = '; '.join(reasons)
        return gate
    gate.accepted, gate.path = True, str(path)
    set_acceptance(path, gate.acceptance())
    return gate


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_suffix('.bin').unlink(missing_ok=True)


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
    reduced = parser.add_argument_group(
        'reduced precision (openvino): written beside the fp32 file (model.int8.xml, '
        'model.bf16.xml) and kept only if, on the labelled --validation bags, its accuracy is '
        f'within {100 * MAX_ACCURACY_DROP:.1f} points of fp32 and its top-1 agrees with fp32 on '
        f'at least {100 * MIN_AGREEMENT:.0f}% of frames; otherwise removed, the fp32 file kept, '
        f'and the exit code is {REFUSED_EXIT_CODE}. Backend auto in the node finds the kept '
        'ones and times them with the rest')
    reduced.add_argument('--int8', action='store_true',
                         help="int8 weights and activations (NNCF's post-training "
                              'quantization): fastest on CPUs with VNNI or AMX')
    reduced.add_argument('--bf16', action='store_true',
                         help='computed in bf16 (CPUs with avx512_bf16 or AMX; export on one)')
    reduced.add_argument('--calibration', nargs='+', metavar='BAG', default=[],
                         help="with --int8: bags of the robot's own cameras, whose frames set "
                              'the int8 activation ranges (not the validation bags)')
    reduced.add_argument('--calibration-frames', type=int, default=300, metavar='N',
                         help='frames taken evenly from the calibration bags (default: 300)')
    reduced.add_argument('--int8-scope', choices=tuple(INT8_SCOPES), default='trunk',
                         help="trunk: the CNN's convolutions, where the time goes; the "
                              'recurrent encoder and head stay in float. all: every op NNCF '
                              'can quantize, the RNN too (on the demo model the gate refuses '
                              'it). Default: %(default)s')
    reduced.add_argument('--validation', nargs='+', metavar='BAG', default=[],
                         help='labelled held-out bags the accuracy gate runs on')
    options.add(reduced, '--label-topic', '--topics')


def main(args: argparse.Namespace) -> int:
    """Export, check and report."""
    check_reduced_arguments(args)
    checkpoint = load_checkpoint(args.checkpoint)
    print(f'exporting {args.checkpoint} ({checkpoint.config.backbone} '
          f'{checkpoint.config.sequence} {checkpoint.config.rnn}) to {args.format}')
    report = export(checkpoint.model, checkpoint.labels, checkpoint.preprocessing,
                    fmt=args.format, output=args.output)
    print(f'wrote {report.path} ({report.size_mb:.1f} MB): labels, config and preprocessing '
          f'in its metadata, batch size dynamic')
    print(f'parity on {report.frames} generated frames: max |p - torch fp32| = '
          f'{report.max_abs_diff:.2e} (limit {PARITY_FP32:.0e})')
    refused = False
    for precision in [name for name in REDUCED_PRECISIONS if getattr(args, name)]:
        gate = gate_reduced(report.path, precision, validation=args.validation,
                            label_topic=args.label_topic, calibration=args.calibration,
                            calibration_count=args.calibration_frames,
                            int8_scope=args.int8_scope, topics=args.topics)
        print(format_gate(gate))
        refused |= not gate.accepted
    return REFUSED_EXIT_CODE if refused else 0


def format_gate(gate: Gate) -> str:
    """Say what the gate measured and what became of the file."""
    figures = (f'{describe_acceptance(gate.acceptance())}; {gate.ms_per_frame:.1f} ms a frame '
               f'against {gate.fp32_ms_per_frame:.1f} in fp32')
    if gate.accepted:
        return f'{gate.precision}: accepted, wrote {gate.path}: {figures}'
    return f'{gate.precision}: REFUSED ({gate.reason}), the fp32 file is kept: {figures}'


def check_reduced_arguments(args: argparse.Namespace) -> None:
    """Refuse, before any work, what a reduced-precision export cannot do as asked."""
    wanted = [name for name in REDUCED_PRECISIONS if getattr(args, name)]
    if not wanted:
        return
    if args.format != 'openvino':
        raise ValueError(f'--{wanted[0]} is written for --format openvino (OpenVINO IR, '
                         'quantized by NNCF); export with --format openvino --output model.xml')
    if not args.validation or not args.label_topic:
        raise ValueError('a reduced-precision file is kept only after its accuracy gate: give '
                         '--validation BAG... (labelled, held out) and --label-topic TOPIC')
    if args.int8 and not args.calibration:
        raise ValueError('--int8 calibrates on your own frames: give --calibration BAG... '
                         "(the robot's cameras; not the validation bags)")
    if args.calibration_frames < 1:
        raise ValueError('--calibration-frames must be >= 1')
