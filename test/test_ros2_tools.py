"""
The node as a robot engineer drives it: ros2 launch, ros2 lifecycle, ros2 param, ros2 topic.

The node is started by ``ros2 launch cnn_rnn_perception perception.launch.py`` as its own
process (launch_ros finds the executable in ``lib/cnn_rnn_perception``, as on a robot) and is
then driven only through the ``ros2`` command line, each call a process of its own, exactly as
typed in a terminal and in the README. This process only plays the camera. The tools are
built from upstream sources by ``make setup`` (``tools/environment/ros_from_source.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import threading
import time

from cnn_rnn_perception.tools.evaluation.bags import BagSource
from cnn_rnn_perception.tools.synthetic.synth import write_recording
import numpy as np
import psutil
import pytest
from ros_harness import Harness, image_message, wait_for
import yaml

ROS2 = Path(sys.executable).with_name('ros2')
COMMAND = str(Path(sys.executable).with_name('cnn_rnn_perception'))
NODE = '/robot1/cnn_rnn_perception'
CAMERA = '/robot1/cam/image_raw'
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ROS2.exists(), reason='the ros2 command line is not installed: make '
                       'setup builds it from ROS_SOURCES (default ../shared/ros-sources)')]
TINY = {'compile': False, 'device': 'cpu', 'top_k': 3,
        'model': {'input_size': [64, 64], 'hidden_size': 8}}


def ros2(*args: str, timeout: float = 60.0, check: bool = True) -> str:
    """Run one ros2 command as typed in a terminal; return what it printed."""
    result = subprocess.run([str(ROS2), *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode:
        raise AssertionError(f'ros2 {" ".join(args)} exited {result.returncode}:\n'
                             f'{result.stdout}{result.stderr}')
    return result.stdout + result.stderr


def echo_once(topic: str, *qos: str) -> dict:
    """Return the first message on ``topic`` as ``ros2 topic echo --once`` prints it."""
    text = ros2('topic', 'echo', '--once', '--full-length', *qos, topic, timeout=60)
    return yaml.safe_load(text.split('\n---', 1)[0])


class Launch:
    """``ros2 launch`` in a process group of its own, as a terminal runs it."""

    def __init__(self, tmp_path: Path, *arguments: str) -> None:
        params = tmp_path / 'params.yaml'
        params.write_text(yaml.safe_dump({'/**': {'ros__parameters': TINY}}))
        self.log_path = tmp_path / 'launch.log'
        self._log = self.log_path.open('w')
        self.process = subprocess.Popen(
            [str(ROS2), 'launch', 'cnn_rnn_perception', 'perception.launch.py',
             'namespace:=robot1', f'image_topics:=[{CAMERA}]', f'params_file:={params}',
             *arguments],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text()

    def signal(self, number: int) -> None:
        """Signal the whole group: the terminal's Ctrl-C reaches launch and the node alike."""
        os.killpg(self.process.pid, number)

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait()
        self._log.close()
        return self.process.returncode


def lifecycle_state() -> str:
    return ros2('lifecycle', 'get', NODE).split()[0]


@pytest.fixture(scope='module')
def daemon():
    """Run one ros2 daemon for the module (each command finds the node at once)."""
    ros2('daemon', 'start')
    yield
    ros2('daemon', 'stop', check=False)


@pytest.fixture(scope='module')
def managed(tmp_path_factory, daemon):
    """Launch the node with autostart:=false, for a lifecycle manager (here: us) to drive."""
    launch = Launch(tmp_path_factory.mktemp('managed'), 'autostart:=false')
    harness = Harness(NODE)
    try:
        wait_for(lambda: NODE in ros2('node', 'list', check=False), 60,
                 lambda: f'{NODE} in ros2 node list; launch log:\n{launch.log()}')
        yield launch, harness, harness.camera(CAMERA, reliable=False)
    finally:
        harness.close()
        launch.stop()


def _camera_frames(harness, camera, count: int = 40) -> None:
    """Publish ``count`` frames at 20 Hz, best effort as a camera driver does."""
    harness.wait_subscribed(camera)
    pixels = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    for index in range(count):
        camera.publish(image_message(pixels, 'rgb8', 100.0 + index * 0.1, 'front'))
        time.sleep(0.05)


def test_ros2_finds_the_package_its_launch_file_and_executables(daemon):
    assert ros2('pkg', 'prefix', 'cnn_rnn_perception').strip() == sys.prefix
    executables = ros2('pkg', 'executables', 'cnn_rnn_perception')
    assert 'cnn_rnn_perception perception_node' in executables
    assert 'usage: cnn_rnn_perception' in ros2('run', 'cnn_rnn_perception',
                                               'cnn_rnn_perception', '--help')
    shown = ros2('launch', 'cnn_rnn_perception', 'perception.launch.py', '--show-args')
    for argument in ('params_file', 'namespace', 'image_topics', 'device', 'checkpoint',
                     'autostart', 'log_level'):
        assert f"'{argument}'" in shown


def test_lifecycle_set_configures_and_activates_a_launched_node(managed):
    launch, harness, camera = managed
    assert lifecycle_state() == 'unconfigured'
    assert 'Transitioning successful' in ros2('lifecycle', 'set', NODE, 'configure')
    assert lifecycle_state() == 'inactive'
    assert 'Transitioning successful' in ros2('lifecycle', 'set', NODE, 'activate')
    assert lifecycle_state() == 'active'
    _camera_frames(harness, camera, 10)
    wait_for(lambda: harness.scenes_for(CAMERA), 30, 'a scene from the launched node')


def test_param_set_get_and_dump_say_what_runs(managed):
    launch, harness, camera = managed
    assert 'Set parameter successful' in ros2('param', 'set', NODE, 'top_k', '2')
    assert ros2('param', 'get', NODE, 'top_k').strip() == 'Integer value is: 2'
    refused = ros2('param', 'set', NODE, 'top_k', '0')
    assert 'Setting parameter failed' in refused and 'Min: 1, Max: 1000' in refused
    assert ros2('param', 'get', NODE, 'top_k').strip() == 'Integer value is: 2'
    refused = ros2('param', 'set', NODE, 'model.strip', '2')
    assert 'Setting parameter failed' in refused and 'strip applies only to sequence' in refused
    # A reload parameter: the node builds the new engine in the background, then switches.
    assert 'Set parameter successful' in ros2('param', 'set', NODE, 'model.hidden_size', '12')
    dumped = yaml.safe_load(ros2('param', 'dump', NODE))
    values = dumped[NODE]['ros__parameters']
    assert values['top_k'] == 2 and values['model']['hidden_size'] == 12
    assert values['image_topics'] == [CAMERA] and values['device'] == 'cpu'
    before = len(harness.scenes_for(CAMERA))
    _camera_frames(harness, camera, 10)
    scenes = wait_for(lambda: harness.scenes_for(CAMERA)[before:], 30, 'scenes after reload')
    assert all(len(scene['top_k']) <= 2 for scene in scenes)


def test_topic_echo_shows_classifications_whose_ids_label_info_names(managed):
    launch, harness, camera = managed
    pytest.importorskip('vision_msgs', reason='vision_msgs is an apt package of a ROS install; '
                        'make setup builds it from ROS_SOURCES')
    label_info = echo_once(f'{NODE}/label_info', '--qos-durability', 'transient_local',
                           '--qos-reliability', 'reliable')
    names = {entry['class_id']: entry['class_name'] for entry in label_info['class_map']}
    assert set(names.values()) == {'corridor', 'open_space', 'doorway_left', 'doorway_right',
                                   'junction', 'blocked'}
    echoed = []
    echo = threading.Thread(target=lambda: echoed.append(echo_once(f'{NODE}/classification')))
    echo.start()
    while echo.is_alive():
        _camera_frames(harness, camera, 5)
    classification = echoed[0]
    assert classification['header']['frame_id'] == 'front'
    assert 1 <= len(classification['results']) <= 2  # top_k 2, set above
    for hypothesis in classification['results']:
        assert int(hypothesis['class_id']) in names and 0.0 <= hypothesis['score'] <= 1.0


def test_topic_echo_shows_the_scene_json_and_diagnostics(managed):
    launch, harness, camera = managed
    echoed = []
    echo = threading.Thread(target=lambda: echoed.append(echo_once(f'{NODE}/scene')))
    echo.start()
    while echo.is_alive():
        _camera_frames(harness, camera, 5)
    scene = json.loads(echoed[0]['data'])
    assert scene['topic'] == CAMERA and scene['frame_id'] == 'front'
    assert scene['label'] == scene['top_k'][0]['label']
    diagnostics = echo_once('/diagnostics')
    names = [status['name'] for status in diagnostics['status']]
    assert f'{NODE}: {CAMERA}' in names


def test_lifecycle_set_deactivates_and_cleans_up(managed):
    launch, harness, camera = managed
    assert 'Transitioning successful' in ros2('lifecycle', 'set', NODE, 'deactivate')
    assert lifecycle_state() == 'inactive'
    assert 'Transitioning successful' in ros2('lifecycle', 'set', NODE, 'cleanup')
    assert lifecycle_state() == 'unconfigured'
    assert 'Traceback' not in launch.log()


@pytest.mark.parametrize('how', ['ctrl-c twice', 'sigterm to the node', 'sigterm to the group'])
def test_a_launched_node_stops_cleanly(tmp_path, how):
    launch = Launch(tmp_path)
    harness = Harness(NODE)
    try:
        wait_for(lambda: 'classifying with' in launch.log(), 60,
                 lambda: f'the node to classify; launch log:\n{launch.log()}')
        # This node's own camera status: its /diagnostics publisher has matched ours, so the
        # last word cannot be lost to discovery (the module's other node has no camera now).
        key = f'{NODE}: {CAMERA}'
        wait_for(lambda: harness.statuses.get(key, {}).get('state') == 'active', 30,
                 lambda: f'diagnostics of the launched node: {harness.statuses}')
        node = psutil.Process(launch.process.pid).children(recursive=True)[-1]
        if how == 'sigterm to the node':  # a supervisor stopping the node
            node.send_signal(signal.SIGTERM)
        elif how == 'sigterm to the group':  # a service manager stopping the whole launch
            launch.signal(signal.SIGTERM)
        else:  # the terminal's SIGINT reaches launch and node; then a second Ctrl-C
            launch.signal(signal.SIGINT)
            time.sleep(0.2)
            launch.signal(signal.SIGINT)
        launch.process.wait(timeout=30)
        psutil.wait_procs([node], timeout=30)
        wait_for(lambda: harness.statuses[key].get('state') == 'finalized', 10,
                 lambda: f'the final diagnostics: {harness.statuses[key]}')
    finally:
        harness.close()
        code = launch.stop()
    log = launch.log()
    assert not node.is_running(), 'the node outlived its launch'
    assert 'Traceback' not in log and 'process has died' not in log, log
    if how != 'sigterm to the group':  # launch itself exits on SIGTERM without a word
        assert 'process has finished cleanly' in log and code == 0, log


def test_a_launched_node_classifies_a_replayed_bag_that_evaluate_scores(tmp_path, daemon):
    bag = write_recording(tmp_path / 'drive', scenes=2, seconds_per_scene=1.0, rate_hz=10.0,
                          seed=3, height=48, width=64, progress=False)
    with BagSource(bag) as source:
        frames = source.message_count(['/camera/image_raw'])
    launch = Launch(tmp_path)
    try:
        wait_for(lambda: 'classifying with' in launch.log(), 60,
                 lambda: f'the node to classify; launch log:\n{launch.log()}')
        remap = ['--remap', f'/camera/image_raw:={CAMERA}']
        replay = subprocess.run(
            [COMMAND, 'replay', str(bag), '--label-topic', '/scene_label', '--lockstep',
             '--record', str(tmp_path / 'scenes.jsonl'), '--scene-topic', f'{NODE}/scene',
             '--no-progress', *remap], capture_output=True, text=True, timeout=120)
        assert replay.returncode == 0, replay.stderr
        scored = subprocess.run(
            [COMMAND, 'evaluate', str(bag), '--scenes', str(tmp_path / 'scenes.jsonl'),
             '--label-topic', '/scene_label', '--summary', str(tmp_path / 'summary.json'),
             *remap], capture_output=True, text=True, timeout=120)
        assert scored.returncode == 0, scored.stderr
    finally:
        assert launch.stop() == 0, launch.log()
    summary = json.loads((tmp_path / 'summary.json').read_text())
    assert summary['frames'] == frames and summary['unmatched_scenes'] == 0
    assert summary['scored_frames'] == frames and summary['accuracy'] is not None
