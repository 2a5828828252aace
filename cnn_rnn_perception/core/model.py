"""
The CNN-RNN scene model: a torchvision trunk whose feature map is read as a sequence.

The forward pass has four stages, each a method:

1. ``features``: the CNN trunk turns images [B, 3, H, W] into a feature map [B, C, h, w].
2. ``to_sequence``: the feature map becomes a sequence [B, T, D] (``spatial``: every location
   in raster order; ``rows``: horizontal strips top to bottom; ``columns``: vertical strips
   left to right).
3. ``encode``: an LSTM or GRU reads the sequence.
4. ``pool``: the RNN outputs become one vector per image (``last``, ``mean``, ``max`` or
   ``attention``).
5. Optionally ``temporal``: a second recurrent layer (GRU or LSTM) reads those vectors across
   frames, one step per frame, with its state carried per camera (LRCN). The ``head`` then
   reads the temporal output instead of the frame's own vector. With ``motion``
   ``frame_difference`` (the default for temporal models) the trunk also reads the camera's
   change since its previous frame as three more input channels, so motion is seen inside the
   feature map, before pooling (the early fusion of TSN's RGB difference).

No ROS imports here: this module is the core that the node, the tools and the tests share.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
import logging
import os
from typing import Any, Iterator

from cnn_rnn_perception.core.backbones import (
    BACKBONES, build_trunk, check_backbone_name, feature_map_size, state_dict_differences,
    widen_first_convolution)
import torch
from torch import nn

_LOG = logging.getLogger(__name__)

SEQUENCES = ('spatial', 'rows', 'columns')
RNNS = ('lstm', 'gru')
POOLINGS = ('last', 'mean', 'max', 'attention')
TEMPORALS = ('', 'gru', 'lstm')
MOTION_INPUTS = ('frame_difference', 'none')
COLOR_ORDERS = ('rgb', 'bgr')
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_FORMAT = 'cnn_rnn_perception.checkpoint/1'


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


RecurrentState = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class CnnRnnClassifier(nn.Module):
    """Classifies images with a CNN trunk whose feature map an LSTM/GRU reads as a sequence."""

    def __init__(self, config: ModelConfig, *, load_pretrained: bool = True) -> None:
        """Build the network; ``load_pretrained=False`` ignores ``config.trunk_weights``."""
        super().__init__()
        self.config = config
        weights = config.trunk_weights if load_pretrained else ''
        self.trunk = build_trunk(config.backbone, weights)
        if not weights and load_pretrained:
            _LOG.info('backbone %s: randomly initialised (no trunk_weights file given)',
                      config.backbone)
        if config.sees_motion:
            widen_first_convolution(self.trunk, config.trunk_input_channels)
        rnn_type = nn.LSTM if config.rnn == 'lstm' else nn.GRU
        self.rnn = rnn_type(
            input_size=config.step_size, hidden_size=config.hidden_size,
            num_layers=config.num_layers, batch_first=True,
            bidirectional=config.bidirectional,
            # PyTorch applies RNN dropout between layers only, and warns if there are none.
            dropout=config.dropout if config.num_layers > 1 else 0.0)
        pooled_size = config.hidden_size * config.directions
        self.attention = nn.Linear(pooled_size, 1) if config.pooling == 'attention' else None
        self.temporal: nn.GRU | nn.LSTM | None = None
        if config.temporal:
            # The temporal cell reads each frame's vector and its change since the stream's
            # previous frame. Motion shows up as a small change of the vector; given the
            # vector alone, a recurrent cell has to learn to take differences of small
            # signals, which it does slowly and without generalising (measured on ego-motion
            # drives: 0.45-0.72 held out, against 0.97-0.99 with the change as an input).
            # BatchNorm brings both to unit scale.
            self.temporal_norm = nn.BatchNorm1d(2 * pooled_size)
            temporal_type = nn.LSTM if config.temporal == 'lstm' else nn.GRU
            self.temporal = temporal_type(2 * pooled_size, config.temporal_hidden_size,
                                          batch_first=True)
        self.dropout = nn.Dropout(config.dropout)
        head_size = config.temporal_hidden_size if config.temporal else pooled_size
        self.head = nn.Linear(head_size, config.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """
        Images [B, 3, H, W], normalised, to logits [B, num_classes].

        A temporal model classifies each image as the first frame of its stream (fresh state);
        ``forward_clips`` and ``temporal_step`` carry state across frames.
        """
        if self.temporal is None:
            return self.head(self.dropout(self.frame_vectors(images)))
        state = self.zero_state(len(images), images.device)
        vectors = self.frame_vectors(self.trunk_input(images, state))
        logits, _ = self.temporal_step(vectors, state, images)
        return logits

    def forward_clips(self, clips: torch.Tensor, state: torch.Tensor | None = None,
                      valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Clips [B, N, 3, H, W] (N consecutive frames of one stream each) to logits [B, N, C].

        Starts from ``state`` [B, state_size] (fresh when None) and returns the state after
        the last frame, for truncated back-propagation through time. ``valid`` [B, N] marks
        real frames: only those reach the trunk and its BatchNorm (padding gives zero vectors
        and its logits mean nothing).
        """
        if self.temporal is None:
            raise ValueError('forward_clips needs a temporal model (config.temporal gru or lstm)')
        batch, length = clips.shape[:2]
        if state is None:
            state = self.zero_state(batch, clips.device)
        inputs = clips
        if self.config.sees_motion:
            # Each frame's change from the one before it in the stream; a fresh stream's first
            # frame has none, and reads zero change.
            previous = self._previous_image(state).view(batch, 1, *clips.shape[2:])
            before = torch.cat([previous.to(clips.dtype), clips[:, :-1]], dim=1)
            known = torch.ones(batch, length, 1, 1, 1, dtype=clips.dtype, device=clips.device)
            known[:, 0] = state[:, -1:].view(batch, 1, 1, 1).to(clips.dtype)
            inputs = torch.cat([clips, (clips - before) * known], dim=2)
        flat = inputs.flatten(0, 1)
        if valid is None or bool(valid.all()):
            vectors = self.frame_vectors(flat)
        else:
            real = valid.flatten()
            computed = self.frame_vectors(flat[real])
            vectors = computed.new_zeros(len(flat), computed.shape[1])
            vectors = vectors.index_put((real.nonzero()[:, 0],), computed)
        return self.temporal_steps(vectors.unflatten(0, (batch, length)), state, clips[:, -1],
                                   valid)

    def trunk_input(self, images: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """
        Return what the trunk reads for one frame per stream: [B, 3 or 6, H, W].

        A model that sees motion appends the change from the stream's previous frame, kept in
        ``state`` (zero for a fresh stream); any other model reads the images alone.
        """
        if not self.config.sees_motion:
            return images
        previous = self._previous_image(state).view(images.shape)
        change = (images - previous.to(images.dtype)) * state[:, -1:].view(-1, 1, 1, 1).to(
            images.dtype)
        return torch.cat([images, change], dim=1)

    def temporal_step(self, vectors: torch.Tensor, state: torch.Tensor,
                      images: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """
        One frame per stream: vectors [B, P] and state [B, state_size] to logits, state.

        ``images`` [B, 3, H, W] are the frames themselves, which a model that sees motion keeps
        in the state for the next frame's change.
        """
        logits, state = self.temporal_steps(vectors.unsqueeze(1), state, images)
        return logits[:, 0], state

    def temporal_steps(self, vectors: torch.Tensor, state: torch.Tensor | None = None,
                       last_images: torch.Tensor | None = None,
                       valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Stage 5: frame vectors [B, N, P] of N consecutive frames to logits [B, N, C].

        ``last_images`` [B, 3, H, W] (the last frame of each stream) are needed by a model
        that sees motion; ``valid`` [B, N] keeps padding out of the BatchNorm statistics.
        """
        batch, length, pooled = vectors.shape
        if state is None:
            state = self.zero_state(batch, vectors.device)
        recurrent, previous, primed = self._unpack(state)
        # A fresh stream (primed 0) has no previous frame: its first change reads as zero.
        before = torch.cat([previous.unsqueeze(1), vectors[:, :-1]], dim=1)
        known = torch.cat([primed.unsqueeze(1),
                           torch.ones(batch, length - 1, 1, device=vectors.device)], dim=1)
        change = (vectors - before) * known
        features = torch.cat([vectors, change], dim=2).flatten(0, 1)
        if valid is None or bool(valid.all()):
            inputs = self.temporal_norm(features)
        else:
            real = valid.flatten().nonzero()[:, 0]
            inputs = features.new_zeros(features.shape).index_put(
                (real,), self.temporal_norm(features[real]))
        outputs, final = self.temporal(inputs.unflatten(0, (batch, length)), recurrent)
        if self.config.sees_motion:
            if last_images is None:
                raise ValueError('a model that sees motion needs the frames (images) to keep '
                                 'for the next frame')
            new_state = self._pack(final, vectors[:, -1], last_images.flatten(1).float())
        else:
            new_state = self._pack(final, vectors[:, -1])
        return self.head(self.dropout(outputs)), new_state

    def _previous_image(self, state: torch.Tensor) -> torch.Tensor:
        # The flat last frame a model that sees motion keeps between vector and primed flag.
        pooled = self.config.hidden_size * self.config.directions
        return state[:, self._recurrent_values + pooled:-1]

    @property
    def _recurrent_values(self) -> int:
        return self.config.temporal_state_parts * self.config.temporal_hidden_size

    @property
    def state_size(self) -> int:
        """
        Return the length of one stream's state vector (0 without a temporal stage).

        The recurrent state, the last frame's vector, the last frame itself (a model that sees
        motion) and a flag that the stream has seen a frame.
        """
        config = self.config
        if not config.temporal:
            return 0
        image = 3 * config.input_size[0] * config.input_size[1] if config.sees_motion else 0
        return self._recurrent_values + config.hidden_size * config.directions + image + 1

    def zero_state(self, batch: int, device: torch.device | str = 'cpu') -> torch.Tensor:
        """Return the state a fresh stream starts from: zeros [B, state_size]."""
        return torch.zeros(batch, self.state_size, device=device)

    def _unpack(self, state: torch.Tensor
                ) -> tuple[RecurrentState, torch.Tensor, torch.Tensor]:
        # One flat row per stream keeps per-stream state a single gather and scatter in the
        # engine, and a zero row is a fresh stream; torch's RNNs want [1, B, H] (pairs for an
        # LSTM), and the change needs the previous frame's vector.
        hidden = self.config.temporal_hidden_size
        parts = self.config.temporal_state_parts
        pooled = self.config.hidden_size * self.config.directions
        layers = state[:, :parts * hidden].unflatten(1, (parts, hidden)).transpose(0, 1)
        recurrent: RecurrentState = layers[0:1].contiguous()
        if parts == 2:
            recurrent = (layers[0:1].contiguous(), layers[1:2].contiguous())
        start = parts * hidden
        return recurrent, state[:, start:start + pooled], state[:, -1:]

    @staticmethod
    def _pack(recurrent: RecurrentState, last_vector: torch.Tensor,
              last_image: torch.Tensor | None = None) -> torch.Tensor:
        layers = torch.cat(recurrent, dim=0) if isinstance(recurrent, tuple) else recurrent
        primed = torch.ones(last_vector.shape[0], 1, device=last_vector.device)
        parts = [layers.transpose(0, 1).flatten(1), last_vector]
        return torch.cat(parts + ([last_image] if last_image is not None else []) + [primed],
                         dim=1)

    def frame_vectors(self, images: torch.Tensor) -> torch.Tensor:
        """Stages 1 to 4: images [B, 3, H, W] to one pooled vector [B, P] per image."""
        feature_map = self.features(images)
        outputs, final_state = self.encode(self.to_sequence(feature_map))
        return self.pool(outputs, final_state)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Stage 1: the CNN trunk, [B, 3, H, W] to [B, C, h, w]."""
        return self.trunk(images)

    def to_sequence(self, feature_map: torch.Tensor) -> torch.Tensor:
        """
        Stage 2: feature map [B, C, h, w] to sequence [B, T, D].

        A strip timestep holds exactly that strip's C x strip x w values (rows) or
        C x h x strip values (columns). The seed reshaped [B, C, strip, w] straight to
        [B, -1, C * strip], which cuts memory in C-major order across channels, rows and columns.
        """
        batch, channels, height, width = feature_map.shape
        strip = self.config.strip
        if self.config.sequence == 'spatial':
            return feature_map.flatten(2).transpose(1, 2)
        if self.config.sequence == 'rows':
            strips = feature_map.reshape(batch, channels, height // strip, strip, width)
            return strips.permute(0, 2, 1, 3, 4).reshape(batch, height // strip, -1)
        strips = feature_map.reshape(batch, channels, height, width // strip, strip)
        return strips.permute(0, 3, 1, 2, 4).reshape(batch, width // strip, -1)

    def encode(self, sequence: torch.Tensor) -> tuple[torch.Tensor, RecurrentState]:
        """Stage 3: the RNN; returns per-step outputs [B, T, dirs x hidden] and final state."""
        return self.rnn(sequence)

    def pool(self, outputs: torch.Tensor, final_state: RecurrentState) -> torch.Tensor:
        """
        Stage 4: one vector [B, dirs x hidden] per image.

        ``last`` uses each direction's final hidden state of the top layer. The seed took
        ``outputs[:, -1]``, where the backward direction has read only the last element.
        """
        pooling = self.config.pooling
        if pooling == 'last':
            hidden = final_state[0] if isinstance(final_state, tuple) else final_state
            top_layer = hidden[-self.config.directions:]  # [dirs, B, hidden], forward first
            return top_layer.transpose(0, 1).reshape(outputs.shape[0], -1)
        if pooling == 'mean':
            return outputs.mean(dim=1)
        if pooling == 'max':
            return outputs.amax(dim=1)
        weights = torch.softmax(self.attention(outputs), dim=1)  # [B, T, 1]
        return (weights * outputs).sum(dim=1)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """
    Draw from torch's CPU generator seeded with ``seed``, then restore it as it was.

    Model initialisation is reproducible this way without reseeding the whole process: code
    running after us (a training run, a test) draws what it would have drawn anyway.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def default_labels(num_classes: int) -> list[str]:
    """Return placeholder class names for a model trained without any."""
    return [f'class_{index}' for index in range(num_classes)]


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model in eval mode and everything needed to use it."""

    model: CnnRnnClassifier
    labels: list[str]
    preprocessing: Preprocessing
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> ModelConfig:
        """Return the model's config."""
        return self.model.config


def save_checkpoint(path: str | os.PathLike, model: CnnRnnClassifier, *,
                    labels: list[str] | None = None,
                    preprocessing: Preprocessing | None = None,
                    extra: dict[str, Any] | None = None) -> None:
    """
    Write config, labels, preprocessing and weights to one file that rebuilds the model.

    ``extra`` holds plain values (epoch, metrics, ...) for tools; it must survive
    ``weights_only`` loading, so no custom classes.
    """
    config = model.config
    labels = list(labels) if labels is not None else default_labels(config.num_classes)
    if len(labels) != config.num_classes:
        raise ValueError(f'{len(labels)} labels for a model with {config.num_classes} classes')
    preprocessing = preprocessing or Preprocessing.for_config(config)
    if tuple(preprocessing.input_size) != config.input_size:
        raise ValueError(f'preprocessing input_size {preprocessing.input_size} differs from '
                         f'the model input_size {config.input_size}')
    payload = {
        'format': CHECKPOINT_FORMAT,
        'config': config.to_dict(),
        'labels': labels,
        'preprocessing': preprocessing.to_dict(),
        'state_dict': {key: value.detach().cpu() for key, value in model.state_dict().items()},
        'extra': dict(extra or {}),
    }
    path = os.fspath(path)
    # Write then rename, so a crash mid-save never leaves a truncated checkpoint behind.
    temporary = f'{path}.partial'
    torch.save(payload, temporary)
    os.replace(temporary, path)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint describes, read without building its model."""

    config: ModelConfig
    labels: list[str]
    preprocessing: Preprocessing


def _read_checkpoint(path: str, *, mmap: bool) -> tuple[dict[str, Any], CheckpointInfo]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path!r}')
    try:
        payload = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception as error:  # pickle, zip and torch errors all mean "not a checkpoint"
        raise ValueError(f'cannot read checkpoint {path!r} (truncated, or not a torch file): '
                         f'{error}') from error
    if not isinstance(payload, dict) or payload.get('format') != CHECKPOINT_FORMAT:
        raise ValueError(f'{path!r} is not a cnn_rnn_perception checkpoint '
                         f'(expected format {CHECKPOINT_FORMAT!r})')
    try:
        config = ModelConfig.from_dict(payload['config'])
        preprocessing = Preprocessing(**payload['preprocessing'])
        labels = [str(label) for label in payload['labels']]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f'checkpoint {path!r} has an invalid config: {error}') from error
    if len(labels) != config.num_classes:
        raise ValueError(f'checkpoint {path!r} has {len(labels)} labels for '
                         f'{config.num_classes} classes')
    return payload, CheckpointInfo(config, labels, preprocessing)


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """
    Check that a file is a readable checkpoint and return its config, labels, preprocessing.

    Memory-maps the file rather than reading every weight, so it answers in milliseconds even
    for large models: the node asks it inside a parameter callback. ``load_checkpoint`` still
    checks every tensor.
    """
    return _read_checkpoint(os.fspath(path), mmap=True)[1]


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Rebuild a model from a checkpoint file alone; errors name the file and what is wrong."""
    path = os.fspath(path)
    payload, info = _read_checkpoint(path, mmap=False)
    config = info.config
    model = CnnRnnClassifier(config, load_pretrained=False)
    state_dict = payload.get('state_dict')
    if not isinstance(state_dict, dict):
        raise ValueError(f'checkpoint {path!r} has no weights')
    differences = state_dict_differences(model.state_dict(), state_dict)
    if differences:
        raise ValueError(f'checkpoint {path!r}: weights do not match its config '
                         f'({config.backbone}, {config.sequence}): {differences}')
    model.load_state_dict(state_dict)
    model.eval()
    return Checkpoint(model=model, labels=info.labels, preprocessing=info.preprocessing,
                      extra=dict(payload.get('extra', {})))
