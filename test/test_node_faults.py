"""
The node under faults, over real DDS: bad values, bad files, reloads while it serves.

Every declared parameter is set to wrong types, out-of-range values, empty strings,
directories, unreadable, truncated and malformed files and invalid topic names, in a random
order, while a camera streams: the node must refuse each with a reason, keep its old value,
keep answering its services and keep classifying, with what it does matching what its
parameter service says.
"""

import json
from pathlib import Path
import random
import subprocess
import sys
import time

from bad_files import bad_model_files, bad_policy_files, common_bad_files
from cnn_rnn_perception.core.checkpoint import save_checkpoint, seeded
from cnn_rnn_perception.core.model import CnnRnnClassifier
from cnn_rnn_perception.core.model_config import ModelConfig
from cnn_rnn_perception.ros.outputs import VISION_MSGS
from cnn_rnn_perception.ros.parameters import PARAMETERS
import numpy as np
import pytest
from ros_harness import Harness, NodeProcess, SMALL_MODEL, Streamer, wait_for

pytestmark = pytest.mark.slow
TOPIC = '/fuzz/camera/image_raw'
INVALID_TOPICS = ['/front/1cam/image_raw', '/front//image_raw', '/front/image_raw/',
                  '/front camera/image', '{robot}/image', '']


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.close()


def _wrong_type(default):
    """Return a value of another type than the parameter's (rclpy refuses it, or we do)."""
    if isinstance(default, bool):
        return 'yes'
    if isinstance(default, (int, float)):
        return 'fast'
    if isinstance(default, list):
        return 3
    return 7


def fuzz_cases(folder):
    """Every parameter with the values it must refuse: (name, value) pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    truncated = folder / 'truncated.pt'
    with seeded(0):
        save_checkpoint(truncated, CnnRnnClassifier(ModelConfig(input_size=(64, 64),
                                                                hidden_size=4)))
    truncated.write_bytes(truncated.read_bytes()[:-400])
    files = {'model.checkpoint': [str(truncated)] + [
        str(path) for path, _ in bad_model_files(folder / 'models').values()],
        'navigation.policy_file': [
            str(path) for path, _ in bad_policy_files(folder / 'policy').values()],
        'model.trunk_weights': [
            str(path) for path, _ in common_bad_files(folder / 'weights').values()]}
    cases = []
    for spec in PARAMETERS:
        cases.append((spec.name, _wrong_type(spec.default)))
        if spec.minimum is not None:
            kind = int if isinstance(spec.default, int) else float
            cases += [(spec.name, kind(spec.minimum) - kind(1)),
                      (spec.name, kind(spec.maximum) * kind(10) + kind(1))]
        if spec.choices:
            cases.append((spec.name, 'nonsense'))
        if isinstance(spec.default, str) and spec.default:
            cases.append((spec.name, ''))  # refused, or taken where empty means something
        if spec.read_only:
            cases.append((spec.name, spec.default))  # read-only even when unchanged
        cases += [(spec.name, value) for value in files.get(spec.name, [])]
    cases += [('image_topics', [TOPIC, topic]) for topic in INVALID_TOPICS]
    cases += [('labels', []), ('labels', ['a', 'a']), ('model.input_size', [16, 16]),
              ('model.input_size', [64]), ('device', 'cuda:7'), ('device', 'gpu')]
    return cases


def test_no_value_of_any_parameter_kills_the_node_or_stops_it_classifying(tmp_path, harness):
    node = NodeProcess(tmp_path, *SMALL_MODEL, '-p', f'image_topics:=[{TOPIC}]',
                       '-p', 'silent_after_s:=1.0')
    streamer = None
    try:
        camera = harness.camera(TOPIC)
        harness.wait_subscribed(camera)
        streamer = Streamer(harness, camera, rate_hz=20.0)
        wait_for(lambda: harness.scenes_for(TOPIC), 30, 'a first result')
        cases = fuzz_cases(tmp_path / 'bad')
        random.Random(29).shuffle(cases)
        accepted, top_k = [], 5
        for index, (name, value) in enumerate(cases):
            before = harness.get_parameter(name)
            result = harness.set_parameter(name, value)
            after = harness.get_parameter(name)
            assert node.process.poll() is None, f'the node died of {name}={value!r}'
            if result.successful:
                assert after == value, (name, value, after)
                accepted.append((name, value))
            else:
                assert result.reason and after == before, (name, value, result.reason, after)
            if index % 10 == 9:
                # Still classifying, and doing what its parameter service says it does.
                top_k = 1 + index // 10 % 3
                assert harness.set_parameter('top_k', top_k).successful
                mark = len(harness.scenes)
                wait_for(lambda: any(len(scene['top_k']) == top_k
                                     for scene in harness.scenes[mark:]), 10,
                         f'results with top_k {top_k} after {name}={value!r}')
                assert harness.lifecycle_state() == 'active'
        # Only values that mean something empty were taken, and nothing else changed.
        assert {name for name, _ in accepted} <= {
            'navigation.frame_id', 'model.checkpoint', 'navigation.policy_file',
            'model.trunk_weights', 'model.temporal'}, accepted
        assert all(value == '' for _, value in accepted), accepted
        mark = len(harness.scenes)
        wait_for(lambda: len(harness.scenes) > mark + 5, 10, 'results after the last case')
        status = wait_for(lambda: harness.camera_status(TOPIC), 10, 'diagnostics')
        assert status['worker_restarts'] == '0' and status['worker_errors'] == '0', status
        assert harness.lifecycle_state() == 'active'
        assert 'Traceback' not in node.log(), 'a check raised what it did not anticipate'
    finally:
        if streamer is not None:
            streamer.close()
        assert node.stop() == 0, node.log()[-3000:]


def test_a_live_change_of_topics_loses_no_frame_and_retires_the_old_camera(tmp_path, harness):
    first, second = '/fuzz/left/image_raw', '/fuzz/right/image_raw'
    node = NodeProcess(tmp_path, *SMALL_MODEL, '-p', f'image_topics:=[{first},{second}]')
    streamers = []
    try:
        cameras = [harness.camera(first), harness.camera(second)]
        for camera in cameras:
            harness.wait_subscribed(camera)
        streamers = [Streamer(harness, camera, rate_hz=20.0) for camera in cameras]
        wait_for(lambda: harness.scenes_for(second), 30, 'results of the second camera')
        assert harness.set_parameter('image_topics', [first]).successful
        retired = wait_for(lambda: [line for line in node.log().splitlines()
                                    if f'{second}: no longer a camera' in line], 30,
                           'the second camera to be retired')
        assert len(retired) == 1
        received, *outcomes = [int(word) for word in retired[0].split()
                               if word.isdigit()]
        assert received > 0 and received == sum(outcomes), retired[0]
        mark = len(harness.scenes)
        wait_for(lambda: len(harness.scenes_for(first)) > mark + 5, 10, 'the first camera')
        assert not [scene for scene in harness.scenes[mark + 2:] if scene['topic'] == second]
        for streamer in streamers:
            streamer.close()
        streamers = []
        counts = wait_for(lambda: (c := harness.counts(first)) and c['pending'] == 0 and c, 10,
                          'settled counts')
        assert counts['received'] == (counts['classified'] + counts['dropped_stale']
                                      + counts['rejected'])
        status = harness.camera_status(first)
        assert status['worker_restarts'] == '0' and status['worker_errors'] == '0', status
    finally:
        for streamer in streamers:
            streamer.close()
        assert node.stop() == 0, node.log()[-3000:]


@pytest.mark.skipif(not VISION_MSGS, reason='vision_msgs is not installed')
def test_label_info_follows_a_live_threshold_and_the_robot_result_has_a_frame(
        tmp_path, harness):
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from vision_msgs.msg import Classification, LabelInfo

    node = NodeProcess(tmp_path, *SMALL_MODEL, '-p', f'image_topics:=[{TOPIC}]')
    streamer = None
    try:
        camera = harness.camera(TOPIC)
        harness.wait_subscribed(camera)
        robot = []
        harness.node.create_subscription(Classification,
                                         f'{harness.node_fqn}/robot_classification',
                                         robot.append, 10)
        streamer = Streamer(harness, camera, rate_hz=10.0)
        wait_for(lambda: robot, 30, 'a robot classification')
        assert robot[-1].header.frame_id == 'base_link'
        assert harness.set_parameter('navigation.frame_id', 'chassis').successful
        wait_for(lambda: robot[-1].header.frame_id == 'chassis', 10, 'the new frame_id')
        assert harness.set_parameter('score_threshold', 0.3).successful
        time.sleep(0.5)
        # A subscriber that comes late is given the threshold in force, not the first one.
        latest = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.TRANSIENT_LOCAL)
        infos = []
        harness.node.create_subscription(LabelInfo, f'{harness.node_fqn}/label_info',
                                         infos.append, latest)
        wait_for(lambda: infos, 10, 'LabelInfo')
        assert np.isclose(infos[-1].threshold, 0.3), infos[-1].threshold
    finally:
        if streamer is not None:
            streamer.close()
        assert node.stop() == 0, node.log()[-3000:]


def test_a_reload_with_backend_auto_never_stops_the_running_engine(tmp_path, harness):
    node = NodeProcess(tmp_path, *SMALL_MODEL, '-p', f'image_topics:=[{TOPIC}]',
                       '-p', 'backend:=auto', '-p', 'auto_rate_hz:=10.0')
    streamer = None
    try:
        camera = harness.camera(TOPIC)
        harness.wait_subscribed(camera)
        streamer = Streamer(harness, camera, rate_hz=20.0)
        wait_for(lambda: 'backend auto chose' in node.log(), 60, 'the first choice')
        wait_for(lambda: harness.scenes_for(TOPIC), 30, 'results')
        for rate, words in ((15.0, 'backend auto chose'), (10.0, 'backend auto reused')):
            mark, logged = len(harness.scenes), node.log().count(words)
            # A reload parameter: every candidate is built and timed again, beside the
            # engine that serves; set back, the choice measured before is reused.
            assert harness.set_parameter('auto_rate_hz', rate).successful
            wait_for(lambda: node.log().count(words) > logged, 90, f'"{words}"')
            time.sleep(1.0)
            gaps = np.diff(harness.scene_arrivals[mark:])
            # The bar is the torch reload's 0.5 s, doubled: on 2 cores the candidates' ONNX
            # export holds the GIL beside the worker (measured: 0.53 s at most). Before, the
            # timing rounds stopped inference for 3 s and more.
            assert len(gaps) > 20 and gaps.max() < 1.0, (
                f'results stopped for {gaps.max():.2f} s during the reload')
        assert max(streamer.state_seconds) < 1.0
    finally:
        if streamer is not None:
            streamer.close()
        assert node.stop() == 0, node.log()[-3000:]


def test_a_short_soak_accounts_for_every_frame_through_camera_and_model_changes(tmp_path):
    # The README's 30-minute figures come from this command; here one minute of it, with a
    # change every 6 s (a camera swapped, a model rebuilt, by turns).
    report_path = tmp_path / 'soak.json'
    run = subprocess.run(
        [str(Path(sys.executable).with_name('cnn_rnn_perception')), 'bench-node', '--soak', '1',
         '--change-every', '6', '--rates', '15', '--frame-size', '320x240', '--no-compile',
         '--device', 'cpu', '--input-size', '64x64', '--hidden-size', '16', '--no-progress',
         '--json', str(report_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode in (0, 1), run.stdout + run.stderr
    report = json.loads(report_path.read_text())
    assert report['changes_made'] >= 8 and not report['changes_refused'], report
    assert report['retired_cameras'] >= 4, report
    assert report['frames']['received'] > 1000, report
    assert report['frames_unaccounted'] == 0 and report['worker_restarts'] == 0, report
    assert report['longest_gap_s'] < 1.0, report
    assert 'unaccounted' in run.stdout and 'node RSS MB' in run.stdout
