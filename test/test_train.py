"""Training: outputs a node can load, resume, bad input, bags, and DDP equivalence."""

import csv
import os
from pathlib import Path
import subprocess
import sys

from cnn_rnn_perception.core.checkpoint import load_checkpoint, save_checkpoint
from cnn_rnn_perception.core.engine import EngineSettings, TorchEngine
from cnn_rnn_perception.core.model import CnnRnnClassifier
from cnn_rnn_perception.core.model_config import ModelConfig
from cnn_rnn_perception.tools.evaluation.bags import BagWriter
from cnn_rnn_perception.tools.evaluation.runner import evaluate_bags
from cnn_rnn_perception.tools.synthetic.scenes import texture_motion_frames
from cnn_rnn_perception.tools.synthetic.synth import (
    write_ego_motion_drive, write_image_folder, write_recording, write_texture_motion_drive)
from cnn_rnn_perception.tools.training.clips import index_runs
from cnn_rnn_perception.tools.training.data import check_hflip, image_folder_samples
from cnn_rnn_perception.tools.training.loop import steadiness_penalty
from cnn_rnn_perception.tools.training.settings import TrainSettings
from cnn_rnn_perception.tools.training.train import _initialise_from, train
import numpy as np
import pytest
import torch

COMMAND = str(Path(sys.executable).with_name('cnn_rnn_perception'))
TINY = ['--input-size', '32x32', '--hidden-size', '8', '--batch-size', '12', '--workers', '0',
        '--no-progress']


def run(*args, env=None, timeout=600):
    return subprocess.run([COMMAND, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'CUDA_VISIBLE_DEVICES': '', **(env or {})})


@pytest.fixture(scope='module')
def images(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp('data') / 'images', train_per_class=4,
                              val_per_class=2, height=32, width=32, progress=False)


def tiny_settings(**overrides) -> TrainSettings:
    values = {'model': ModelConfig(input_size=(32, 32), hidden_size=8), 'epochs': 2,
              'batch_size': 12, 'workers': 0, 'device': 'cpu'}
    return TrainSettings(**{**values, **overrides})


@pytest.mark.slow
def test_training_writes_checkpoints_metrics_and_curves_then_resumes(tmp_path, images):
    result = run('train', str(images), '--output', str(tmp_path / 'run'), '--epochs', '2', *TINY)
    assert result.returncode == 0, result.stderr
    assert 'epoch   2/2' in result.stdout and 'best validation accuracy' in result.stdout
    best = load_checkpoint(tmp_path / 'run' / 'best.pt')
    assert best.labels == sorted(best.labels) and len(best.labels) == 6
    assert best.config.input_size == (32, 32)
    rows = list(csv.DictReader((tmp_path / 'run' / 'metrics.csv').open()))
    assert [row['epoch'] for row in rows] == ['1', '2']
    assert (tmp_path / 'run' / 'curves.png').read_bytes()[:4] == b'\x89PNG'
    resumed = run('train', str(images), '--output', str(tmp_path / 'run'), '--epochs', '3',
                  '--resume', *TINY)
    assert resumed.returncode == 0, resumed.stderr
    assert 'epoch   3/3' in resumed.stdout and 'epoch   1/3' not in resumed.stdout
    assert len(list(csv.DictReader((tmp_path / 'run' / 'metrics.csv').open()))) == 3
    other = run('train', str(images), '--output', str(tmp_path / 'run'), '--epochs', '4',
                '--resume', *TINY, '--rnn', 'gru')
    assert other.returncode == 2
    assert "holds a different model: rnn 'lstm' (this run: 'gru')" in other.stderr


def test_bad_training_data_is_named_without_a_traceback(tmp_path, images):
    empty = tmp_path / 'empty'
    (empty / 'corridor').mkdir(parents=True)
    (empty / 'blocked').mkdir()
    (empty / 'blocked' / 'a.png').write_bytes((images / 'train' / 'blocked').glob('*.png')
                                              .__next__().read_bytes())
    with pytest.raises(ValueError, match='class folder .*corridor has no readable images'):
        image_folder_samples(empty, 0.2, 0)
    no_val = tmp_path / 'no_val'
    for label in ('corridor', 'blocked'):
        (no_val / 'train' / label).mkdir(parents=True)
        (no_val / 'val' / label).mkdir(parents=True)
        for source in list((images / 'train' / label).glob('*.png')):
            (no_val / 'train' / label / source.name).write_bytes(source.read_bytes())
    (no_val / 'val' / 'corridor' / 'x.png').write_bytes(
        next((images / 'val' / 'corridor').glob('*.png')).read_bytes())
    with pytest.raises(ValueError, match='val has no images of blocked'):
        image_folder_samples(no_val, 0.2, 0)
    broken = no_val / 'train' / 'corridor' / 'broken.png'
    broken.write_bytes(b'not a png')
    (no_val / 'val' / 'blocked' / 'y.png').write_bytes(
        next((images / 'val' / 'blocked').glob('*.png')).read_bytes())
    classes, train_set, _, skipped = image_folder_samples(no_val, 0.2, 0)
    assert skipped == [str(broken)] and len(train_set.items) == 8
    with pytest.raises(ValueError, match='horizontal flip would swap the meaning of '
                                         'doorway_left, doorway_right'):
        check_hflip(True, ['corridor', 'doorway_left', 'doorway_right'])
    check_hflip(True, ['corridor', 'blocked'])


def test_training_from_a_labelled_bag(tmp_path):
    bag = write_recording(tmp_path / 'drive', scenes=6, seconds_per_scene=0.5, rate_hz=12,
                          height=48, width=64, progress=False)
    result = run('train', '--bags', str(bag), '--label-topic', '/scene_label', '--output',
                 str(tmp_path / 'run'), '--epochs', '1', '--val-block-s', '0.5', *TINY)
    assert result.returncode == 0, result.stderr
    # 6 scenes x 0.5 s x 12 Hz = 36 labelled frames in blocks of 0.5 s (6 frames), 1 in 5
    # held out: whole blocks, never random frames.
    assert '30 training and 6 validation frames' in result.stdout
    assert 'validation: 1 of 6 time blocks of 0.5 s (6 frames) held out' in result.stdout
    assert len(load_checkpoint(tmp_path / 'run' / 'last.pt').labels) >= 2


@pytest.mark.slow
def test_two_ddp_processes_train_the_same_model_as_one(tmp_path, images):
    """Frozen trunk (BatchNorm statistics are per process otherwise), no augmentation."""
    common = ['train', str(images), '--epochs', '2', '--no-augment', '--freeze-trunk',
              '--seed', '5', '--lr', '0.01', *TINY]
    single = run(*common, '--output', str(tmp_path / 'one'))
    assert single.returncode == 0, single.stderr
    loopback = {'MASTER_ADDR': '127.0.0.1', 'GLOO_SOCKET_IFNAME': 'lo', 'OMP_NUM_THREADS': '1'}
    double = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr',
         '127.0.0.1', '--master_port', str(29500 + os.getpid() % 1000), COMMAND, *common,
         '--output', str(tmp_path / 'two')],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, 'CUDA_VISIBLE_DEVICES': '', **loopback})
    assert double.returncode == 0, double.stderr[-3000:]
    one = list(csv.DictReader((tmp_path / 'one' / 'metrics.csv').open()))
    two = list(csv.DictReader((tmp_path / 'two' / 'metrics.csv').open()))
    for a, b in zip(one, two):
        assert float(a['train_loss']) == pytest.approx(float(b['train_loss']), rel=1e-4)
        assert float(a['val_loss']) == pytest.approx(float(b['val_loss']), rel=1e-4)
    weights_one = load_checkpoint(tmp_path / 'one' / 'last.pt').model.state_dict()
    weights_two = load_checkpoint(tmp_path / 'two' / 'last.pt').model.state_dict()
    for name in ('rnn.weight_ih_l0', 'head.weight'):
        torch.testing.assert_close(weights_one[name], weights_two[name], atol=1e-5, rtol=1e-4)


def test_training_settings_are_validated():
    with pytest.raises(ValueError, match='optimizer must be adamw or sgd'):
        tiny_settings(optimizer='lion')
    with pytest.raises(ValueError, match='val_split must be between 0 and 1'):
        tiny_settings(val_split=1.5)
    with pytest.raises(ValueError, match='steadiness must be >= 0'):
        tiny_settings(steadiness=-1)


def confident(labels: list[int], classes: int = 3) -> torch.Tensor:
    """Logits of one lane that is sure of each frame's label."""
    return torch.nn.functional.one_hot(torch.tensor([labels]), classes).float() * 20


def test_steadiness_costs_a_flip_while_the_scene_stays_but_not_a_real_change():
    truth = torch.tensor([[0, 0, 0, 1, 1, 1]])
    valid = torch.ones_like(truth, dtype=torch.bool)
    following = steadiness_penalty(confident([0, 0, 0, 1, 1, 1]), truth, valid)
    flipping = steadiness_penalty(confident([0, 2, 0, 1, 1, 1]), truth, valid)
    assert float(following) < 1e-6, 'following the truth through its change cost something'
    assert float(flipping) > 0.5
    # A padded frame (a run's last clip, masked) neither costs nor counts.
    padded = torch.tensor([[True, True, True, True, True, False]])
    assert float(steadiness_penalty(confident([0, 0, 0, 1, 1, 2]), truth, padded)) < 1e-6
    assert float(steadiness_penalty(confident([0]), truth[:, :1], valid[:, :1])) == 0


def test_short_training_run_learns_the_synthetic_classes(tmp_path, images):
    classes, train_set, val_set, _ = image_folder_samples(images, 0.2, 0)
    result = train(tiny_settings(epochs=3, augment=False, lr=3e-3), classes=classes,
                   train_samples=train_set, val_samples=val_set, output=tmp_path / 'run',
                   progress=False)
    history = result['history']
    assert history[-1]['train_loss'] < history[0]['train_loss']


@pytest.mark.slow
def test_a_temporal_model_learns_ego_motion_that_no_single_frame_shows(tmp_path):
    drives = [str(write_ego_motion_drive(tmp_path / f'drive_{seed}', seconds=60, seed=seed,
                                         progress=False)) for seed in range(4)]
    held_out = write_ego_motion_drive(tmp_path / 'held_out', seconds=30, seed=99,
                                      progress=False)
    # The demo's recipe at its input size, with a random trunk kept frozen.
    result = run('train', '--bags', *drives, '--label-topic', '/scene_label', '--temporal',
                 'gru', '--temporal-hidden-size', '64', '--hidden-size', '64', '--input-size',
                 '64x64', '--clip-length', '8', '--batch-size', '8', '--epochs', '10', '--lr',
                 '3e-3', '--no-augment', '--freeze-trunk', '--val-block-s', '5', '--workers',
                 '0', '--output', str(tmp_path / 'run'), '--no-progress')
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'time blocks of 5 s' in result.stdout
    checkpoint = tmp_path / 'run' / 'best.pt'
    assert load_checkpoint(checkpoint).config.temporal == 'gru'
    accuracy = {}
    # The same model, its state carried along the drive, and reset before every frame.
    for name, reset_after_s in (('carried', 1.0), ('every frame alone', 1e-3)):
        settings = EngineSettings(device='cpu', compile_trunk=False, reset_after_s=reset_after_s)
        with TorchEngine.from_checkpoint(checkpoint, settings) as engine:
            accuracy[name] = evaluate_bags([str(held_out)], engine, label_topic='/scene_label',
                                           progress=False)['summary']['accuracy']
    assert accuracy['carried'] >= 0.8 and accuracy['every frame alone'] <= 0.45, accuracy


def test_steps_whose_frames_all_fail_to_decode_do_not_poison_the_epoch(tmp_path, capsys):
    # One camera decodes (24 frames); another's 60 JPEGs are all broken. They index (no pixels
    # are read then) and fail only when training reads them.
    with BagWriter(tmp_path / 'bag') as bag:
        bag.write_label('/scene_label', 'pan_left', 0)
        frames = texture_motion_frames(1, seed=4, size=32, segment_s=(1.6, 1.7))
        for index, (_, frame) in enumerate(frames):
            bag.write_image('/good/image_raw', frame, 'bgr8', 1_000 + index * 66_000_000)
        for index in range(60):
            bag.write_compressed('/broken/image_raw/compressed', b'\xff\xd8\xff garbage',
                                 'jpeg', 2_000 + index * 66_000_000)
    classes, runs, _ = index_runs([str(tmp_path / 'bag')], '/scene_label', progress=False)
    assert sorted(map(len, runs))[1] == 60
    good = [run for run in runs if run.topic == '/good/image_raw']
    settings = tiny_settings(model=ModelConfig(input_size=(32, 32), hidden_size=8,
                                               temporal='gru', temporal_hidden_size=8),
                             clip_length=8, batch_size=2, epochs=1)
    result = train(settings, classes=classes, train_samples=runs, val_samples=good,
                   output=tmp_path / 'run', progress=False)
    row = result['history'][0]
    assert np.isfinite(row['train_loss']) and np.isfinite(row['val_loss']), row


@pytest.mark.slow
def test_temporal_training_under_torchrun_finishes_and_matches_one_process(tmp_path):
    """
    Two gloo processes on loopback whose own lanes need different numbers of steps.

    BatchNorm normalises by both processes' frames; the trunk is frozen as in the per-frame
    test, because a random trunk at 32x32 turns float rounding into visible differences.
    """
    drive = write_texture_motion_drive(tmp_path / 'drive', segments=8, seed=3, size=32,
                                       progress=False)
    common = ['train', '--bags', str(drive), '--label-topic', '/scene_label', '--temporal',
              'gru', '--temporal-hidden-size', '8', '--clip-length', '4', '--val-block-s', '2',
              '--epochs', '2', '--no-augment', '--freeze-trunk', '--seed', '5', *TINY[:-3],
              '--batch-size', '4',
              '--workers', '0', '--no-progress']
    single = run(*common, '--output', str(tmp_path / 'one'))
    assert single.returncode == 0, single.stderr
    loopback = {'MASTER_ADDR': '127.0.0.1', 'GLOO_SOCKET_IFNAME': 'lo', 'OMP_NUM_THREADS': '1'}
    double = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr',
         '127.0.0.1', '--master_port', str(29500 + (os.getpid() + 7) % 1000), COMMAND, *common,
         '--output', str(tmp_path / 'two')],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, 'CUDA_VISIBLE_DEVICES': '', **loopback})
    assert double.returncode == 0, double.stderr[-3000:]
    one = list(csv.DictReader((tmp_path / 'one' / 'metrics.csv').open()))
    two = list(csv.DictReader((tmp_path / 'two' / 'metrics.csv').open()))
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert float(a['train_loss']) == pytest.approx(float(b['train_loss']), rel=1e-4)
        assert float(a['val_loss']) == pytest.approx(float(b['val_loss']), rel=1e-4)
    weights_one = load_checkpoint(tmp_path / 'one' / 'last.pt').model.state_dict()
    weights_two = load_checkpoint(tmp_path / 'two' / 'last.pt').model.state_dict()
    for name in ('rnn.weight_ih_l0', 'temporal_norm.running_mean', 'temporal_norm.running_var',
                 'temporal.weight_ih_l0', 'head.weight'):
        torch.testing.assert_close(weights_one[name], weights_two[name], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_with_default_recipe_a_temporal_model_sees_camera_motion_over_plain_texture(tmp_path):
    """
    Pans, zooms and standing still over smooth random textures: no frame tells them apart.

    Drawn unlike the package's drives (no floor, no coloured light, segments of 1.5-3 s that
    each start somewhere new); the held-out drive has textures of its own.
    """
    drives = [str(write_texture_motion_drive(tmp_path / f'drive_{seed}', segments=15,
                                             seed=seed, progress=False))
              for seed in (10, 11, 12, 13)]
    held_out = str(write_texture_motion_drive(tmp_path / 'held_out', segments=20, seed=77,
                                              progress=False))
    model = ['--input-size', '64x64', '--hidden-size', '32', '--workers', '0', '--no-progress']
    accuracy = {}
    for name, flags in (('per-frame', ['--epochs', '3']), ('temporal', ['--temporal', 'gru'])):
        result = run('train', '--bags', *drives, '--label-topic', '/scene_label', *flags, *model,
                     '--output', str(tmp_path / name))
        assert result.returncode == 0, result.stdout + result.stderr
        settings = EngineSettings(device='cpu', compile_trunk=False)
        with TorchEngine.from_checkpoint(tmp_path / name / 'best.pt', settings) as engine:
            accuracy[name] = evaluate_bags([held_out], engine, label_topic='/scene_label',
                                           progress=False)['summary']['accuracy']
    assert accuracy['temporal'] >= 0.85 and accuracy['per-frame'] <= 0.45, accuracy


def test_a_temporal_model_starts_from_a_per_frame_trunk_with_its_image_channels(tmp_path):
    config = ModelConfig(input_size=(32, 32), hidden_size=8, num_classes=3)
    torch.manual_seed(1)
    per_frame = CnnRnnClassifier(config)
    save_checkpoint(tmp_path / 'per_frame.pt', per_frame)
    temporal = CnnRnnClassifier(ModelConfig(input_size=(32, 32), hidden_size=8, num_classes=3,
                                            temporal='gru', temporal_hidden_size=8))
    _initialise_from(temporal, str(tmp_path / 'per_frame.pt'))
    image, change = temporal.trunk[0].weight[:, :3], temporal.trunk[0].weight[:, 3:]
    torch.testing.assert_close(image, per_frame.trunk[0].weight)
    assert (change == 0).all()
    torch.testing.assert_close(temporal.rnn.weight_ih_l0, per_frame.rnn.weight_ih_l0)
