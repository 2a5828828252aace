"""
The inference engine: camera frames in, class probabilities and stage timings out.

One module per backend over a shared base: ``torch_backend`` (the default: compiled trunk,
CUDA graphs), ``onnxruntime_backend`` and ``openvino_backend`` (an exported model, in the
format ``export_format`` defines). Build one with ``create_engine`` (``factory``) from a
checkpoint, an exported file or a config; they all take the same frames and give the same
results, timings and errors. ``streams`` keeps each camera's row of a temporal model's state.
"""

from cnn_rnn_perception.core.engine.base import (
    BACKENDS, cpu_has_bf16, DEVICES_HELP, EngineBase, EngineSettings, FrameResult,
    parse_device_name, precision_name, PRECISIONS, resolve_device, resolve_precision, StageTimes)
from cnn_rnn_perception.core.engine.export_format import inspect_model_file, is_exported
from cnn_rnn_perception.core.engine.factory import (
    BackendChoice, choose_backend, create_engine, installed_backends, model_parts, open_exported)
from cnn_rnn_perception.core.engine.torch_backend import (
    compile_scope, fold_batch_norm, TorchEngine)

__all__ = [
    'BackendChoice', 'BACKENDS', 'choose_backend', 'compile_scope', 'cpu_has_bf16',
    'create_engine', 'DEVICES_HELP', 'EngineBase', 'EngineSettings', 'fold_batch_norm',
    'FrameResult', 'inspect_model_file', 'installed_backends', 'is_exported', 'model_parts',
    'open_exported', 'parse_device_name', 'precision_name', 'PRECISIONS', 'resolve_device',
    'resolve_precision', 'StageTimes', 'TorchEngine']
