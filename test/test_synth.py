"""Synthetic navigation scenes: deterministic images and recordings of every class."""

from cnn_rnn_perception.core.image_conversion import message_to_frame
from cnn_rnn_perception.tools.evaluation.bags import BagSource
from cnn_rnn_perception.tools.synthetic.scenes import (
    CLASSES, draw_parameters, ego_motion_frames, MOTIONS, render, scene_frames)
from cnn_rnn_perception.tools.synthetic.synth import write_image_folder, write_recording
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


def test_ego_motion_drives_are_deterministic_and_move_the_view_as_labelled():
    first = list(ego_motion_frames(6.0, seed=3, height=48, width=64))
    again = list(ego_motion_frames(6.0, seed=3, height=48, width=64))
    assert len(first) == 90 and {m for m, _ in first} <= set(MOTIONS)
    assert all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(first, again))

    def shift(before: np.ndarray, after: np.ndarray) -> tuple[int, int]:
        """Return the (dx, dy) that best maps ``before`` onto ``after`` (image content)."""
        best = min(((dx, dy) for dx in range(-8, 9) for dy in range(-8, 9)),
                   key=lambda d: np.abs(np.roll(before, d, axis=(1, 0))[10:-10, 10:-10]
                                        .astype(int) - after[10:-10, 10:-10]).mean())
        return best
    for (motion, before), (next_motion, after) in zip(first, first[1:]):
        if motion != next_motion:
            continue
        dx, dy = shift(before, after)
        expected = {'forward': dy > 0 and abs(dx) <= 1, 'turning_left': dx > 0 and abs(dy) <= 1,
                    'turning_right': dx < 0 and abs(dy) <= 1,
                    'stopped': abs(dx) <= 1 and abs(dy) <= 1}[motion]
        assert expected, (motion, dx, dy)


def test_occluders_cross_the_view_without_changing_the_label(tmp_path):
    path = write_recording(tmp_path / 'drive', scenes=2, seconds_per_scene=4.0, rate_hz=10.0,
                           seed=2, height=48, width=64, occluders=True, progress=False)
    plain = write_recording(tmp_path / 'plain', scenes=2, seconds_per_scene=4.0, rate_hz=10.0,
                            seed=2, height=48, width=64, progress=False)
    frames = {}
    for name, bag_path in (('occluded', path), ('plain', plain)):
        with BagSource(bag_path) as bag:
            labels = bag.labels('/scene_label')
            frames[name] = [(item.label, message_to_frame(item.message)[0])
                            for item in bag.frames(['/camera/image_raw'], labels)]
    assert [label for label, _ in frames['occluded']] == [label for label, _ in frames['plain']]
    covered = [not np.array_equal(a, b) for (_, a), (_, b) in zip(frames['occluded'],
                                                                  frames['plain'])]
    assert 3 <= sum(covered) < len(covered) / 2  # some frames, briefly
