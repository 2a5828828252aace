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

import logging

from cnn_rnn_perception.core.backbones import build_trunk, widen_first_convolution
from cnn_rnn_perception.core.model_config import ModelConfig
import torch
from torch import nn

_LOG = logging.getLogger(__name__)

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
