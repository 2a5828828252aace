"""
Training data: ImageFolder directories and labelled bags as samples, and their augmentation.

Frames go through the same resize and colour code as inference, so a model is trained on
exactly what the engine will feed it. Bags are validated on held-out time blocks, never on
random frames (neighbouring frames are near copies).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cnn_rnn_perception.core.preprocess import resize_frame, to_model_colors
from cnn_rnn_perception.tools.training.clips import (
    index_runs, read_run, Run, Split, split_by_time_blocks)
from cnn_rnn_perception.tools.training.settings import TrainSettings
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')
SIDE_WORDS = ('left', 'right')


def check_hflip(enabled: bool, labels: Sequence[str]) -> None:
    """Refuse horizontal flips for labels that name a side: a flip would make them lie."""
    sided = [label for label in labels if any(word in label.lower() for word in SIDE_WORDS)]
    if enabled and sided:
        raise ValueError(f'horizontal flip would swap the meaning of {", ".join(sided)}; '
                         'leave --hflip off for left/right-sensitive labels')


@dataclass
class Samples:
    """Images (paths or decoded frames) with class indices."""

    items: list[Any]
    targets: list[int]


def _class_folders(root: Path) -> list[str]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith('.'))
    if not classes:
        raise ValueError(f'{root}: no class folders; expected {root}/CLASS/image.png')
    return classes


def _scan(root: Path, classes: Sequence[str], skipped: list[str]) -> Samples:
    items, targets = [], []
    for index, label in enumerate(classes):
        folder = root / label
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
            if folder.is_dir() else []
        readable = []
        for path in files:
            # A cheap reduced decode finds truncated and non-image files before training.
            if cv2.imread(str(path), cv2.IMREAD_REDUCED_GRAYSCALE_8) is None:
                skipped.append(str(path))
            else:
                readable.append(path)
        if not readable:
            raise ValueError(f'class folder {folder} has no readable images: add some, or '
                             'remove the folder')
        items += readable
        targets += [index] * len(readable)
    return Samples(items, targets)


def _split(samples: Samples, fraction: float, seed: int) -> tuple[Samples, Samples]:
    order = np.random.default_rng(seed).permutation(len(samples.items))
    cut = int(round(len(order) * (1 - fraction)))
    pick = lambda indices: Samples([samples.items[i] for i in indices],  # noqa: E731
                                   [samples.targets[i] for i in indices])
    return pick(order[:cut]), pick(order[cut:])


def image_folder_samples(root: str | Path, val_split: float, seed: int
                         ) -> tuple[list[str], Samples, Samples, list[str]]:
    """
    Read ``root/train/CLASS`` and ``root/val/CLASS``, or ``root/CLASS`` split by ``val_split``.

    Returns (classes, train, val, skipped unreadable files).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f'data folder not found: {str(root)!r}')
    skipped: list[str] = []
    if (root / 'train').is_dir():
        classes = _class_folders(root / 'train')
        train = _scan(root / 'train', classes, skipped)
        if (root / 'val').is_dir():
            missing = [c for c in classes if not any((root / 'val' / c).glob('*'))]
            if missing:
                raise ValueError(f'{root}/val has no images of {", ".join(missing)}: every '
                                 'class needs validation images (or remove val/ to split '
                                 'train/ by --val-split)')
            val = _scan(root / 'val', classes, skipped)
        else:
            train, val = _split(train, val_split, seed)
    else:
        classes = _class_folders(root)
        train, val = _split(_scan(root, classes, skipped), val_split, seed)
    return classes, train, val, skipped


def bag_runs(paths: Sequence[str], label_topic: str, settings: TrainSettings,
             topics: Sequence[str] | None = None, progress: bool = True
             ) -> tuple[list[str], Split, list[str]]:
    """Index labelled bags into runs, split by time blocks; (classes, split, skipped)."""
    classes, runs, skipped = index_runs(paths, label_topic, topics, settings.reset_after_s,
                                        progress)
    return classes, split_by_time_blocks(runs, settings.val_split, settings.val_block_s), \
        skipped


def bag_samples(paths: Sequence[str], label_topic: str, settings: TrainSettings,
                topics: Sequence[str] | None = None, progress: bool = True
                ) -> tuple[list[str], Samples, Samples, list[str], str]:
    """
    Decode the labelled frames of bags (resized, to keep memory small) for a per-frame model.

    Returns (classes, train, val, skipped, how validation was split).
    """
    classes, split, skipped = bag_runs(paths, label_topic, settings, topics, progress)
    size = settings.model.input_size

    def decode(runs: list[Run]) -> Samples:
        frames, targets = [], []
        for run in runs:
            for frame, target in zip(read_run(run, size), run.targets):
                if frame is None:
                    skipped.append(f'{run.bag} {run.topic}: a frame no longer decodes')
                    continue
                frames.append(frame)
                targets.append(target)
        return Samples(frames, targets)
    return classes, decode(split.train), decode(split.val), skipped, split.description


class FrameDataset(Dataset):
    """Samples as uint8 RGB HxWx3 tensors at the model's input size, optionally augmented."""

    def __init__(self, samples: Samples, input_size: tuple[int, int], *, augment: bool,
                 hflip: bool, seed: int) -> None:
        self.samples = samples
        self.input_size = input_size
        self.augment = augment
        self.hflip = hflip
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.samples.items[index]
        if isinstance(item, Path):
            frame = to_model_colors(cv2.imread(str(item), cv2.IMREAD_COLOR), 'bgr', 'rgb')
        else:
            frame = item
        if self.augment:
            # Seeded by sample and epoch: the same run gives the same images, in any process.
            rng = np.random.default_rng([self.seed, self.epoch, index])
            frame = augment(frame, rng, self.hflip)
        frame = resize_frame(frame, self.input_size)
        return torch.from_numpy(np.ascontiguousarray(frame)), self.samples.targets[index]


def augment(frame: np.ndarray, rng: np.random.Generator, hflip: bool) -> np.ndarray:
    """Camera-like changes: colour jitter, blur, small crops and tilts, optional flip."""
    height, width = frame.shape[:2]
    hsv = cv2.cvtColor(frame, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 1] *= rng.uniform(0.7, 1.3)
    hsv[..., 2] = hsv[..., 2] * rng.uniform(0.7, 1.3) + rng.uniform(-20, 20)
    frame = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB)
    if rng.random() < 0.3:
        frame = cv2.GaussianBlur(frame, (5, 5), 0)
    scale = rng.uniform(0.85, 1.0)
    crop_h, crop_w = int(height * scale), int(width * scale)
    top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
    frame = frame[top:top + crop_h, left:left + crop_w]
    tilt = cv2.getRotationMatrix2D((crop_w / 2, crop_h / 2), rng.uniform(-5, 5), 1.0)
    frame = cv2.warpAffine(frame, tilt, (crop_w, crop_h), borderMode=cv2.BORDER_REFLECT)
    if hflip and rng.random() < 0.5:
        frame = frame[:, ::-1]
    return frame
