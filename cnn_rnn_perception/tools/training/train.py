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
from dataclasses import fields, replace
import functools
import logging
from pathlib import Path
import time
from typing import Any

from cnn_rnn_perception.core.backbones import first_convolution
from cnn_rnn_perception.core.checkpoint import load_checkpoint, save_checkpoint
from cnn_rnn_perception.core.model import CnnRnnClassifier
from cnn_rnn_perception.core.model_config import ModelConfig, Preprocessing
from cnn_rnn_perception.core.preprocess import normalisation
from cnn_rnn_perception.tools import options
from cnn_rnn_perception.tools.distributed import Distributed, synchronise_batch_norm
from cnn_rnn_perception.tools.report import plot_history, write_metrics
from cnn_rnn_perception.tools.training.clips import Run
from cnn_rnn_perception.tools.training.data import (
    bag_runs, bag_samples, check_hflip, image_folder_samples, Samples)
from cnn_rnn_perception.tools.training.loop import (
    clip_lanes, ClipModel, frame_loaders, train_clips_one_epoch, train_one_epoch, TrainingRun,
    validate, validate_clips)
from cnn_rnn_perception.tools.training.settings import TrainSettings
import torch

_LOG = logging.getLogger(__name__)


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
    distributed = Distributed.from_environment()
    distributed.start('nccl' if device.type == 'cuda' else 'gloo')
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
    wrapped: torch.nn.Module = ClipModel(model) if temporal else model
    if distributed.world > 1:
        synchronise_batch_norm(model)
        wrapped = torch.nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[device.index] if device.type == 'cuda' else None)
    preprocessing = Preprocessing.for_config(config)
    offset, scale = normalisation(preprocessing, device)
    run = TrainingRun(settings, model, wrapped, optimizer, device, offset, scale, distributed,
                      progress)
    if temporal:
        lanes = clip_lanes(run, train_samples, val_samples)
        run_epoch = functools.partial(train_clips_one_epoch, run, train_samples, lanes)
        run_validation = functools.partial(validate_clips, run, val_samples)
    else:
        loaders = frame_loaders(run, train_samples, val_samples)
        run_epoch = functools.partial(train_one_epoch, run, loaders)
        run_validation = functools.partial(validate, run, loaders)
    best = max((row['val_accuracy'] for row in history), default=-1.0)
    for epoch in range(start_epoch, settings.epochs):
        started = time.perf_counter()
        wrapped.train()
        if settings.freeze_trunk:
            model.trunk.eval()  # frozen BatchNorm statistics too
        mean_loss, accuracy = run_epoch(epoch)
        scheduler.step()
        train_loss = distributed.sum_across(mean_loss) / distributed.world
        train_accuracy = distributed.sum_across(accuracy) / distributed.world
        model.eval()
        val_loss, val_accuracy = run_validation()
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
                'scheduler': scheduler.state_dict(), 'settings': settings.to_dict()})
            if val_accuracy > best:
                best = val_accuracy
                save_checkpoint(output / 'best.pt', model, **labels_info,
                                extra={'epoch': epoch + 1, 'val_accuracy': val_accuracy})
            write_metrics(output / 'metrics.csv', history)
            plot_history(history, output / 'curves.png')
    distributed.finish()
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
    if Distributed.from_environment().main:  # under torchrun, the process that saved them
        print(f'best validation accuracy {result["best_val_accuracy"]:.4f}; checkpoints, '
              f'metrics.csv and curves.png in {result["output"]}')
    return 0
