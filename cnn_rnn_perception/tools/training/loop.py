"""
The training loop as named functions: an epoch and a validation, for frames and for clips.

``train_one_epoch`` and ``validate`` run a per-frame model over decoded frames;
``train_clips_one_epoch`` and ``validate_clips`` run a temporal model over clips streamed from
runs of labelled bags, each lane carrying its state to its next clip (truncated
back-propagation through time; see ``clips``). What a run's epochs share is one
``TrainingRun``; ``train`` builds it and calls these in turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from cnn_rnn_perception.core.model import CnnRnnClassifier
from cnn_rnn_perception.core.preprocess import normalise_uint8_batch, resize_frame
from cnn_rnn_perception.tools.distributed import Distributed
from cnn_rnn_perception.tools.training.clips import (
    ClipBatches, lanes_for, plan_lanes, prefetched, Run, steps_for)
from cnn_rnn_perception.tools.training.data import augment, FrameDataset, Samples
from cnn_rnn_perception.tools.training.settings import TrainSettings
import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

TEMPORAL_GRADIENT_NORM = 1.0


@dataclass
class TrainingRun:
    """What every epoch and validation of one training run share."""

    settings: TrainSettings
    model: CnnRnnClassifier
    # What the loss goes through: the model, its clip form, or DistributedDataParallel over it.
    wrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    offset: torch.Tensor
    scale: torch.Tensor
    distributed: Distributed
    progress: bool = True

    @property
    def use_amp(self) -> bool:
        """bf16 autocast on GPUs; plain fp32 on CPUs, where it is not faster."""
        return self.device.type == 'cuda'

    def inputs(self, batch: torch.Tensor) -> torch.Tensor:
        """Return a uint8 NHWC batch as the normalised float input the model reads."""
        return normalise_uint8_batch(batch.to(self.device, non_blocking=True), self.offset,
                                     self.scale)

    def bar(self, iterable: Iterable, total: int, description: str) -> tqdm:
        """Return a progress bar over ``iterable``, shown by process 0 only."""
        return tqdm(iterable, total=total, desc=description, leave=False,
                    disable=not (self.progress and self.distributed.main))

    def step(self, loss: torch.Tensor) -> None:
        """Take one optimiser step on ``loss``."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.model.temporal is not None:
            # Back-propagation through time sums a clip's gradients through the recurrent
            # state; one clip with a burst (a cut in the drive) threw the epoch back (held-out
            # accuracy swinging 0.70-0.96 between epochs). The RNN's usual remedy.
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), TEMPORAL_GRADIENT_NORM)
        self.optimizer.step()


class ClipModel(torch.nn.Module):
    """``forward_clips`` as ``forward``, which is what DistributedDataParallel calls."""

    def __init__(self, model: CnnRnnClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, clips: torch.Tensor, state: torch.Tensor, valid: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_clips(clips, state, valid)


# -- frames ------------------------------------------------------------------------------------

@dataclass
class FrameLoaders:
    """A per-frame model's training and validation batches."""

    train_set: FrameDataset
    sampler: DistributedSampler
    train: DataLoader
    val: DataLoader


def frame_loaders(run: TrainingRun, train_samples: Samples, val_samples: Samples
                  ) -> FrameLoaders:
    """Return the loaders; every process takes its share of one seeded permutation."""
    settings, distributed = run.settings, run.distributed
    size = run.model.config.input_size
    train_set = FrameDataset(train_samples, size, augment=settings.augment,
                             hflip=settings.hflip, seed=settings.seed)
    val_set = FrameDataset(val_samples, size, augment=False, hflip=False, seed=settings.seed)
    sampler = DistributedSampler(train_set, num_replicas=distributed.world,
                                 rank=distributed.rank, shuffle=True, seed=settings.seed,
                                 drop_last=True)
    loader = DataLoader(train_set, batch_size=settings.batch_size // distributed.world,
                        sampler=sampler, drop_last=True, num_workers=settings.workers,
                        persistent_workers=settings.workers > 0)
    if len(loader) == 0:
        raise ValueError(f'{len(train_set)} training images make no full batch of '
                         f'{settings.batch_size}; lower --batch-size')
    val_loader = DataLoader(val_set, batch_size=settings.batch_size,
                            num_workers=settings.workers)
    return FrameLoaders(train_set, sampler, loader, val_loader)


def train_one_epoch(run: TrainingRun, loaders: FrameLoaders, epoch: int) -> tuple[float, float]:
    """Train one pass over this process's frames; return its mean loss and accuracy."""
    loaders.sampler.set_epoch(epoch)
    loaders.train_set.epoch = epoch
    losses, correct, seen = [], 0, 0
    bar = run.bar(loaders.train, len(loaders.train), f'epoch {epoch + 1}/{run.settings.epochs}')
    for images, targets in bar:
        targets = targets.to(run.device)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.use_amp):
            logits = run.wrapped(run.inputs(images))
            loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        run.step(loss)
        losses.append(loss.item())
        correct += int((logits.argmax(1) == targets).sum())
        seen += len(targets)
        bar.set_postfix(loss=f'{np.mean(losses):.3f}')
    return float(np.mean(losses)), correct / seen


def validate(run: TrainingRun, loaders: FrameLoaders) -> tuple[float, float]:
    """Return the mean loss and accuracy over the validation frames."""
    def pairs() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, targets in loaders.val:
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.use_amp):
                logits = run.model(run.inputs(images)).float()
            yield logits, targets.to(run.device)
    return scored(pairs())


# -- clips -------------------------------------------------------------------------------------

def clip_lanes(run: TrainingRun, train_runs: list[Run], val_runs: list[Run]) -> int:
    """Return how many lanes of clips a training step reads (and say why when fewer)."""
    if not train_runs or not val_runs:
        raise ValueError('temporal training needs runs to train on and to validate on')
    lanes, why = lanes_for(train_runs, run.settings.batch_size, run.distributed.world)
    if why and run.distributed.main:
        print(why, flush=True)
    return lanes


def _clips(run: TrainingRun, batches: ClipBatches, model: torch.nn.Module, description: str
           ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """Yield logits [lanes, length, classes], targets, valid and all processes' frame count."""
    state = None
    for batch in run.bar(prefetched(batches), len(batches), description):
        frames = batch.frames.to(run.device, non_blocking=True)
        lanes, length = frames.shape[:2]
        clips = run.inputs(frames.flatten(0, 1)).unflatten(0, (lanes, length))
        if state is None:
            state = run.model.zero_state(lanes, run.device)
        state = state * (~batch.fresh).to(run.device).unsqueeze(1)
        valid = batch.valid.to(run.device)
        count = int(valid.sum())
        everywhere = int(run.distributed.sum_across(count))
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
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.use_amp):
            logits, state = model(clips, state, real)
        state = state.detach().float()
        yield logits.float(), batch.targets.to(run.device), valid, everywhere


def train_clips_one_epoch(run: TrainingRun, train_runs: list[Run], lanes: int, epoch: int
                          ) -> tuple[float, float]:
    """Train one pass of clips over the runs; return every process's mean loss and accuracy."""
    settings, distributed = run.settings, run.distributed
    size = run.model.config.input_size

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
    for logits, targets, valid, everywhere in _clips(
            run, batches, run.wrapped, f'epoch {epoch + 1}/{settings.epochs}'):
        count = int(valid.sum())
        # Summed over this process's frames, divided by all processes' frames (and times the
        # processes, which DistributedDataParallel averages over): the gradient of the mean
        # over the global batch, however frames fall.
        loss = torch.nn.functional.cross_entropy(
            logits[valid], targets[valid], reduction='sum') * (distributed.world / everywhere)
        if settings.steadiness:
            loss = loss + settings.steadiness * steadiness_penalty(logits, targets, valid)
        run.step(loss)
        total_loss += loss.item() * everywhere / distributed.world
        correct += int((logits[valid].argmax(1) == targets[valid]).sum())
        seen += count
    # Over every process's frames, so each process returns the same epoch figures.
    seen = distributed.sum_across(seen)
    return (distributed.sum_across(total_loss) / max(seen, 1),
            distributed.sum_across(correct) / max(seen, 1))


def validate_clips(run: TrainingRun, val_runs: list[Run]) -> tuple[float, float]:
    """Return the mean loss and accuracy over the held-out runs, each one stream end to end."""
    settings = run.settings
    plan = plan_lanes(val_runs, min(settings.batch_size, len(val_runs)), settings.clip_length, 0)
    batches = ClipBatches(val_runs, plan, settings.clip_length, run.model.config.input_size)
    return scored((logits[valid], targets[valid]) for logits, targets, valid, _
                  in _clips(run, batches, run.model.forward_clips, 'validating'))


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


def scored(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """Return mean loss and accuracy over (logits, targets) pairs, without gradients."""
    total_loss, correct, seen = 0.0, 0, 0
    with torch.no_grad():  # grad mode is per thread: the generators run under it too
        for logits, targets in pairs:
            total_loss += float(torch.nn.functional.cross_entropy(logits, targets,
                                                                  reduction='sum'))
            correct += int((logits.argmax(1) == targets).sum())
            seen += len(targets)
    return total_loss / max(seen, 1), correct / max(seen, 1)
