"""Synthetic navigation scenes: deterministic images and recordings of every class."""

from cnn_rnn_perception.bags import BagSource
from cnn_rnn_perception.synth import (
    CLASSES, draw_parameters, render, scene_frames, write_image_folder, write_recording)
import numpy as np
import pytest


def test_scenes_are_deterministic_by_seed_and_differ_across_seeds():
    first = [frame for _, frame in scene_frames(6, seed=3, height=60, width=80)]
    again = [frame for _, frame in scene_frames(6, seed=3, height=60, width=80)]
    other = [frame for _, frame in scene_frames(6, seed=4, height=60, width=80)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not any(np.array_equal(a, b) for a, b in zip(first, other))


def test_doorway_left_and_right_put_the_opening_on_their_side():
    rng = np.random.default_rng(0)
    darkness = {}
    for label in ('doorway_left', 'doorway_right'):
        frame = render(draw_parameters(label, rng), 120, 160).astype(float).mean(axis=2)
        darkness[label] = frame[:, :60].mean() - frame[:, -60:].mean()
    # The dark opening lowers the brightness of its own side.
    assert darkness['doorway_left'] < darkness['doorway_right']


def test_unknown_class_is_refused():
    with pytest.raises(ValueError, match='unknown scene class'):
        draw_parameters('staircase', np.random.default_rng(0))


def test_image_folder_has_every_class_in_both_splits(tmp_path):
    root = write_image_folder(tmp_path / 'images', train_per_class=2, val_per_class=1,
                              height=48, width=64, progress=False)
    for split, count in (('train', 2), ('val', 1)):
        for label in CLASSES:
            assert len(list((root / split / label).glob('*.png'))) == count


def test_recording_has_frames_labels_and_camera_info_at_the_camera_rate(tmp_path):
    path = write_recording(tmp_path / 'drive', scenes=3, seconds_per_scene=1.0, rate_hz=15.0,
                           seed=1, height=48, width=64, storage='mcap', progress=False)
    with BagSource(path) as bag:
        assert bag.topics == {'/camera/image_raw': 'sensor_msgs/msg/Image',
                              '/camera/camera_info': 'sensor_msgs/msg/CameraInfo',
                              '/scene_label': 'std_msgs/msg/String'}
        labels = bag.labels('/scene_label')
        frames = list(bag.frames(['/camera/image_raw'], labels))
        assert bag.message_count(['/camera/camera_info']) == len(frames) == 45
    stamps = np.array([frame.stamp_ns for frame in frames])
    assert np.allclose(np.diff(stamps), 1e9 / 15, atol=1)
    assert all(frame.label in CLASSES for frame in frames)
    changes = sum(1 for a, b in zip(frames, frames[1:]) if a.label != b.label)
    assert len(labels) == changes + 1 and 1 <= changes <= 2
