"""
The ``openvino`` backend: an exported model (ONNX or OpenVINO IR) compiled by OpenVINO.

Intel CPUs, integrated GPUs and NPUs. ``device: cpu`` or ``auto`` runs on the CPU;
``OPENVINO_DEVICE`` (GPU, NPU, AUTO) picks another OpenVINO device where it is present.
"""

from __future__ import annotations

import logging
import os

from cnn_rnn_perception.core.engine.base import cpu_has_bf16
from cnn_rnn_perception.core.engine.export_format import require
from cnn_rnn_perception.core.engine.exported import ExportedEngine
import numpy as np
import torch

_LOG = logging.getLogger('cnn_rnn_perception.core.engine')


def compile_properties(file_precision: str) -> dict[str, str]:
    """Return what OpenVINO compiles a file of ``file_precision`` (fp32, bf16, int8) with."""
    return {'PERFORMANCE_HINT': 'LATENCY',
            'INFERENCE_PRECISION_HINT': 'bf16' if file_precision == 'bf16' else 'f32'}


class OpenVinoEngine(ExportedEngine):
    """An exported model compiled by OpenVINO."""

    backend = 'openvino'

    def _load(self, path: str, device: str) -> None:
        openvino = require('openvino')
        if device.startswith('cuda'):
            raise ValueError('OpenVINO runs on Intel devices (CPU, GPU, NPU), not CUDA: set '
                             'device to cpu (and OPENVINO_DEVICE for an Intel GPU or NPU), or '
                             'use backend onnxruntime or torch on an NVIDIA GPU')
        core = openvino.Core()
        self.target = os.environ.get('OPENVINO_DEVICE', 'CPU')
        if self.target not in core.available_devices and self.target != 'AUTO':
            raise ValueError(f'OPENVINO_DEVICE={self.target} is not here; OpenVINO sees '
                             f'{core.available_devices}')
        self.device = torch.device('cpu')
        # f32 explicitly unless the file is the bf16 variant: on CPUs with bf16 units the CPU
        # plugin computes in bf16 by default, which moved probabilities by 1.4e-3 here, 14 times
        # the fp32 parity limit. An int8 file's unquantized ops stay f32, as they were when it
        # passed its accuracy gate.
        if self.file_precision == 'bf16' and self.target == 'CPU' and not cpu_has_bf16():
            _LOG.warning('%s is the bf16 variant, and this CPU has no bf16 units (avx512_bf16, '
                         'AMX): OpenVINO runs it in f32; use the fp32 file', path)
        compiled = core.compile_model(core.read_model(path), self.target,
                                      compile_properties(self.file_precision))
        self._request = compiled.create_infer_request()
        self._compiled = compiled

    def _run(self, images: np.ndarray) -> np.ndarray:
        self._request.infer({0: images})
        return self._request.get_output_tensor(0).data.copy()

    def _release(self) -> None:
        self._request = self._compiled = None
