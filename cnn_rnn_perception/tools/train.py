"""
Training: ImageFolder directories or labelled bags in, checkpoints the node loads out.

Frames go through the same resize, colour and normalisation code as inference, so a model is
trained on exactly what the engine will feed it. One process, or several through ``torchrun``
(DistributedDataParallel; gloo on CPUs, NCCL on GPUs): ``batch_size`` is the global batch, and
every process takes its share of each step's samples from one shared, seeded permutation, so N
processes see the same batches as one.

A temporal model (``model.temporal``) trains on clips streamed from labelled bags: each step
reads ``clip_length`` consecutive frames on each of ``batch_size`` lanes, carrying every lane's
state to its next clip (truncated back-propagation through time; see ``clips``). Bag data is
validated on held-out time blocks, for temporal and per-frame models alike.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import asdict, dataclass, field, fields, replace
import functools
import logging
import os
from pathlib import Path
import time
from typing import Any, Iterable, Sequence

from cnn_rnn_perception.core.backbones import first_convolution
from cnn_rnn_perception.core.model import (
    CnnRnnClassifier, load_checkpoint, ModelConfig, Preprocessing, save_checkpoint)
from cnn_rnn_perception.core.preprocess import (
    normalisation, normalise_uint8_batch, resize_frame, to_model_colors)
from cnn_rnn_perception.tools import options
from cnn_rnn_perception.tools.clips import (
    ClipBatches, index_runs, lanes_for, plan_lanes, prefetched, read_run, Run, Split,
    split_by_time_blocks, steps_for)
import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

_LOG = logging.getLogger(__name__)
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')
SIDE_WORDS = ('left', 'right')
TEMPORAL_GRADIENT_NORM = 1.0


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


def check_hflip(enabled: bool, labels: Sequence[str]) -> None:
    """Refuse horizontal flips for labels that name a side: a flip would make them lie."""
    sided = [label for label in labels if any(word in label.lower() for word in SIDE_WORDS)]
    if enabled and sided:
        raise ValueError(f'horizontal flip would swap the meaning of {", ".join(sided)}; '
                         'leave --hflip off for left/right-sensitive labels')


# -- data --------------------------------------------------------------------------------------

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


# -- distributed -------------------------------------------------------------------------------

@dataclass
class Distributed:
    """This process's place among the training processes (world of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def start_distributed(device: torch.device) -> Distributed:
    """Join the process group when started by torchrun; on loopback for CPU (gloo) runs."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world == 1:
        return Distributed()
    import torch.distributed as dist
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    dist.init_process_group(backend)
    return Distributed(rank=dist.get_rank(), world=world)


def _sum_across(value: float, distributed: Distributed) -> float:
    if distributed.world == 1:
        return value
    import torch.distributed as dist
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item())


def synchronise_batch_norm(model: torch.nn.Module) -> None:
    """
    Make every BatchNorm of ``model`` normalise training batches by all processes' statistics.

    Without it each process normalises by its own share of the batch, so N processes train a
    different model than one (measured on a temporal model: weights 20-90% of a 1-epoch update
    apart). torch's SyncBatchNorm does this on GPUs only; here the sums travel by
    ``torch.distributed.nn.all_reduce``, which carries gradients back, on any backend. The
    modules and their state_dict keys stay as they are: only these instances' forward changes.
    """
    import torch.distributed as dist
    # A group of their own: DistributedDataParallel reduces gradient buckets on the default
    # group while the backward pass runs, and gloo pairs each group's calls in issue order.
    group = dist.new_group()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.forward = functools.partial(_synchronised_batch_norm, module, group)


def _synchronised_batch_norm(norm: torch.nn.modules.batchnorm._BatchNorm, group: Any,
                             inputs: torch.Tensor) -> torch.Tensor:
    if not norm.training or not norm.track_running_stats:
        return type(norm).forward(norm, inputs)
    from torch.distributed.nn import all_reduce
    axes = [0] + list(range(2, inputs.dim()))
    values = inputs.float()
    channels = inputs.shape[1]
    shape = [1, channels] + [1] * (inputs.dim() - 2)
    count = values.new_tensor([values.numel() / max(channels, 1)])
    totals = all_reduce(torch.cat([values.sum(axes), count]), group=group)
    frames = totals[-1]
    mean = totals[:channels] / frames
    # Two passes, as BatchNorm itself computes it: the mean of squares minus the squared
    # mean loses the digits that tell small batches apart.
    centred = values - mean.view(shape)
    variance = all_reduce((centred * centred).sum(axes), group=group) / frames
    with torch.no_grad():
        momentum = norm.momentum if norm.momentum is not None else 0.1
        norm.running_mean.lerp_(mean.detach(), momentum)
        norm.running_var.lerp_(variance.detach() * frames / (frames - 1).clamp_min(1), momentum)
        norm.num_batches_tracked += 1
    normalised = centred * torch.rsqrt(variance.view(shape) + norm.eps)
    if norm.affine:
        normalised = normalised * norm.weight.view(shape) + norm.bias.view(shape)
    return normalised.to(inputs.dtype)


def _mean_across(value: float, distributed: Distributed) -> float:
    if distributed.world == 1:
        return value
    import torch.distributed as dist
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item() / distributed.world)


# -- the loop ----------------------------------------------------------------------------------

def _optimizer(settings: TrainSettings, parameters) -> torch.optim.Optimizer:
    if settings.optimizer == 'sgd':
        return torch.optim.SGD(parameters, lr=settings.lr, momentum=0.9,
                               weight_decay=settings.weight_decay)
    return torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)


def _schedule(settings: TrainSettings, optimizer: torch.optim.Optimizer):
    if settings.schedule == 'cosine':
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    if settings.schedule == 'step':
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(settings.epochs // 3, 1),
                                               gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def plot_history(history: list[dict[str, float]], path: str | Path) -> None:
    """Draw loss and accuracy per epoch, train and validation, to a PNG."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot
    epochs = [row['epoch'] for row in history]
    figure, (loss_axes, accuracy_axes) = pyplot.subplots(1, 2, figsize=(10, 4))
    for split in ('train', 'val'):
        loss_axes.plot(epochs, [row[f'{split}_loss'] for row in history], 'o-', label=split)
        accuracy_axes.plot(epochs, [row[f'{split}_accuracy'] for row in history], 'o-',
                           label=split)
    loss_axes.set(xlabel='epoch', ylabel='loss', title='loss')
    accuracy_axes.set(xlabel='epoch', ylabel='accuracy', title='accuracy', ylim=(0, 1.02))
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def _resume_state(path: Path, config: ModelConfig, classes: list[str]) -> dict[str, Any]:
    checkpoint = load_checkpoint(path)
    if checkpoint.config != config:
        differing = [f'{key} {value!r} (this run: {getattr(config, key)!r})'
                     for key, value in checkpoint.config.to_dict().items()
                     if config.to_dict()[key] != value]
        raise ValueError(f'--resume: {path} holds a different model: {", ".join(differing)}; '
                         'match the model options or start a new --output folder')
    if checkpoint.labels != classes:
        raise ValueError(f'--resume: {path} was trained on classes {checkpoint.labels}, this '
                         f'data has {classes}')
    return {'model': checkpoint.model.state_dict(), **checkpoint.extra}


def train(settings: TrainSettings, *, classes: list[str], train_samples: Samples | list[Run],
          val_samples: Samples | list[Run], output: str | Path, resume: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """
    Train and write best.pt, last.pt, metrics.csv and curves.png; return the history.

    A per-frame model takes ``Samples``; a temporal model takes runs (``bag_runs``).
    """
    from cnn_rnn_perception.core.engine import resolve_device

    check_hflip(settings.hflip, classes)
    config = replace(settings.model, num_classes=len(classes))
    temporal = bool(config.temporal)
    if temporal != isinstance(train_samples, list):
        raise ValueError('a temporal model trains on runs of labelled bags (--bags with '
                         '--label-topic); a per-frame model on images or decoded frames')
    device = resolve_device(settings.device)
    distributed = start_distributed(device)
    if distributed.world > 1 and settings.batch_size % distributed.world:
        raise ValueError(f'batch_size {settings.batch_size} must divide among '
                         f'{distributed.world} processes')
    output = Path(output)
    if distributed.main:
        output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    model = CnnRnnClassifier(config)
    if settings.init_from and not resume:
        _initialise_from(model, settings.init_from)
    model = model.to(device, memory_format=torch.channels_last)
    if settings.freeze_trunk:
        model.trunk.requires_grad_(False)
        if config.sees_motion and distributed.main:
            print('--freeze-trunk: the trunk also keeps its motion channels at zero, so this '
                  'model does not see motion; leave the trunk trained (the default) or give '
                  '--motion none to say so', flush=True)
    optimizer = _optimizer(settings, [p for p in model.parameters() if p.requires_grad])
    scheduler = _schedule(settings, optimizer)
    history: list[dict[str, float]] = []
    start_epoch = 0
    if resume:
        state = _resume_state(output / 'last.pt', config, classes)
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        history = list(state['history'])
        start_epoch = int(state['epoch'])
    wrapped: torch.nn.Module = _ClipModel(model) if temporal else model
    if distributed.world > 1:
        synchronise_batch_norm(model)
        wrapped = torch.nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[device.index] if device.type == 'cuda' else None)
    preprocessing = Preprocessing.for_config(config)
    offset, scale = normalisation(preprocessing, device)
    use_amp = device.type == 'cuda'

    def inputs(batch: torch.Tensor) -> torch.Tensor:
        return normalise_uint8_batch(batch.to(device, non_blocking=True), offset, scale)

    loop = _Loop(settings, model, wrapped, optimizer, inputs, device, use_amp, distributed,
                 progress)
    if temporal:
        run_epoch, validate = loop.clip_functions(train_samples, val_samples)
    else:
        run_epoch, validate = loop.frame_functions(train_samples, val_samples)
    best = max((row['val_accuracy'] for row in history), default=-1.0)
    for epoch in range(start_epoch, settings.epochs):
        started = time.perf_counter()
        wrapped.train()
        if settings.freeze_trunk:
            model.trunk.eval()  # frozen BatchNorm statistics too
        mean_loss, accuracy = run_epoch(epoch)
        scheduler.step()
        train_loss = _mean_across(mean_loss, distributed)
        train_accuracy = _mean_across(accuracy, distributed)
        model.eval()
        val_loss, val_accuracy = validate()
        row = {'epoch': epoch + 1, 'train_loss': train_loss, 'train_accuracy': train_accuracy,
               'val_loss': val_loss, 'val_accuracy': val_accuracy,
               'lr': optimizer.param_groups[0]['lr'],
               'seconds': time.perf_counter() - started}
        history.append(row)
        if distributed.main:
            _LOG.info('epoch %d: %s', epoch + 1, row)
            print(f'epoch {epoch + 1:>3}/{settings.epochs}  train loss {train_loss:.4f} '
                  f'acc {train_accuracy:.3f}  val loss {val_loss:.4f} acc {val_accuracy:.3f}  '
                  f'{row["seconds"]:.1f} s', flush=True)
            labels_info = {'labels': classes, 'preprocessing': preprocessing}
            save_checkpoint(output / 'last.pt', model, **labels_info, extra={
                'epoch': epoch + 1, 'history': history, 'optimizer': optimizer.state_dict(),
                'scheduler': scheduler.state_dict(), 'settings': _plain(settings)})
            if val_accuracy > best:
                best = val_accuracy
                save_checkpoint(output / 'best.pt', model, **labels_info,
                                extra={'epoch': epoch + 1, 'val_accuracy': val_accuracy})
            _write_metrics(output / 'metrics.csv', history)
            plot_history(history, output / 'curves.png')
    if distributed.world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return {'history': history, 'best_val_accuracy': best, 'classes': classes,
            'output': str(output)}


def _initialise_from(model: CnnRnnClassifier, path: str) -> None:
    """Copy the weights of ``path`` that fit ``model`` (same name, same shape); say which."""
    loaded = load_checkpoint(path)
    source = loaded.model.state_dict()
    target = model.state_dict()
    # A head that reads the temporal state is not the head that read a frame's vector.
    other_head = loaded.config.temporal != model.config.temporal
    taken = {name: value for name, value in source.items()
             if name in target and target[name].shape == value.shape
             and not (other_head and name.startswith('head.'))}
    # A trunk that reads the change from the last frame too: its image channels come from the
    # per-frame trunk, its change channels start at zero (what widen_first_convolution does).
    first = f'trunk.{first_convolution(model.trunk)[0]}.weight'
    if first in source and first in target and first not in taken \
            and source[first].shape[1] < target[first].shape[1] \
            and source[first].shape[0] == target[first].shape[0] \
            and source[first].shape[2:] == target[first].shape[2:]:
        widened = torch.zeros_like(target[first])
        widened[:, :source[first].shape[1]] = source[first]
        taken[first] = widened
    if not any(name.startswith('trunk.') for name in taken):
        raise ValueError(f'--init-from {path}: no trunk weights fit this model; it needs the '
                         'same backbone')
    model.load_state_dict(taken, strict=False)
    left = sorted({name.split('.')[0] for name in target if name not in taken})
    _LOG.info('initialised %d of %d tensors from %s; new: %s', len(taken), len(target), path,
              ', '.join(left) or 'none')
    print(f'initialised from {path}: {len(taken)} of {len(target)} tensors'
          + (f'; trained from scratch: {", ".join(left)}' if left else ''), flush=True)


class _ClipModel(torch.nn.Module):
    """``forward_clips`` as ``forward``, which is what DistributedDataParallel calls."""

    def __init__(self, model: CnnRnnClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, clips: torch.Tensor, state: torch.Tensor, valid: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_clips(clips, state, valid)


@dataclass
class _Loop:
    """What one epoch of training and one validation need, for frames or for clips."""

    settings: TrainSettings
    model: CnnRnnClassifier
    wrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    inputs: Any
    device: torch.device
    use_amp: bool
    distributed: Distributed
    progress: bool

    def _bar(self, iterable, total: int, description: str):
        return tqdm(iterable, total=total, desc=description, leave=False,
                    disable=not (self.progress and self.distributed.main))

    def _step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.model.temporal is not None:
            # Back-propagation through time sums a clip's gradients through the recurrent
            # state; one clip with a burst (a cut in the drive) threw the epoch back (held-out
            # accuracy swinging 0.70-0.96 between epochs). The RNN's usual remedy.
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), TEMPORAL_GRADIENT_NORM)
        self.optimizer.step()

    def frame_functions(self, train_samples: Samples, val_samples: Samples):
        """Return (run one epoch, validate) over decoded frames."""
        settings, distributed = self.settings, self.distributed
        size = self.model.config.input_size
        train_set = FrameDataset(train_samples, size, augment=settings.augment,
                                 hflip=settings.hflip, seed=settings.seed)
        val_set = FrameDataset(val_samples, size, augment=False, hflip=False,
                               seed=settings.seed)
        sampler = DistributedSampler(train_set, num_replicas=distributed.world,
                                     rank=distributed.rank, shuffle=True, seed=settings.seed,
                                     drop_last=True)
        per_process = settings.batch_size // distributed.world
        loader = DataLoader(train_set, batch_size=per_process, sampler=sampler, drop_last=True,
                            num_workers=settings.workers,
                            persistent_workers=settings.workers > 0)
        val_loader = DataLoader(val_set, batch_size=settings.batch_size,
                                num_workers=settings.workers)
        if len(loader) == 0:
            raise ValueError(f'{len(train_set)} training images make no full batch of '
                             f'{settings.batch_size}; lower --batch-size')

        def run_epoch(epoch: int) -> tuple[float, float]:
            sampler.set_epoch(epoch)
            train_set.epoch = epoch
            losses, correct, seen = [], 0, 0
            bar = self._bar(loader, len(loader), f'epoch {epoch + 1}/{settings.epochs}')
            for images, targets in bar:
                targets = targets.to(self.device)
                with torch.autocast(self.device.type, dtype=torch.bfloat16,
                                    enabled=self.use_amp):
                    logits = self.wrapped(self.inputs(images))
                    loss = torch.nn.functional.cross_entropy(logits.float(), targets)
                self._step(loss)
                losses.append(loss.item())
                correct += int((logits.argmax(1) == targets).sum())
                seen += len(targets)
                bar.set_postfix(loss=f'{np.mean(losses):.3f}')
            return float(np.mean(losses)), correct / seen

        def validate() -> tuple[float, float]:
            def pairs():
                for images, targets in val_loader:
                    with torch.autocast(self.device.type, dtype=torch.bfloat16,
                                        enabled=self.use_amp):
                        logits = self.model(self.inputs(images)).float()
                    yield logits, targets.to(self.device)
            return _scored(pairs())
        return run_epoch, validate

    def _clips(self, batches: ClipBatches, model: torch.nn.Module, description: str):
        """Yield logits [lanes, length, classes], targets and valid, the state carried on."""
        state = None
        for batch in self._bar(prefetched(batches), len(batches), description):
            frames = batch.frames.to(self.device, non_blocking=True)
            lanes, length = frames.shape[:2]
            clips = self.inputs(frames.flatten(0, 1)).unflatten(0, (lanes, length))
            if state is None:
                state = self.model.zero_state(lanes, self.device)
            state = state * (~batch.fresh).to(self.device).unsqueeze(1)
            valid = batch.valid.to(self.device)
            count = int(valid.sum())
            everywhere = int(_sum_across(count, self.distributed))
            if not everywhere:
                continue  # no frame of this step decoded, in any process: nothing to learn
            # Only real frames reach BatchNorm, which needs two in training: a lone real frame
            # goes with its lane's padding, copies of it. A process whose lanes hold none in
            # this step (every frame of its runs failed to decode) still runs its padding,
            # weighted 0, because DistributedDataParallel needs every process's backward pass.
            real = valid
            if everywhere < 2 or not count:
                real = valid.any(1, keepdim=True).expand_as(valid)
                real = real if bool(real.any()) else None
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
                logits, state = model(clips, state, real)
            state = state.detach().float()
            yield logits.float(), batch.targets.to(self.device), valid, everywhere

    def clip_functions(self, train_runs: list[Run], val_runs: list[Run]):
        """Return (run one epoch, validate) over clips streamed from runs."""
        settings, distributed = self.settings, self.distributed
        size = self.model.config.input_size
        if not train_runs or not val_runs:
            raise ValueError('temporal training needs runs to train on and to validate on')
        lanes, why = lanes_for(train_runs, settings.batch_size, distributed.world)
        if why and distributed.main:
            print(why, flush=True)

        def run_epoch(epoch: int) -> tuple[float, float]:
            def jitter(frame: np.ndarray, run_index: int) -> np.ndarray:
                # The same camera-like change for every frame of a run: motion is untouched.
                rng = np.random.default_rng([settings.seed, epoch, run_index])
                return resize_frame(augment(frame, rng, settings.hflip), size)
            plan = plan_lanes(train_runs, lanes, settings.clip_length,
                              seed=settings.seed * 100_003 + epoch)
            # Every process takes as many steps as the longest lane of all of them needs.
            batches = ClipBatches(train_runs, plan[distributed.rank::distributed.world],
                                  settings.clip_length, size,
                                  augment=jitter if settings.augment else None, repeat=True,
                                  steps=steps_for(train_runs, plan, settings.clip_length))
            total_loss, correct, seen = 0.0, 0, 0
            for logits, targets, valid, everywhere in self._clips(
                    batches, self.wrapped, f'epoch {epoch + 1}/{settings.epochs}'):
                count = int(valid.sum())
                # Summed over this process's frames, divided by all processes' frames (and
                # times the processes, which DistributedDataParallel averages over): the
                # gradient of the mean over the global batch, however frames fall.
                loss = torch.nn.functional.cross_entropy(
                    logits[valid], targets[valid], reduction='sum') \
                    * (distributed.world / everywhere)
                if settings.steadiness:
                    loss = loss + settings.steadiness * steadiness_penalty(logits, targets, valid)
                self._step(loss)
                total_loss += loss.item() * everywhere / distributed.world
                correct += int((logits[valid].argmax(1) == targets[valid]).sum())
                seen += count
            # Over every process's frames, so each process returns the same epoch figures.
            seen = _sum_across(seen, distributed)
            return (_sum_across(total_loss, distributed) / max(seen, 1),
                    _sum_across(correct, distributed) / max(seen, 1))

        def validate() -> tuple[float, float]:
            # Each held-out run is one stream from start to end, as the engine would run it.
            plan = plan_lanes(val_runs, min(settings.batch_size, len(val_runs)),
                              settings.clip_length, 0)
            batches = ClipBatches(val_runs, plan, settings.clip_length, size)
            return _scored((logits[valid], targets[valid]) for logits, targets, valid, _
                           in self._clips(batches, self.model.forward_clips, 'validating'))
        return run_epoch, validate


def steadiness_penalty(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor
                       ) -> torch.Tensor:
    """
    Return the mean squared change of class probabilities between neighbouring frames of a clip.

    Only pairs whose true label is the same count, so a real change of scene costs nothing:
    what is penalised is the model changing its mind while the scene stays (a figure crossing),
    the flicker a navigation stack would see. Cross-entropy alone scores each frame on its own
    and does not mind a brief flip that costs one or two frames.
    """
    probabilities = logits.softmax(-1)
    same = valid[:, 1:] & valid[:, :-1] & (targets[:, 1:] == targets[:, :-1])
    change = (probabilities[:, 1:] - probabilities[:, :-1]).pow(2).sum(-1)
    return change[same].mean() if bool(same.any()) else logits.new_zeros(())


def _scored(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """Return mean loss and accuracy over (logits, targets) pairs, without gradients."""
    total_loss, correct, seen = 0.0, 0, 0
    with torch.no_grad():  # grad mode is per thread: the generators run under it too
        for logits, targets in pairs:
            total_loss += float(torch.nn.functional.cross_entropy(logits, targets,
                                                                  reduction='sum'))
            correct += int((logits.argmax(1) == targets).sum())
            seen += len(targets)
    return total_loss / max(seen, 1), correct / max(seen, 1)


def _plain(settings: TrainSettings) -> dict[str, Any]:
    data = asdict(settings)
    data['model'] = settings.model.to_dict()
    return data


def _write_metrics(path: Path, history: list[dict[str, float]]) -> None:
    with path.open('w', newline='') as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the train command's flags; their defaults are TrainSettings' and ModelConfig's."""
    parser.description = (
        'Train on DATA (DATA/train/CLASS/*.png and DATA/val/CLASS/*.png, or DATA/CLASS/*.png '
        'split by --val-split) or on --bags with a --label-topic. Writes best.pt and last.pt '
        '(checkpoints the node loads), metrics.csv and curves.png to --output. Several '
        'processes: torchrun --nproc_per_node N $(which cnn_rnn_perception) train ... '
        "(BatchNorm then normalises by all processes' frames). A temporal model "
        '(--temporal gru) needs no recipe of its own: its trunk trains (it reads each frame '
        'and its change from the last, and so sees motion), augmentation is the same for '
        'every frame of a run, and its gradients are clipped to norm 1.')
    default = TrainSettings()
    parser.add_argument('data', nargs='?', help='an ImageFolder-style directory')
    parser.add_argument('--bags', nargs='+', metavar='BAG', help='train on recorded bags')
    options.add(parser, '--label-topic', help='std_msgs/String label topic of --bags')
    options.add(parser, '--output', default='runs/train', help='(default: runs/train)')
    parser.add_argument('--resume', action='store_true', help='continue from OUTPUT/last.pt')
    options.add(parser, '--epochs', default=default.epochs,
                help=f'passes over the training data (default: {default.epochs})')
    options.add(parser, '--batch-size', default=default.batch_size,
                help=f'global batch size (default: {default.batch_size})')
    parser.add_argument('--optimizer', choices=('adamw', 'sgd'), default=default.optimizer)
    parser.add_argument('--lr', type=float, default=default.lr,
                        help=f'learning rate (default: {default.lr})')
    parser.add_argument('--weight-decay', type=float, default=default.weight_decay)
    parser.add_argument('--schedule', choices=('cosine', 'step', 'constant'),
                        default=default.schedule)
    options.add(parser, '--seed')
    parser.add_argument('--workers', type=int, default=default.workers,
                        help=f'DataLoader workers (default: {default.workers})')
    parser.add_argument('--val-split', type=float, default=default.val_split,
                        help='validation fraction without a val/ folder (default: '
                             f'{default.val_split})')
    parser.add_argument('--no-augment', dest='augment', action='store_false',
                        help='no colour jitter, blur, crops or tilts')
    parser.add_argument('--hflip', action='store_true',
                        help='also flip horizontally: only for labels that do not name a '
                             'side (refused for left/right labels)')
    parser.add_argument('--freeze-trunk', action='store_true',
                        help='train only the recurrent part and head (a temporal model then '
                             'does not see motion: its trunk reads the change from the last '
                             'frame through weights that start at zero)')
    parser.add_argument('--init-from', metavar='CHECKPOINT', default=default.init_from,
                        help='start from this checkpoint where names and shapes match, e.g. '
                             'a temporal model from a per-frame model of the same trunk')
    options.add(parser, '--device', '--no-progress')
    bags = parser.add_argument_group('bags and temporal models')
    bags.add_argument('--clip-length', type=int, default=default.clip_length,
                      help='with --temporal: consecutive frames per clip; each lane carries '
                           'its state from clip to clip and back-propagates this far '
                           f'(default: {default.clip_length}; longer clips take fewer steps '
                           'an epoch). --batch-size then counts clips')
    bags.add_argument('--steadiness', type=float, default=default.steadiness,
                      help='with --temporal: weight of a penalty on label probabilities '
                           'changing between neighbouring frames whose true label is the '
                           'same; against brief flips while a scene stays (default: 0)')
    bags.add_argument('--val-block-s', type=float, default=default.val_block_s,
                      help='bags are validated on held-out time blocks this long, never on '
                           f'random frames (default: {default.val_block_s:g})')
    options.add(bags, '--reset-after-s', help='a stamp gap longer than this ends a run, as it '
                                              'resets the state of a temporal model in the '
                                              'node (default: 1.0)')
    options.add_model_arguments(parser, title='model (flags override --config)')


def settings_from(args: argparse.Namespace) -> TrainSettings:
    """Return the TrainSettings the flags (over --config, over the defaults) describe."""
    return TrainSettings(model=options.model_config(args, num_classes=1),
                         **{f.name: getattr(args, f.name) for f in fields(TrainSettings)
                            if f.name != 'model'})


def main(args: argparse.Namespace) -> int:
    """Load the data, train, and say where the checkpoints are."""
    settings = settings_from(args)
    progress = not args.no_progress
    if settings.model.temporal and not args.bags:
        raise ValueError('--temporal trains on clips of recorded drives: give --bags with '
                         '--label-topic')
    if args.bags:
        if not args.label_topic:
            raise ValueError('training from bags needs --label-topic')
        if settings.model.temporal:
            classes, split, skipped = bag_runs(args.bags, args.label_topic, settings,
                                               progress=progress)
            train_set, val_set = split.train, split.val
            counts = (sum(map(len, train_set)), sum(map(len, val_set)))
            print(f'{counts[0]} training and {counts[1]} validation frames in '
                  f'{len(train_set)} and {len(val_set)} runs, clips of {settings.clip_length}')
            print(split.description)
        else:
            classes, train_set, val_set, skipped, how = bag_samples(
                args.bags, args.label_topic, settings, progress=progress)
            print(f'{len(train_set.items)} training and {len(val_set.items)} validation '
                  'frames')
            print(how)
    elif args.data:
        classes, train_set, val_set, skipped = image_folder_samples(
            args.data, settings.val_split, settings.seed)
        print(f'{len(train_set.items)} training and {len(val_set.items)} validation images')
    else:
        raise ValueError('give an image folder (DATA) or --bags with --label-topic')
    if skipped:
        print(f'skipped {len(skipped)} unreadable images or frames, e.g. {skipped[0]}')
    print(f'classes: {", ".join(classes)}')
    result = train(settings, classes=classes, train_samples=train_set, val_samples=val_set,
                   output=args.output, resume=args.resume, progress=progress)
    if os.environ.get('RANK', '0') == '0':  # under torchrun, the process that saved them
        print(f'best validation accuracy {result["best_val_accuracy"]:.4f}; checkpoints, '
              f'metrics.csv and curves.png in {result["output"]}')
    return 0
