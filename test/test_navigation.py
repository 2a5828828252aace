"""The robot's decided scene and its scene policy: the pure core, without ROS."""

from pathlib import Path

from cnn_rnn_perception.core.navigation import (
    DecisionSettings, load_policy, parse_policy, RobotDecision, SceneFusion, STALE, UNKNOWN)
from cnn_rnn_perception.core.sample_frames import NAVIGATION_LABELS
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LABELS = ['corridor', 'doorway', 'blocked']
HZ = 15.0


def one_hot(label: str, confidence: float = 0.9) -> np.ndarray:
    rest = (1.0 - confidence) / (len(LABELS) - 1)
    return np.array([confidence if name == label else rest for name in LABELS])


def drive(robot: RobotDecision, labels_per_frame: list[str], start_s: float = 0.0,
          camera: str = 'front') -> list[str]:
    """Feed one frame per label at 15 Hz; return the decision after each."""
    decided = []
    for index, label in enumerate(labels_per_frame):
        stamp = start_s + index / HZ
        robot.add([(camera, stamp, one_hot(label))], LABELS, now=stamp)
        decided.append(robot.decision.label)
    return decided


def test_fusion_weights_cameras_by_age_and_drops_those_outside_the_window():
    fusion = SceneFusion(window_s=0.5)
    fusion.add('front', 10.0, one_hot('corridor', 1.0))
    scene = fusion.add('rear', 10.25, one_hot('blocked', 1.0))
    # front is 0.25 s old: weight 0.5 against rear's 1.
    assert scene.cameras == ('front', 'rear')
    assert scene.probabilities[0] == pytest.approx(0.5 / 1.5)
    assert scene.probabilities[2] == pytest.approx(1.0 / 1.5)
    scene = fusion.add('rear', 10.6, one_hot('blocked', 1.0))
    assert scene.cameras == ('rear',) and scene.stamp_s == 10.6


def test_a_brief_flip_never_changes_the_decision_and_a_real_change_does_after_the_dwell():
    robot = RobotDecision(DecisionSettings(dwell_s=0.4, margin=0.1))
    frames = ['corridor'] * 15 + ['blocked'] * 5 + ['corridor'] * 15 + ['doorway'] * 15
    decided = drive(robot, frames)
    assert decided[0] == UNKNOWN  # a scene must dwell before it is decided
    assert decided[6] == 'corridor'  # 6 frames = 0.4 s at 15 Hz
    assert 'blocked' not in decided  # 5 frames (0.33 s) of a crossing figure
    first_doorway = decided.index('doorway')
    assert first_doorway == 35 + 6  # exactly the dwell after the true change


def test_a_lead_below_the_margin_does_not_change_the_decision():
    robot = RobotDecision(DecisionSettings(dwell_s=0.0, margin=0.2))
    robot.add([('front', 0.0, one_hot('corridor'))], LABELS, now=0.0)
    assert robot.decision.label == 'corridor'
    close = np.array([0.45, 0.55, 0.0])  # doorway leads, by 0.1 only
    for index in range(30):
        robot.add([('front', 0.1 * (index + 1), close)], LABELS, now=0.0)
    assert robot.decision.label == 'corridor'
    robot.add([('front', 5.0, np.array([0.3, 0.7, 0.0]))], LABELS, now=0.0)
    assert robot.decision.label == 'doorway'


def test_below_the_score_threshold_for_the_dwell_the_decision_is_unknown():
    robot = RobotDecision(DecisionSettings(dwell_s=0.2, margin=0.0, score_threshold=0.6))
    drive(robot, ['corridor'] * 10)
    assert robot.decision.label == 'corridor'
    flat = np.full(len(LABELS), 1 / len(LABELS))
    for index in range(10):
        stamp = 1.0 + index / HZ
        robot.add([('front', stamp, flat)], LABELS, now=stamp)
        if stamp - 1.0 < 0.19:
            assert robot.decision.label == 'corridor'
    assert robot.decision.label == UNKNOWN
    assert 'score_threshold 0.60' in robot.decision.reason


def test_staleness_comes_after_the_quiet_time_and_recovery_takes_the_dwell():
    robot = RobotDecision(DecisionSettings(dwell_s=0.4), stale_after_s=1.0, now=0.0)
    drive(robot, ['corridor'] * 10)
    last = 9 / HZ
    assert not robot.check_stale(last + 0.99)
    assert robot.check_stale(last + 1.01)
    assert robot.decision.label == STALE and 'no camera classified' in robot.decision.reason
    assert not robot.check_stale(last + 2.0)  # already stale: nothing new to send
    decided = drive(robot, ['corridor'] * 10, start_s=5.0)
    assert decided[:6] == [STALE] * 6 and decided[6] == 'corridor'


def test_time_going_backwards_restarts_the_dwell():
    robot = RobotDecision(DecisionSettings(dwell_s=0.4))
    drive(robot, ['corridor'] * 10, start_s=100.0)
    drive(robot, ['blocked'] * 4, start_s=100.7)
    drive(robot, ['blocked'] * 4, start_s=0.0)  # the bag looped
    assert robot.decision.label == 'corridor'


def test_the_example_policy_loads_against_the_demo_labels():
    policy = load_policy(ROOT / 'config' / 'navigation_policy.yaml', NAVIGATION_LABELS)
    assert policy.entry(STALE).speed_limit == 10.0
    assert policy.entry('corridor').controller == 'FollowPath'
    assert policy.uses('speed_limit') and policy.uses('planner')
    assert policy.entry('junction').controller is None  # left out: keeps the last choice


@pytest.mark.parametrize('document, message', [
    ({'scenes': {'coridor': {'speed_limit': 10.0}}}, "'coridor' is not a label"),
    ({'scenes': {'stale': {'speed_limit': -1.0}}}, 'must be a number >= 0'),
    ({'scenes': {'stale': {'speed_limit': 150.0}}}, 'is a percentage (0-100)'),
    ({'scenes': {'stale': {'speed': 1.0}}}, 'the outputs are speed_limit'),
    ({'scenes': {'stale': {'controller': ''}}}, 'must be a plugin name'),
    ({'scenes': {'stale': {'percentage': 'yes'}}}, 'must be true or false'),
    ({'corridor': {'speed_limit': 1.0}}, 'a "scenes:" table'),
])
def test_a_bad_policy_is_refused_naming_what_to_fix(document, message):
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
        parse_policy(document, LABELS)


def test_an_absolute_speed_limit_above_100_is_fine():
    policy = parse_policy({'scenes': {'corridor': {'speed_limit': 120.0, 'percentage': False}}},
                          LABELS)
    assert policy.entry('corridor').speed_limit == 120.0
