"""
CNN-RNN scene classification for ROS 2 navigation stacks.

Three parts, each over the one before it and never the other way:

- ``core``: the model, its checkpoints, preprocessing, postprocessing and the inference
  engine (torch, ONNX Runtime, OpenVINO). No ROS imports; what the robot runs.
- ``ros``: the ``perception_node`` lifecycle node, a thin rclpy adapter over the core.
- ``tools``: the ``cnn_rnn_perception`` command and its subcommands (train, evaluate, replay,
  export, bench, demo, ...).

The stable way in for Python users is this top level::

    from cnn_rnn_perception import CnnRnnClassifier, create_engine, EngineSettings, ModelConfig

Names load on first use, so ``import cnn_rnn_perception`` (and the command's ``--help``)
stays fast and torch-free.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = '0.1.0'

# public name -> the core module that defines it
_PUBLIC = {
    'ModelConfig': 'core.model_config', 'preset': 'core.model_config',
    'Preprocessing': 'core.model_config', 'CnnRnnClassifier': 'core.model',
    'save_checkpoint': 'core.checkpoint', 'load_checkpoint': 'core.checkpoint',
    'inspect_checkpoint': 'core.checkpoint',
    'inspect_model_file': 'core.engine', 'create_engine': 'core.engine',
    'EngineSettings': 'core.engine', 'FrameResult': 'core.engine',
    'message_to_frame': 'core.image_conversion', 'ImageRejected': 'core.image_conversion',
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(f'{__name__}.{_PUBLIC[name]}'), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
