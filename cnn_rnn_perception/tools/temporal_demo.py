"""
The temporal demo: where a per-frame model cannot see, and where it flickers.

Two tasks on synthetic drives, each with a per-frame model and a temporal model of the same
trunk, scored on held-out drives with ``evaluate``'s code (each topic one stream, the state
carried and reset by the engine's rules):

- ego-motion (``forward``, ``turning_left``, ``turning_right``, ``stopped``): no single frame
  tells, so a per-frame model is near chance (25%);
- scenes with figures crossing close to the camera: the label never changes while one passes,
  but a per-frame model's does. Both are scored raw and with the node's smoothing.

Drives and models are cached, so a second run only evaluates. It also times what the temporal
stage adds per frame on this machine, batch 1, as the node runs it.
"""

from __future__ import annotations

from dataclasses import replace
import json
from pathlib import Path
import shutil
import sys
import time
from typing import Any

import numpy as np

MODEL = {'backbone': 'resnet18', 'sequence': 'spatial', 'hidden_size': 64,
         'input_size': (64, 64), 'temporal_hidden_size': 64}
LABEL_TOPIC = '/scene_label'
SMOOTHING = 0.7
TASKS = ('ego-motion', 'occluded scenes')
# Held-out drives per task. Brief flips are rare events: on two 36 s scene drives a model's
# ratio to the per-frame model's moved between 0.0 and 0.23 with the seed, so scenes get five.
HELD_OUT = {'ego-motion': 2, 'occluded scenes': 5}


def _say(text: str) -> None:
    print(text, flush=True)


def prepare_drives(cache: Path, held_out: dict[str, int]) -> dict[str, dict[str, list[str]]]:
    """Draw the training drives and ``held_out[task]`` held-out ones; reuse drawn ones."""
    from cnn_rnn_perception.tools.synthetic.synth import write_ego_motion_drive, write_recording
    progress = sys.stderr.isatty()
    root = cache / 'drives'
    plan = {
        'ego-motion': {'train': [(seed, 60.0) for seed in range(8)],
                       'held_out': [(100 + seed, 60.0)
                                    for seed in range(held_out['ego-motion'])]},
        'occluded scenes': {'train': [(seed, 12) for seed in range(16)],
                            'held_out': [(100 + seed, 12)
                                         for seed in range(held_out['occluded scenes'])]},
    }
    _say(f'[1/4] drives in {root}: ego-motion (8 x 60 s to train, {held_out["ego-motion"]} x '
         f'60 s held out) and scenes with crossing figures (16 x 36 s to train, '
         f'{held_out["occluded scenes"]} x 36 s held out)')
    drives: dict[str, dict[str, list[str]]] = {}
    for task, splits in plan.items():
        drives[task] = {}
        for split, items in splits.items():
            paths = []
            for seed, amount in items:
                path = root / task.replace(' ', '_') / f'{split}_{seed}'
                drawn = path.with_name(path.name + '.complete')  # not a half-written bag
                if not drawn.exists():
                    shutil.rmtree(path, ignore_errors=True)  # half-written, or an old cache's
                    if task == 'ego-motion':
                        write_ego_motion_drive(path, seconds=amount, seed=seed, height=96,
                                               width=128, progress=progress)
                    else:
                        write_recording(path, scenes=amount, seconds_per_scene=3.0, seed=seed,
                                        height=120, width=160, occluders=True,
                                        progress=progress)
                    drawn.touch()
                paths.append(str(path))
            drives[task][split] = paths
    return drives


# How each model is trained. Ego-motion: the per-frame model keeps its trunk as initialised
# (random, frozen): trained on motion labels, a per-frame trunk learns nothing it can use. The
# temporal model trains with train's defaults: its trunk reads each frame's change from the
# last and learns to see motion (98.4% held out; with the trunk frozen, seeing pooled vectors
# only, the recipe before, 94.3%). Scenes: the per-frame model trains its trunk, and the
# temporal one starts from it with the trunk frozen (the usual LRCN recipe; on a frozen random
# trunk both scored 0.87 with twice the flicker); a figure crossing is not motion of the
# camera, so its trunk reads frames only (motion none). It is also taught steadiness (a cost
# on changing its probabilities while the true label stays): measured over eight runs on
# eight held-out drives, it helped on average, though one run to the next varied as much;
# more training drives helped most. The README has the runs.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    'ego-motion': {
        'per-frame': {'freeze_trunk': True, 'lr': 3e-3, 'epochs': 4, 'augment': False},
        'temporal': {}},
    'occluded scenes': {
        'per-frame': {'freeze_trunk': False, 'lr': 1e-3, 'epochs': 3, 'augment': True},
        # Back-propagation reaches across a whole crossing (up to 1 s, 15 frames).
        'temporal': {'freeze_trunk': True, 'lr': 1e-3, 'epochs': 6, 'augment': True,
                     'clip_length': 16, 'steadiness': 8.0, 'init_from': 'per-frame',
                     'motion': 'none'}},
}


def prepare_models(cache: Path, drives: dict, device: str, retrain: bool) -> dict:
    """Train (once) a per-frame and a temporal model for each task; return their paths."""
    from cnn_rnn_perception.core.model_config import ModelConfig
    from cnn_rnn_perception.tools.training.data import bag_runs, bag_samples
    from cnn_rnn_perception.tools.training.settings import TrainSettings
    from cnn_rnn_perception.tools.training.train import train
    progress = sys.stderr.isatty()
    models: dict[str, dict[str, Path]] = {}
    for task in TASKS:
        models[task] = {}
        for kind in ('per-frame', 'temporal'):
            output = cache / 'models' / task.replace(' ', '_') / kind
            models[task][kind] = output / 'best.pt'
            # A model trained by another recipe (an older version of the demo) is not reused.
            written = json.dumps({'model': MODEL, 'recipe': RECIPES[task][kind]}, default=str,
                                 sort_keys=True)
            if models[task][kind].exists() and not retrain \
                    and (output / 'recipe.json').is_file() \
                    and (output / 'recipe.json').read_text() == written:
                _say(f'[2/4] {task}, {kind} model: cached {models[task][kind]}')
                continue
            recipe = dict(RECIPES[task][kind])
            if 'init_from' in recipe:
                recipe['init_from'] = str(models[task][recipe['init_from']])
            temporal = kind == 'temporal'
            motion = recipe.pop('motion', 'frame_difference')
            settings = TrainSettings(
                model=ModelConfig(**MODEL, temporal='gru' if temporal else '', motion=motion),
                batch_size=8 if temporal else 32, workers=0, device=device, val_block_s=10.0,
                **recipe)
            trunk = 'frozen' if settings.freeze_trunk else 'trained'
            _say(f'[2/4] training the {task} {kind} model ({settings.epochs} epochs, trunk '
                 f'{trunk}{", from the per-frame model" if settings.init_from else ""})')
            if temporal:
                classes, split, _ = bag_runs(drives[task]['train'], LABEL_TOPIC, settings,
                                             progress=progress)
                train_data, val_data = split.train, split.val
            else:
                classes, train_data, val_data, _, _ = bag_samples(
                    drives[task]['train'], LABEL_TOPIC, settings, progress=progress)
            train(settings, classes=classes, train_samples=train_data, val_samples=val_data,
                  output=output, progress=progress)
            (output / 'recipe.json').write_text(written)
    return models


def temporal_overhead_ms(checkpoint: Path, frames: int = 200) -> tuple[float, float]:
    """Time batch-1 frames with and without the temporal stage, interleaved; (plain, temporal)."""
    from cnn_rnn_perception.core.checkpoint import load_checkpoint, seeded
    from cnn_rnn_perception.core.engine import EngineSettings, TorchEngine
    from cnn_rnn_perception.core.model import CnnRnnClassifier
    from cnn_rnn_perception.core.sample_frames import camera_frames

    loaded = load_checkpoint(checkpoint)
    # The same network without its temporal stage; its weights do not change its speed.
    with seeded(0):
        plain = CnnRnnClassifier(replace(loaded.config, temporal=''),
                                 load_pretrained=False).eval()
    settings = EngineSettings(device='cpu', compile_trunk=False, max_batch=1)
    images = camera_frames(8, 480, 640, seed=3)
    times: dict[str, list[float]] = {'plain': [], 'temporal': []}
    with TorchEngine(plain, labels=loaded.labels, preprocessing=loaded.preprocessing,
                     settings=settings) as without, \
            TorchEngine(loaded.model, labels=loaded.labels,
                        preprocessing=loaded.preprocessing, settings=settings) as with_:
        for index in range(frames):
            frame = images[index % len(images)]
            for name, engine in (('plain', without), ('temporal', with_)):
                started = time.perf_counter()
                engine.infer([frame], streams=['camera'], stamps=[index / 15])
                times[name].append((time.perf_counter() - started) * 1e3)
    return float(np.median(times['plain'])), float(np.median(times['temporal']))


def run_temporal_demo(cache: str | Path = '.cache/demo-temporal', *, device: str = 'auto',
                      retrain: bool = False, held_out: int | None = None) -> int:
    """
    Run the temporal demo; return 0 when the temporal models meet their targets.

    ``held_out`` drives per task replace ``HELD_OUT``'s when given.
    """
    from cnn_rnn_perception.core.engine import EngineSettings, TorchEngine
    from cnn_rnn_perception.tools.evaluation.runner import evaluate_bags

    started = time.monotonic()
    cache = Path(cache)
    drives = prepare_drives(cache, {task: held_out or HELD_OUT[task] for task in TASKS})
    models = prepare_models(cache, drives, device, retrain)
    _say('[3/4] scoring on the held-out drives')
    rows: list[dict[str, Any]] = []
    settings = EngineSettings(device=device, compile_trunk=False, max_batch=16)
    for task in TASKS:
        runs = [('per-frame', 'per-frame', 0.0),
                ('per-frame', 'per-frame + smoothing', SMOOTHING),
                ('temporal', 'temporal', 0.0),
                ('temporal', 'temporal + smoothing', SMOOTHING)]
        for kind, name, smoothing in runs:
            with TorchEngine.from_checkpoint(models[task][kind], settings) as engine:
                summary = evaluate_bags(drives[task]['held_out'], engine,
                                        label_topic=LABEL_TOPIC, smoothing=smoothing,
                                        progress=False)['summary']
            rows.append({'task': task, 'model': name, 'accuracy': summary['accuracy'],
                         'flicker': summary['flicker_per_min'],
                         'spurious': summary['spurious_changes_per_min'],
                         'truth': summary['truth_changes_per_min'],
                         # The robot's decision (the node's navigation defaults) over the same
                         # frames: what Nav2 would act on.
                         'decided': summary['decision_spurious_changes_per_min'],
                         'delay_p50': summary['decision_switch_delay_p50_s'],
                         'delay_p95': summary['decision_switch_delay_p95_s'],
                         'missed': summary['decision_missed_switches']})
    plain_ms, temporal_ms = temporal_overhead_ms(models['ego-motion']['temporal'])
    _say('[4/4] summary (held-out drives; label changes per minute: all of them, the spurious '
         "ones more than 0.5 s from a real change, and the ground truth's own; then the "
         "robot's decision with the node's defaults: its spurious changes per minute and its "
         'switch delay after a real change, p50 and p95, and the real changes it missed)')
    _say(f'  {"task":<16} {"model":<22} {"accuracy":>8} {"changes":>8} {"spurious":>8} '
         f'{"truth":>6} {"decided":>8} {"p50 s":>6} {"p95 s":>6} {"missed":>6}')
    for row in rows:
        _say(f'  {row["task"]:<16} {row["model"]:<22} {row["accuracy"]:>8.1%} '
             f'{row["flicker"]:>8.1f} {row["spurious"]:>8.1f} {row["truth"]:>6.1f} '
             f'{row["decided"]:>8.1f} {row["delay_p50"]:>6.2f} {row["delay_p95"]:>6.2f} '
             f'{row["missed"]:>6}')
    by = {(row['task'], row['model']): row for row in rows}
    ego = by[('ego-motion', 'temporal')]['accuracy']
    ego_frame = by[('ego-motion', 'per-frame')]['accuracy']
    scenes = by[('occluded scenes', 'temporal')]
    smoothed = by[('occluded scenes', 'per-frame + smoothing')]
    raw = by[('occluded scenes', 'per-frame')]
    checks = [
        (f'ego-motion: temporal {ego:.1%} >= 90%, per-frame {ego_frame:.1%} <= 40%',
         ego >= 0.9 and ego_frame <= 0.4),
        (f'scenes: temporal {scenes["accuracy"]:.1%} >= per-frame + smoothing '
         f'{smoothed["accuracy"]:.1%}', scenes['accuracy'] >= smoothed['accuracy']),
        # The ground truth itself changes (a new scene every 3 s): what is compared is the
        # flips while a scene stays what it is, which a navigation stack should never see.
        (f'scenes: temporal spurious flicker {scenes["spurious"]:.1f}/min <= one fifth of '
         f'per-frame {raw["spurious"]:.1f}/min', scenes['spurious'] <= raw['spurious'] / 5),
        # What Nav2 acts on: the robot's decision over the plain per-frame model.
        (f'scenes: decided spurious changes {raw["decided"]:.1f}/min <= one fifth of '
         f'per-frame {raw["spurious"]:.1f}/min, switch delay p95 {raw["delay_p95"]:.2f} s '
         '<= 1.0 s', raw['decided'] <= raw['spurious'] / 5 and raw['delay_p95'] <= 1.0),
        (f'temporal stage adds {temporal_ms - plain_ms:.2f} ms a frame, '
         f'{temporal_ms / plain_ms - 1:.0%} (batch 1, CPU: {plain_ms:.2f} -> '
         f'{temporal_ms:.2f} ms) <= 15%', temporal_ms <= 1.15 * plain_ms),
    ]
    for text, passed in checks:
        _say(f'  {"met " if passed else "MISSED"}  {text}')
    _say(f'  took {time.monotonic() - started:.0f} s; drives and models in {cache}')
    return 0 if all(passed for _, passed in checks) else 1
