"""
The core: everything that turns camera frames into class probabilities, without ROS.

``model`` (the CNN-RNN network, its config and checkpoints), ``backbones`` (torchvision
trunks), ``preprocess`` and ``image_conversion`` (frames in), ``postprocess`` (ranking and
per-camera smoothing), ``sample_frames`` (deterministic test frames) and ``engine`` (the
inference engine and its backends). Nothing here imports ``ros`` or ``tools``.
"""

__all__ = ['backbones', 'engine', 'image_conversion', 'model', 'postprocess', 'preprocess',
           'sample_frames']
