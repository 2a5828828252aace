"""
Engines for exported models: the same frame pipeline, a deployment runtime in place of torch.

Frames are resized and normalised on the host by OpenCV alone (no torch op runs on this path:
one would wake torch's OpenMP pool, whose threads spin after it and took 5 ms a frame from the
runtime's own pool on two cores), then handed to the runtime as a contiguous float32
[B, 3, H, W] array; what comes back is already probabilities (the export includes the
softmax). ``onnxruntime_backend`` and ``openvino_backend`` supply only ``_load`` and ``_run``.
"""

from __future__ import annotations

import abc
import os
import time

from cnn_rnn_perception.core.engine.base import EngineBase, EngineSettings
from cnn_rnn_perception.core.engine.export_format import checkpoint_info, read_export_metadata
from cnn_rnn_perception.core.preprocess import frames_to_array_cpu
import numpy as np


class ExportedEngine(EngineBase):
    """An exported model (ONNX or OpenVINO IR) behind the engine's frame pipeline."""

    backend = ''

    def __init__(self, path: str | os.PathLike, settings: EngineSettings) -> None:
        """Load the file, read its labels and preprocessing, and warm it up."""
        metadata = read_export_metadata(path)
        info = checkpoint_info(metadata)
        super().__init__(labels=info.labels, preprocessing=info.preprocessing,
                         settings=settings)
        self.config = info.config
        self.path = os.fspath(path)
        # What the file computes in, and for a reduced-precision file the accuracy it passed.
        self.file_precision: str = metadata['precision']
        self.acceptance: dict = metadata.get('acceptance') or {}
        try:
            self._load(self.path, settings.device)
            self.warmup()
        except BaseException:
            self.close()
            raise

    @abc.abstractmethod
    def _load(self, path: str, device: str) -> None:
        """Load the file on ``device``; set ``self.device`` and ``self.target``."""

    @abc.abstractmethod
    def _run(self, images: np.ndarray) -> np.ndarray:
        """Float32 [B, 3, H, W] in, probabilities [B, classes] out."""

    @abc.abstractmethod
    def _release(self) -> None:
        """Drop what the runtime holds."""

    def close(self) -> None:
        """Drop the runtime's model, and the export made for it, if any."""
        if hasattr(self, 'target'):
            self._release()
        folder = getattr(self, '_export_folder', None)
        if folder is not None:
            folder.cleanup()
            self._export_folder = None

    def _probabilities(self, frames: list[np.ndarray], orders: list[str],
                       slots: list[int], fresh: list[bool]) -> tuple[np.ndarray, float]:
        images = frames_to_array_cpu(frames, orders, self.preprocessing)
        ready = time.perf_counter()
        return self._run(images), ready

    @property
    def precision(self) -> str:
        """Return what the model computes in: fp32, bf16 or int8."""
        return self.file_precision

    def describe(self) -> str:
        """Return a one-line summary for logs and diagnostics."""
        config = self.config
        words = [self.backend, config.backbone, config.sequence,
                 f'{config.rnn}({config.hidden_size})']
        words += ['bidirectional'] if config.bidirectional else []
        words += [config.pooling, f'{config.input_size[0]}x{config.input_size[1]}',
                  f'on {self.target}', self.precision]
        return ' '.join(words)
