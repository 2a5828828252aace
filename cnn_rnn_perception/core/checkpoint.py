"""
Checkpoints: one file holding a model's config, labels, preprocessing and weights.

A checkpoint stores plain values only (no pickled classes: it loads with ``weights_only``),
is written then renamed so a crash never leaves half of one, and is checked as it loads:
errors name the file and what is wrong with it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
import os
from typing import Any, Iterator

from cnn_rnn_perception.core.backbones import state_dict_differences
from cnn_rnn_perception.core.model import CnnRnnClassifier
from cnn_rnn_perception.core.model_config import ModelConfig, Preprocessing
import torch

CHECKPOINT_FORMAT = 'cnn_rnn_perception.checkpoint/1'


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
