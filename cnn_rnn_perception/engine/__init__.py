"""
The inference engine: camera frames in, class probabilities and stage timings out.

One module per backend over a shared base: ``torch_backend`` (the default: compiled trunk,
CUDA graphs), ``onnxruntime_backend`` and ``openvino_backend`` (an exported model). Build one
with ``create_engine`` from a checkpoint or an exported file; they all take the same frames and
give the same results, timings and errors.
"""

from cnn_rnn_perception.engine.base import (
    BACKENDS, Classification, DEVICES_HELP, EngineBase, EngineSettings, parse_device_name,
    precision_name, PRECISIONS, resolve_device, resolve_precision, StageTimes)
from cnn_rnn_perception.engine.factory import (
    BackendChoice, choose_backend, cpu_has_bf16, create_engine, installed_backends)
from cnn_rnn_perception.engine.torch_backend import (
    compile_scope, fold_batch_norm, InferenceEngine)

__all__ = [
    'BackendChoice', 'BACKENDS', 'choose_backend', 'Classification', 'compile_scope',
    'cpu_has_bf16', 'create_engine', 'installed_backends', 'DEVICES_HELP', 'EngineBase',
    'EngineSettings', 'fold_batch_norm', 'InferenceEngine', 'parse_device_name',
    'precision_name', 'PRECISIONS', 'resolve_device', 'resolve_precision', 'StageTimes']
