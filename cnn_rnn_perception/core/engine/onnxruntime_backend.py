"""
The ``onnxruntime`` backend: an exported ONNX model run by ONNX Runtime.

On the CPU with the CPU provider; on a GPU (``device: cuda``) with the TensorRT provider, then
the CUDA provider, whichever the installed onnxruntime has (``onnxruntime-gpu`` on a robot; on a
Jetson, NVIDIA's onnxruntime builds carry TensorRT).
"""

from __future__ import annotations

from cnn_rnn_perception.core.engine.export_format import require
from cnn_rnn_perception.core.engine.exported import ExportedEngine
import numpy as np
import torch

GPU_PROVIDERS = ('TensorrtExecutionProvider', 'CUDAExecutionProvider')


class OnnxRuntimeEngine(ExportedEngine):
    """An exported ONNX model run by ONNX Runtime."""

    backend = 'onnxruntime'

    def _load(self, path: str, device: str) -> None:
        onnxruntime = require('onnxruntime')
        available = onnxruntime.get_available_providers()
        gpu = [provider for provider in GPU_PROVIDERS if provider in available]
        if device.startswith('cuda') and not gpu:
            raise ValueError(f'device {device!r} with onnxruntime needs the CUDA or TensorRT '
                             f'provider; this onnxruntime has {available} (install '
                             'onnxruntime-gpu, or set device to cpu)')
        use_gpu = bool(gpu) and device != 'cpu'
        providers = gpu + ['CPUExecutionProvider'] if use_gpu else ['CPUExecutionProvider']
        self.device = torch.device('cuda' if use_gpu else 'cpu')
        self.target = providers[0].replace('ExecutionProvider', '')
        self._session = onnxruntime.InferenceSession(path, providers=providers)
        self._input = self._session.get_inputs()[0].name

    def _run(self, images: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: images})[0]

    def _release(self) -> None:
        self._session = None
