"""How to train: ``TrainSettings``, every field a ``train`` flag and a YAML key."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from cnn_rnn_perception.core.model_config import ModelConfig


@dataclass
class TrainSettings:
    """How to train; every field is a command-line flag and a YAML key."""

    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = 'adamw'
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = 'cosine'
    seed: int = 0
    workers: int = 2
    val_split: float = 0.2
    augment: bool = True
    hflip: bool = False
    freeze_trunk: bool = False
    device: str = 'auto'
    # Bag data: validation holds out time blocks this long; a stamp gap longer than
    # reset_after_s ends a run (as it resets a temporal model's state in the engine).
    val_block_s: float = 10.0
    reset_after_s: float = 1.0
    # Temporal models: frames per clip (back-propagation reaches this far back; the state
    # carries further). 8 rather than 16: twice the steps an epoch, which small drives need
    # (texture-motion drives held out: 96.8% against 81.6% with 16, the same data and seed).
    clip_length: int = 8
    # Temporal models: weight of a penalty on the change of class probabilities between
    # neighbouring frames whose true label is the same (0: none). See ``steadiness_penalty``.
    steadiness: float = 0.0
    # Start from another checkpoint's weights where names and shapes match: a temporal model
    # from a per-frame one of the same trunk (the usual LRCN recipe).
    init_from: str = ''

    def __post_init__(self) -> None:
        if self.optimizer not in ('adamw', 'sgd'):
            raise ValueError(f'optimizer must be adamw or sgd; got {self.optimizer!r}')
        if self.schedule not in ('cosine', 'step', 'constant'):
            raise ValueError(f'schedule must be cosine, step or constant; got {self.schedule!r}')
        for name in ('epochs', 'batch_size', 'clip_length'):
            if getattr(self, name) < 1:
                raise ValueError(f'{name} must be >= 1; got {getattr(self, name)}')
        if self.steadiness < 0:
            raise ValueError(f'steadiness must be >= 0; got {self.steadiness}')
        if not 0.0 < self.val_split < 1.0:
            raise ValueError(f'val_split must be between 0 and 1; got {self.val_split}')

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as plain values, as a checkpoint stores them."""
        data = asdict(self)
        data['model'] = self.model.to_dict()
        return data
