"""
What a model is: ``ModelConfig`` (its architecture) and ``Preprocessing`` (what it reads).

Both travel inside every checkpoint as plain values, so a checkpoint rebuilds its model and
feeds it exactly as in training. ``ModelConfig``'s user-facing fields carry their help,
choices and ranges (``user_settings``): the one source for the commands' model flags and the
node's ``model.*`` parameters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cnn_rnn_perception.core.backbones import BACKBONES, check_backbone_name, feature_map_size

SEQUENCES = ('spatial', 'rows', 'columns')
RNNS = ('lstm', 'gru')
POOLINGS = ('last', 'mean', 'max', 'attention')
TEMPORALS = ('', 'gru', 'lstm')
MOTION_INPUTS = ('frame_difference', 'none')
COLOR_ORDERS = ('rgb', 'bgr')
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f'{name} must be one of {", ".join(choices)}; got {value!r}')


def _setting(default: Any, help_text: str, *, choices: tuple[str, ...] = (),
             limits: tuple[float, float] | None = None) -> Any:
    """Declare a user-facing model field: its default, help, choices and range."""
    return field(default=default,
                 metadata={'help': help_text, 'choices': choices, 'limits': limits})


def user_settings() -> list[dataclasses.Field]:
    """
    Return the ModelConfig fields a user sets, in order: every field but num_classes.

    The one source for the CLI's model flags and the node's ``model.*`` parameters: names,
    defaults, help, choices and ranges all come from here.
    """
    return [f for f in dataclasses.fields(ModelConfig) if 'help' in f.metadata]


@dataclass(frozen=True)
class ModelConfig:
    """
    Everything that defines the network; stored in every checkpoint.

    Invalid values and combinations raise ``ValueError`` naming the field and the fix.
    """

    # Every field but num_classes (which the labels decide) is a setting users make: the CLI's
    # model flags and the node's model.* parameters are generated from these fields, with
    # their help, choices and ranges from the metadata (see ``user_settings``).
    num_classes: int = 6
    backbone: str = _setting('resnet18', 'CNN trunk', choices=tuple(BACKBONES))
    sequence: str = _setting('spatial', 'how the feature map becomes a sequence: every '
                             'location (spatial), horizontal strips (rows) or vertical strips '
                             '(columns)', choices=SEQUENCES)
    strip: int = _setting(1, 'feature-map rows or columns per timestep', limits=(1, 64))
    rnn: str = _setting('lstm', 'recurrent encoder over the feature map', choices=RNNS)
    hidden_size: int = _setting(256, 'RNN hidden size', limits=(1, 4096))
    num_layers: int = _setting(1, 'RNN layers', limits=(1, 8))
    bidirectional: bool = _setting(False, 'bidirectional RNN')
    dropout: float = _setting(0.0, 'dropout between RNN layers and before the head',
                              limits=(0.0, 0.99))
    pooling: str = _setting('last', 'RNN outputs to one vector', choices=POOLINGS)
    input_size: tuple[int, int] = _setting((224, 224), 'model input [height, width] in pixels')
    trunk_weights: str = _setting('', 'local torchvision weights file for the trunk (empty: '
                                  'random initialisation, said in the log)')
    # Off ('') by default: checkpoints written before the temporal stage load unchanged.
    temporal: str = _setting('', 'a recurrent stage across frames, its state carried per '
                             'camera: gru or lstm; empty classifies each frame alone',
                             choices=TEMPORALS)
    temporal_hidden_size: int = _setting(128, 'state size of the temporal stage',
                                         limits=(1, 4096))
    motion: str = _setting('frame_difference', 'with temporal: what the CNN sees of the '
                           "camera's previous frame: frame_difference (this frame minus the "
                           'last as three more input channels, so the trunk sees motion) or '
                           'none (each frame alone; time enters after pooling)',
                           choices=MOTION_INPUTS)

    def __post_init__(self) -> None:
        # Checkpoints and YAML give lists; the config is hashable and compares equal as a tuple.
        object.__setattr__(self, 'input_size', tuple(int(v) for v in self.input_size))
        if self.num_classes < 1:
            raise ValueError(f'num_classes must be >= 1; got {self.num_classes}')
        check_backbone_name(self.backbone)
        _choice('sequence', self.sequence, SEQUENCES)
        _choice('rnn', self.rnn, RNNS)
        _choice('pooling', self.pooling, POOLINGS)
        _choice('temporal', self.temporal, TEMPORALS)
        _choice('motion', self.motion, MOTION_INPUTS)
        if self.temporal_hidden_size < 1:
            raise ValueError(f'temporal_hidden_size must be >= 1; got {self.temporal_hidden_size}')
        if self.hidden_size < 1:
            raise ValueError(f'hidden_size must be >= 1; got {self.hidden_size}')
        if self.num_layers < 1:
            raise ValueError(f'num_layers must be >= 1; got {self.num_layers}')
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f'dropout must be in [0, 1); got {self.dropout}')
        if len(self.input_size) != 2 or min(self.input_size) < 32:
            raise ValueError('input_size must be (height, width), each at least 32 pixels; '
                             f'got {self.input_size}')
        if self.strip < 1:
            raise ValueError(f'strip must be >= 1; got {self.strip}')
        if self.sequence == 'spatial' and self.strip != 1:
            raise ValueError('strip applies only to sequence rows or columns; '
                             'set strip=1 for sequence spatial')
        if self.sequence in ('rows', 'columns'):
            self._check_strip_divides()

    def _check_strip_divides(self) -> None:
        height, width = self.feature_map
        axis, extent = ('height', height) if self.sequence == 'rows' else ('width', width)
        if extent % self.strip:
            divisors = [d for d in range(1, extent + 1) if extent % d == 0]
            raise ValueError(
                f'strip={self.strip} does not divide the feature map {axis} {extent} '
                f'({self.backbone} at input_size {self.input_size}); use a strip in '
                f'{divisors} or change input_size')

    @property
    def feature_map(self) -> tuple[int, int]:
        """Return the trunk output (height, width) at ``input_size``."""
        return feature_map_size(self.backbone, self.input_size)

    @property
    def channels(self) -> int:
        """Return the trunk output channels."""
        return check_backbone_name(self.backbone).channels

    @property
    def sequence_length(self) -> int:
        """Return the number of RNN timesteps per image."""
        height, width = self.feature_map
        if self.sequence == 'spatial':
            return height * width
        return (height if self.sequence == 'rows' else width) // self.strip

    @property
    def step_size(self) -> int:
        """Return the values per RNN timestep: one location's channels, or one whole strip."""
        height, width = self.feature_map
        if self.sequence == 'spatial':
            return self.channels
        if self.sequence == 'rows':
            return self.channels * self.strip * width
        return self.channels * height * self.strip

    @property
    def directions(self) -> int:
        """Return 1, or 2 for a bidirectional RNN."""
        return 2 if self.bidirectional else 1

    @property
    def sees_motion(self) -> bool:
        """Return True if the trunk reads each frame's difference from the stream's last."""
        return bool(self.temporal) and self.motion == 'frame_difference'

    @property
    def trunk_input_channels(self) -> int:
        """Return 3 (the image), or 6 (the image and its change) for a model that sees motion."""
        return 6 if self.sees_motion else 3

    @property
    def temporal_state_parts(self) -> int:
        """Return the recurrent tensors of the temporal stage: 0 (off), 1 (GRU), 2 (LSTM)."""
        return {'': 0, 'gru': 1, 'lstm': 2}[self.temporal]

    def to_dict(self) -> dict[str, Any]:
        """Return plain types only, so ``torch.load(weights_only=True)`` can read it back."""
        data = dataclasses.asdict(self)
        data['input_size'] = list(self.input_size)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from ``to_dict`` output; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f'unknown model config fields {unknown}; known: {sorted(known)}')
        if data.get('temporal') and 'motion' not in data:
            # Temporal checkpoints written before the trunk saw motion read vectors only.
            data = {**data, 'motion': 'none'}
        return cls(**data)


# The seed's three examples, by name. seed-rows keeps the seed's LSTM input width (512 x 7) but
# with one real feature-map row per timestep; see CnnRnnClassifier.to_sequence.
PRESETS: dict[str, dict[str, Any]] = {
    'seed-spatial': {'num_classes': 10, 'backbone': 'resnet18', 'sequence': 'spatial',
                     'rnn': 'lstm', 'hidden_size': 256, 'pooling': 'last'},
    'seed-rows': {'num_classes': 10, 'backbone': 'resnet18', 'sequence': 'rows', 'strip': 1,
                  'rnn': 'lstm', 'hidden_size': 256, 'pooling': 'last'},
    'seed-bidirectional': {'num_classes': 10, 'backbone': 'resnet18', 'sequence': 'spatial',
                           'rnn': 'lstm', 'hidden_size': 256, 'bidirectional': True,
                           'pooling': 'last'},
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Return a named preset's config, with any fields overridden."""
    if name not in PRESETS:
        raise ValueError(f'unknown preset {name!r}; choose one of {", ".join(PRESETS)}')
    return ModelConfig(**{**PRESETS[name], **overrides})


@dataclass(frozen=True)
class Preprocessing:
    """How a camera frame becomes the model's input tensor; stored in every checkpoint."""

    input_size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    color_order: str = 'rgb'

    def __post_init__(self) -> None:
        for name in ('input_size', 'mean', 'std'):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _choice('color_order', self.color_order, COLOR_ORDERS)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError('mean and std need three values each, std all positive; '
                             f'got mean={self.mean} std={self.std}')

    @classmethod
    def for_config(cls, config: ModelConfig) -> Preprocessing:
        """Use ImageNet normalisation in RGB order at the model's input size."""
        return cls(input_size=config.input_size)

    def to_dict(self) -> dict[str, Any]:
        """Return plain types only, as stored in a checkpoint."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}
