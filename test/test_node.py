"""The perception node in its own process, over real DDS (loopback only)."""

from pathlib import Path
import threading
import time

from cnn_rnn_perception.core.checkpoint import save_checkpoint, seeded
from cnn_rnn_perception.core.model import CnnRnnClassifier
from cnn_rnn_perception.core.model_config import ModelConfig
from lifecycle_msgs.msg import Transition
import numpy as np
import pytest
from ros_harness import (
    Harness, image_message, jpeg_message, NodeProcess, ROOT, SMALL_MODEL, Streamer, wait_for)
import torch

pytestmark = pytest.mark.slow

RNG = np.random.default_rng(0)


def pixels(channels: int = 3, height: int = 240, width: int = 320) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, channels), dtype=np.uint8)


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.close()


def start(tmp_path, *ros_args):
    return NodeProcess(tmp_path, *SMALL_MODEL, *ros_args)


def wait_for_or_none(predicate, timeout_s: float):
    """Poll ``predicate`` for up to ``timeout_s``; return its value, or None."""
    try:
        return wait_for(predicate, timeout_s)
    except AssertionError:
        return None


def settled_counts(harness, topic: str) -> dict:
    """Return the node's counts for ``topic`` once nothing is pending."""
    wait_for(lambda: (c := harness.counts(topic)) and c['pending'] == 0, 10,
             f'settled diagnostics for {topic}')
    time.sleep(1.1)  # one more diagnostics period: late primer copies are counted too
    return wait_for(lambda: (c := harness.counts(topic)) and c['pending'] == 0 and c, 10,
                    f'settled diagnostics for {topic}')


def test_every_frame_is_classified_with_its_source_header(tmp_path, harness):
    topics = ['/cam_a/image_raw', '/cam_b/image_raw', '/cam_c/image_raw/compressed']
    node = start(tmp_path, '-p', f'image_topics:={topics}', '-p', 'top_k:=3')
    try:
        cam_a = harness.camera(topics[0], reliable=True)
        cam_b = harness.camera(topics[1], reliable=False)
        cam_c = harness.camera(topics[2], compressed=True)
        for publisher in (cam_a, cam_b, cam_c):
            harness.wait_subscribed(publisher)
        # Each round is sent when the last one has its results: the test checks that every
        # frame comes back with its header, not who wins a race between the camera and a
        # first batch (a newer frame replacing one not yet taken is a stale drop, tested in
        # the flood test). A first round primes each DDS path; a message sent before the
        # node's reader has matched the writer is lost by DDS, not by the node.
        sent = {topic: [] for topic in topics}
        for index in range(-1, 8):
            stamp = 1000.0 + index * 0.1
            encoding, channels = [('rgb8', 3), ('bgr8', 3), ('mono8', 1), ('rgba8', 4)][index % 4]
            frames = [(cam_a, image_message(pixels(channels), encoding, stamp, 'front')),
                      (cam_b, image_message(pixels(2), 'yuv422', stamp + 0.01, 'left')),
                      (cam_c, jpeg_message(pixels(), stamp + 0.02, 'rear'))]
            for topic, (camera, message) in zip(topics, frames):
                camera.publish(message)
                if index < 0:  # priming: resend (every 2 s) until the node answers
                    for _ in range(10):
                        if wait_for_or_none(lambda: harness.scenes_for(topic), 2.0):
                            break
                        camera.publish(message)
            if index < 0:
                primed = {topic: settled_counts(harness, topic) for topic in topics}
                first_scene = {topic: len(harness.scenes_for(topic)) for topic in topics}
            else:
                for topic, (_, message) in zip(topics, frames):
                    stamp_s = message.header.stamp.sec + message.header.stamp.nanosec * 1e-9
                    sent[topic].append((round(stamp_s, 6), message.header.frame_id))
                for topic in topics:
                    # On a time-out, say what the node counted and logged for this camera.
                    wait_for(lambda: len(harness.scenes_for(topic)) > first_scene[topic] + index,
                             20, lambda: f'round {index} on {topic}: counts '
                                         f'{harness.counts(topic)}; node log:\n{node.log()}')
        for topic in topics:
            scenes = harness.scenes_for(topic)[first_scene[topic]:]
            assert len(scenes) == 8
            got = [(s['stamp']['sec'] + s['stamp']['nanosec'] * 1e-9, s['frame_id'])
                   for s in scenes]
            for (stamp, frame_id), (expected_stamp, expected_id) in zip(got, sent[topic]):
                assert frame_id == expected_id and stamp == pytest.approx(expected_stamp, abs=1e-6)
            for scene in scenes:
                assert len(scene['top_k']) == 3
                assert scene['label'] == scene['top_k'][0]['label']
                assert set(scene['latency_ms']) == {'preprocess', 'forward', 'postprocess',
                                                    'receive_to_publish'}
            counts = harness.wait_accounted(topic, received=primed[topic]['received'] + 8)
            added = {key: counts[key] - primed[topic][key] for key in counts}
            assert added == {'received': 8, 'classified': 8, 'dropped_stale': 0,
                             'rejected': 0, 'pending': 0}
        status = harness.camera_status(topics[0])
        assert status['device'] == 'cpu' and status['precision'] == 'fp32'
        assert 'resnet18' in status['model'] and float(status['latency_p50_ms']) > 0
    finally:
        assert node.stop() == 0, node.log()


def test_malformed_frames_are_rejected_and_counted_while_good_frames_flow(tmp_path, harness):
    raw, compressed = '/cam/image_raw', '/cam/image_raw/compressed'
    node = start(tmp_path, '-p', f"image_topics:=['{raw}', '{compressed}']")
    try:
        camera = harness.camera(raw)
        jpeg_camera = harness.camera(compressed, compressed=True)
        harness.wait_subscribed(camera)
        harness.wait_subscribed(jpeg_camera)
        good = pixels()
        frames = [
            image_message(good, 'rgb8', 1.0, 'cam'),
            image_message(good, 'rgb8', 2.0, 'cam', step=100),                 # wrong step
            image_message(good, 'rgb8', 3.0, 'cam'),
            image_message(good, 'rgb8', 4.0, 'cam', data=good.tobytes()[:1000]),  # truncated
            image_message(good, 'rgb8', 5.0, 'cam'),
            image_message(good, 'hsv8', 6.0, 'cam'),                           # unknown
            image_message(good, 'rgb8', 7.0, 'cam'),
            image_message(good[:0], 'rgb8', 8.0, 'cam'),                       # zero size
            image_message(good, 'rgb8', 9.0, 'cam'),
        ]
        for frame in frames:
            camera.publish(frame)
            time.sleep(0.15)
        jpeg_camera.publish(jpeg_message(good, 10.0, 'cam', data=b'\xff\xd8\xff garbage'))
        time.sleep(0.15)
        jpeg_camera.publish(jpeg_message(good, 11.0, 'cam'))
        counts = harness.wait_accounted(raw, received=9)
        assert counts == {'received': 9, 'classified': 5, 'dropped_stale': 0, 'rejected': 4,
                          'pending': 0}
        assert 'zero-size image' in harness.camera_status(raw)['last_reject_reason']
        assert harness.wait_accounted(compressed, received=2)['rejected'] == 1
        stamps = [scene['stamp']['sec'] for scene in harness.scenes_for(raw)]
        assert stamps == [1, 3, 5, 7, 9]
        assert [s['stamp']['sec'] for s in harness.scenes_for(compressed)] == [11]
        log = node.log()
        for reason in ('step 100 is less than', 'truncated image', "unsupported encoding 'hsv8'",
                       'cannot decode compressed image'):
            assert reason in log
    finally:
        assert node.stop() == 0


def test_a_flood_of_frames_never_backs_up_and_every_frame_is_accounted(tmp_path, harness):
    topics = ['/front/image_raw', '/rear/image_raw']
    # A reliable queue as deep as the burst: DDS itself drops nothing, even on a loaded
    # machine, so every frame sent is a frame the node received and must account for.
    node = start(tmp_path, '-p', f'image_topics:={topics}', '-p', 'max_rate_hz:=4.0',
                 '-p', 'qos.reliability:=reliable', '-p', 'qos.depth:=100')
    try:
        cameras = [harness.camera(topic, depth=100) for topic in topics]
        for camera in cameras:
            harness.wait_subscribed(camera)
        frame = pixels()
        for index in range(60):
            for camera in cameras:
                camera.publish(image_message(frame, 'rgb8', 100 + index * 0.01, 'cam'))
            time.sleep(0.01)
        for topic in topics:
            counts = harness.wait_accounted(topic, received=60)
            assert counts['classified'] + counts['dropped_stale'] + counts['rejected'] == 60
            assert counts['dropped_stale'] > 30 and counts['classified'] >= 1
            # The last frame sent is the last classified: the newest frame always wins.
            assert harness.scenes_for(topic)[-1]['stamp']['nanosec'] == pytest.approx(
                0.59e9, abs=1e3)
        # Both cameras go through one batch.
        assert max(scene['batch_size'] for scene in harness.scenes) == 2
    finally:
        assert node.stop() == 0


def test_live_parameters_change_results_and_invalid_values_are_refused(tmp_path, harness):
    node = start(tmp_path)
    try:
        camera = harness.camera('/camera/image_raw')
        harness.wait_subscribed(camera)

        def publish_and_get(stamp: int) -> dict:
            camera.publish(image_message(pixels(), 'rgb8', stamp, 'cam'))
            return wait_for(lambda: [s for s in harness.scenes if s['stamp']['sec'] == stamp],
                            10, f'scene {stamp}')[0]

        assert len(publish_and_get(1)['top_k']) == 5
        assert harness.set_parameter('top_k', 2).successful
        assert len(publish_and_get(2)['top_k']) == 2
        assert harness.set_parameter('score_threshold', 0.99).successful
        assert publish_and_get(3)['top_k'] == []

        refused = harness.set_parameter('top_k', 0)
        assert not refused.successful and 'top_k' in refused.reason
        bad_choice = harness.set_parameter('qos.reliability', 'sometimes')
        assert not bad_choice.successful
        assert 'qos.reliability must be one of best_effort, reliable' in bad_choice.reason
        bad_strip = harness.set_parameter('model.strip', 3)
        assert not bad_strip.successful and 'set strip=1 for sequence spatial' in bad_strip.reason
        missing = harness.set_parameter('model.checkpoint', '/nonexistent/model.pt')
        assert not missing.successful and 'file not found' in missing.reason
        read_only = harness.set_parameter('autostart', False)
        assert not read_only.successful
        assert harness.set_parameter('score_threshold', 0.0).successful
        assert len(publish_and_get(4)['top_k']) == 2  # the refused top_k=0 changed nothing
    finally:
        assert node.stop() == 0


def test_a_reload_parameter_switches_engines_and_the_node_stays_active(tmp_path, harness):
    node = start(tmp_path)
    try:
        camera = harness.camera('/camera/image_raw')
        harness.wait_subscribed(camera)
        assert harness.set_parameter('model.pooling', 'attention').successful
        wait_for(lambda: ' attention ' in (harness.camera_status('/camera/image_raw') or {})
                 .get('model', ''), 30, 'the model to reload with attention pooling')
        assert harness.lifecycle_state() == 'active'
        harness.wait_subscribed(camera)
        camera.publish(image_message(pixels(), 'rgb8', 42, 'cam'))
        wait_for(lambda: harness.scenes_for('/camera/image_raw'), 10, 'a scene after reload')
        assert 'model.pooling changed' in node.log()
    finally:
        assert node.stop() == 0


def test_lifecycle_transitions_when_a_manager_drives_the_node(tmp_path, harness):
    node = start(tmp_path, '-p', 'autostart:=false')
    try:
        camera = harness.camera('/camera/image_raw')
        wait_for(lambda: harness.lifecycle_state() == 'unconfigured', 30, 'unconfigured')
        assert camera.get_subscription_count() == 0
        assert harness.change_state(Transition.TRANSITION_CONFIGURE)
        assert harness.lifecycle_state() == 'inactive'
        assert harness.change_state(Transition.TRANSITION_ACTIVATE)
        harness.wait_subscribed(camera)
        camera.publish(image_message(pixels(), 'rgb8', 7, 'cam'))
        wait_for(lambda: harness.scenes_for('/camera/image_raw'), 10, 'a scene while active')
        assert harness.change_state(Transition.TRANSITION_DEACTIVATE)
        assert harness.lifecycle_state() == 'inactive'
        wait_for(lambda: camera.get_subscription_count() == 0, 10, 'unsubscribe on deactivate')
        assert harness.change_state(Transition.TRANSITION_ACTIVATE)
        harness.wait_subscribed(camera)
        camera.publish(image_message(pixels(), 'rgb8', 8, 'cam'))
        wait_for(lambda: len(harness.scenes_for('/camera/image_raw')) == 2, 10,
                 'a scene after reactivation')
    finally:
        assert node.stop() == 0


def test_started_as_the_launch_file_starts_it(tmp_path, harness):
    """--params-file config/perception.yaml and a namespace remap, as perception.launch.py."""
    namespaced = Harness('/robot1/cnn_rnn_perception')
    node = NodeProcess(tmp_path, '--params-file', str(ROOT / 'config' / 'perception.yaml'),
                       '-r', '__ns:=/robot1', *SMALL_MODEL)
    try:
        camera = namespaced.camera('/camera/image_raw', reliable=False)
        namespaced.wait_subscribed(camera)

        def answered():
            # Best effort, and the node may still be activating: resend every 2 s.
            camera.publish(image_message(pixels(), 'bgr8', 5, 'cam'))
            return wait_for_or_none(lambda: namespaced.scenes_for('/camera/image_raw'), 2)
        scene = wait_for(answered, 30, 'a scene on /robot1/cnn_rnn_perception/scene')[0]
        assert scene['label'] in ('corridor', 'open_space', 'doorway_left', 'doorway_right',
                                  'junction', 'blocked')
    finally:
        assert node.stop() == 0
        namespaced.close()


@pytest.mark.parametrize('setting,reason', [
    ('model.checkpoint:=/nonexistent/scene_model.pt',
     "model.checkpoint '/nonexistent/scene_model.pt': file not found"),
    # Start-up values pass the same validation as live ones: this was silently best effort.
    ('qos.reliability:=Reliable', 'qos.reliability must be one of best_effort, reliable'),
    # These two once failed in silence (the log held nothing, diagnostics said OK) or crashed
    # the node after configure.
    ('navigation.policy_file:=/tmp', "policy file '/tmp' is a directory"),
    ("image_topics:=['/front/1cam/image_raw']",
     "'/front/1cam/image_raw' is not a valid topic name: topic name token must not start"),
])
def test_a_bad_start_up_value_fails_configure_with_one_line_and_an_error(
        tmp_path, harness, setting, reason):
    node = start(tmp_path, '-p', setting)
    try:
        wait_for(lambda: 'configure failed' in node.log(), 30, 'configure to fail')
        assert reason in node.log()
        assert node.process.poll() is None  # the node keeps running, unconfigured
        assert harness.lifecycle_state() == 'unconfigured'
        status = wait_for(lambda: harness.statuses.get('/cnn_rnn_perception'), 10,
                          'diagnostics of the unconfigured node')
        assert status['level'] == 2 and reason in status['message']
    finally:
        assert node.stop() == 0


def test_a_best_effort_camera_against_a_reliable_subscription_is_named(tmp_path, harness):
    node = start(tmp_path, '-p', 'qos.reliability:=reliable')
    try:
        harness.camera('/camera/image_raw', reliable=False)
        wait_for(lambda: 'set qos.reliability to best_effort' in node.log(), 30,
                 'the incompatible-QoS warning')
    finally:
        assert node.stop() == 0


# -- a node that never goes dark --------------------------------------------------------------

TINY = ModelConfig(input_size=(64, 64), hidden_size=16, num_classes=3)


def tiny_checkpoint(path, prefix: str, seed: int) -> str:
    with seeded(seed):
        model = CnnRnnClassifier(TINY)
    save_checkpoint(path, model, labels=[f'{prefix}_{index}' for index in range(3)])
    return str(path)


def labels_seen(harness, since: int = 0) -> set:
    return {scene['label'].split('_')[0] for scene in harness.scenes[since:]}


def test_switching_checkpoints_while_a_camera_streams_never_goes_dark(tmp_path, harness):
    first = tiny_checkpoint(tmp_path / 'first.pt', 'alpha', seed=1)
    second = tiny_checkpoint(tmp_path / 'second.pt', 'beta', seed=2)
    truncated = tmp_path / 'truncated.pt'
    truncated.write_bytes(Path(first).read_bytes()[:-300])
    # Its header is a valid checkpoint of TINY, its weights are another model's: only a full
    # load finds out, in the background, while the running engine goes on.
    payload = torch.load(first, weights_only=True)
    with seeded(3):
        payload['state_dict'] = CnnRnnClassifier(
            ModelConfig(input_size=(64, 64), hidden_size=8, num_classes=3)).state_dict()
    mismatched = tmp_path / 'mismatched.pt'
    torch.save(payload, mismatched)

    node = NodeProcess(tmp_path, '-p', f'model.checkpoint:={first}', '-p', 'compile:=false',
                       '-p', 'device:=cpu', '-p', 'silent_after_s:=1.0')
    streamer = None
    try:
        camera = harness.camera('/camera/image_raw')
        harness.wait_subscribed(camera)
        streamer = Streamer(harness, camera)
        wait_for(lambda: 'alpha' in labels_seen(harness), 30, 'results of the first model')

        refused = harness.set_parameter('model.checkpoint', str(truncated))
        assert not refused.successful and 'truncated, or not a torch file' in refused.reason

        mark = len(harness.scenes)
        assert harness.set_parameter('model.checkpoint', str(mismatched)).successful
        wait_for(lambda: 'reload failed' in node.log(), 30, 'the failed reload to be reported')
        wait_for(lambda: harness.get_parameter('model.checkpoint') == first, 10,
                 'model.checkpoint to be set back to the running checkpoint')
        status = wait_for(lambda: (s := harness.camera_status('/camera/image_raw')) and
                          'reload failed' in s['message'] and s, 10, 'a WARN in /diagnostics')
        assert status['level'] == 1 and 'weights do not match' in status['message']
        time.sleep(0.5)
        assert labels_seen(harness, mark) == {'alpha'}, 'the old model stopped classifying'

        mark = len(harness.scenes)
        assert harness.set_parameter('model.checkpoint', second).successful
        wait_for(lambda: 'beta' in labels_seen(harness, mark), 30, 'the second model to take over')
        time.sleep(1.0)
        streamer.close()
        arrivals = harness.scene_arrivals[mark:]
        gaps = np.diff(arrivals)
        assert gaps.max() < 0.5, f'results stopped for {gaps.max():.2f} s around the swap'
        labels = [scene['label'].split('_')[0] for scene in harness.scenes[mark:]]
        assert labels == sorted(labels), 'the first model answered again after the swap'
        assert max(streamer.state_seconds) < 1.0, max(streamer.state_seconds)
        assert harness.lifecycle_state() == 'active'
        counts = harness.counts('/camera/image_raw')
        assert counts['received'] == (counts['classified'] + counts['dropped_stale']
                                      + counts['rejected'] + counts['pending'])
    finally:
        if streamer is not None:
            streamer.close()
        assert node.stop() == 0, node.log()


def test_lifecycle_and_parameter_services_answer_while_the_model_compiles(tmp_path, harness):
    node = NodeProcess(tmp_path, '-p', 'compile:=true', '-p', 'model.input_size:=[64,64]',
                       '-p', 'model.hidden_size:=16', '-p', 'device:=cpu')
    try:
        camera = harness.camera('/camera/image_raw')
        harness.wait_subscribed(camera)
        camera.publish(image_message(pixels(), 'rgb8', 1, 'cam'))
        seconds = []
        deadline = time.monotonic() + 60
        while 'compiling' not in (harness.camera_status('/camera/image_raw') or {}).get(
                'engine', '') and time.monotonic() < deadline:
            seconds.append(harness.timed_get_state()[1])
            time.sleep(0.05)
        assert time.monotonic() < deadline, 'the engine never reported compiling'
        # Frames are served by the eager engine while the compiled one is prepared.
        wait_for(lambda: harness.scenes_for('/camera/image_raw'), 10, 'a result while compiling')
        started = time.monotonic()
        assert harness.set_parameter('top_k', 2).successful
        seconds.append(time.monotonic() - started)
        started = time.monotonic()
        assert harness.change_state(Transition.TRANSITION_DEACTIVATE)  # mid-compile
        seconds.append(time.monotonic() - started)
        for _ in range(5):
            seconds.append(harness.timed_get_state()[1])
        assert harness.lifecycle_state() == 'inactive'
        assert max(seconds) < 1.0, seconds
    finally:
        assert node.stop() == 0, node.log()


def test_diagnostics_keep_coming_under_sim_time_without_a_clock(tmp_path, harness):
    node = start(tmp_path, '-p', 'use_sim_time:=true')
    try:
        camera = harness.camera('/camera/image_raw')
        harness.wait_subscribed(camera)
        wait_for(lambda: harness.camera_status('/camera/image_raw'), 15,
                 'diagnostics with use_sim_time and no /clock')
    finally:
        assert node.stop() == 0


def test_a_model_too_slow_for_the_camera_is_reported_as_an_error(tmp_path, harness):
    # resnet50 at 1024x1024 takes about 0.7 s a frame on two cores: frames keep arriving, results
    # do not, and diagnostics must say so instead of OK.
    node = NodeProcess(tmp_path, '-p', 'compile:=false', '-p', 'device:=cpu',
                       '-p', 'model.backbone:=resnet50', '-p', 'model.input_size:=[1024,1024]',
                       '-p', 'model.hidden_size:=16', '-p', 'silent_after_s:=0.3')
    streamer = None
    try:
        camera = harness.camera('/camera/image_raw')
        harness.wait_subscribed(camera)
        streamer = Streamer(harness, camera, rate_hz=10.0)
        status = wait_for(lambda: (s := harness.camera_status('/camera/image_raw')) and
                          s['level'] == 2 and s, 60, 'an ERROR while frames go unclassified')
        assert 'frames arrive but none classified for' in status['message']
    finally:
        if streamer is not None:
            streamer.close()
        assert node.stop() == 0, node.log()


def test_the_node_runs_an_exported_model_and_auto_reports_its_choice(tmp_path, harness):
    from cnn_rnn_perception.core.model_config import Preprocessing
    from cnn_rnn_perception.tools.training.export import export
    with seeded(5):
        model = CnnRnnClassifier(TINY).eval()
    onnx_path = tmp_path / 'scene.onnx'
    export(model, ['hall_0', 'hall_1', 'hall_2'], Preprocessing.for_config(TINY), fmt='onnx',
           output=onnx_path)
    node = NodeProcess(tmp_path, '-p', f'model.checkpoint:={onnx_path}', '-p', 'device:=cpu',
                       '-p', 'backend:=onnxruntime')
    try:
        camera = harness.camera('/camera/image_raw')
        harness.wait_subscribed(camera)
        camera.publish(image_message(pixels(), 'rgb8', 1, 'cam'))
        scene = wait_for(lambda: harness.scenes_for('/camera/image_raw'), 20, 'a result')[0]
        assert scene['label'].startswith('hall_')
        assert wait_for(lambda: (harness.camera_status('/camera/image_raw') or {}).get(
            'model', '').startswith('onnxruntime'), 10, 'the backend in /diagnostics')
        assert harness.set_parameter('backend', 'auto').successful
        status = wait_for(lambda: (s := harness.camera_status('/camera/image_raw')) and
                          'backend_choice' in s and s, 60, 'the auto choice in /diagnostics')
        assert 'backend auto chose' in status['backend_choice']
        assert 'onnxruntime' in status['backend_choice'] and 'openvino' in status['backend_choice']
    finally:
        assert node.stop() == 0, node.log()


def _probabilities(scene: dict) -> dict[str, float]:
    return {entry['label']: entry['score'] for entry in scene['top_k']}


def test_a_temporal_model_carries_each_cameras_state_and_resets_it_by_the_rules(
        tmp_path, harness):
    """Fresh state, carried state and each reset rule, told apart by the published scores."""
    config = ModelConfig(num_classes=6, input_size=(64, 64), hidden_size=16, temporal='gru',
                         temporal_hidden_size=16)
    with seeded(3):
        model = CnnRnnClassifier(config).eval()
    checkpoint = tmp_path / 'temporal.pt'
    save_checkpoint(checkpoint, model)
    copy = tmp_path / 'temporal-copy.pt'
    copy.write_bytes(checkpoint.read_bytes())
    topics = ['/cam_a/image_raw', '/cam_b/image_raw']
    node = start(tmp_path, '-p', f'model.checkpoint:={checkpoint}', '-p', 'top_k:=6',
                 '-p', f'image_topics:={topics}')
    frame = pixels()
    try:
        cameras = {topic: harness.camera(topic) for topic in topics}
        for camera in cameras.values():
            harness.wait_subscribed(camera)

        def send(topic: str, stamp: float) -> dict[str, float]:
            """Send the same frame at ``stamp`` and return the scores it got."""
            before = len(harness.scenes_for(topic))
            message = image_message(frame, 'rgb8', stamp, 'cam')
            cameras[topic].publish(message)
            for _ in range(10):  # a first message can be lost before DDS has matched both ways
                if wait_for_or_none(lambda: len(harness.scenes_for(topic)) > before, 2.0):
                    break
                cameras[topic].publish(message)
            return _probabilities(harness.scenes_for(topic)[before])

        def memory(topic: str) -> dict:
            return wait_for(lambda: (s := harness.camera_status(topic)) and 'state_frames' in s
                            and s, 10, f'state diagnostics of {topic}')

        def same(a: dict, b: dict) -> bool:
            return all(abs(a[label] - b[label]) < 1e-4 for label in a)

        for topic in topics:  # primes each DDS path; far in the past, so it resets below
            send(topic, 10.0)
        fresh = send(topics[0], 100.0)
        second = send(topics[0], 100.1)
        third = send(topics[0], 100.2)
        assert not same(fresh, second) and not same(second, third)  # the state is carried
        # cam_b, batched and interleaved with cam_a, follows the same sequence on its own.
        assert same(send(topics[1], 500.0), fresh)
        send(topics[0], 100.3)
        assert same(send(topics[1], 500.1), second)
        wait_for(lambda: memory(topics[0])['state_frames'] == '4', 10, 'cam_a at 4 frames')
        assert float(memory(topics[0])['state_age_s']) == pytest.approx(0.3, abs=0.01)

        assert same(send(topics[0], 105.0), fresh)  # a gap longer than reset_after_s (1 s)
        wait_for(lambda: memory(topics[0])['state_started_by'].startswith('gap of 4.700 s'),
                 10, 'the gap as the reason')
        assert same(send(topics[0], 104.0), fresh)  # stamps went backwards: a looped bag
        wait_for(lambda: 'backwards' in memory(topics[0])['state_started_by'], 10, 'backwards')

        assert harness.set_parameter('temporal.reset_after_s', 10.0).successful  # live
        assert same(send(topics[0], 107.0), second)  # 3 s apart: carried now
        assert not harness.set_parameter('temporal.reset_after_s', 0.0).successful

        assert harness.change_state(Transition.TRANSITION_DEACTIVATE)
        assert harness.change_state(Transition.TRANSITION_ACTIVATE)
        for camera in cameras.values():
            harness.wait_subscribed(camera)
        assert same(send(topics[0], 107.1), fresh)  # a deactivated node forgets
        assert same(send(topics[0], 107.2), second)

        adopted = node.log().count('classifying with')
        assert harness.set_parameter('model.checkpoint', str(copy)).successful
        wait_for(lambda: node.log().count('classifying with') > adopted, 30, 'the new engine')
        assert same(send(topics[0], 107.3), fresh)  # a reloaded model starts afresh
        counts = harness.wait_accounted(topics[0], received=harness.counts(topics[0])[
            'received'])
        assert counts['rejected'] == 0
    finally:
        assert node.stop() == 0, node.log()


def _engine(harness, topic: str = '/camera/image_raw') -> tuple[str, str]:
    status = harness.camera_status(topic) or {}
    return status.get('engine', ''), status.get('model', '')


def _compiled_and_settled(harness) -> bool:
    engine, model = _engine(harness)
    return engine == 'ready' and 'compiled' in model


def test_a_live_value_set_during_a_build_is_what_runs_after_it(tmp_path, harness):
    node = NodeProcess(tmp_path, '-p', 'compile:=true', '-p', 'model.input_size:=[64,64]',
                       '-p', 'model.hidden_size:=16', '-p', 'device:=cpu')
    streaming = threading.Event()

    def stream(camera):  # frames keep coming, so the worker applies the live value at once
        index = 0
        while not streaming.wait(0.1):
            camera.publish(image_message(pixels(), 'rgb8', 100 + 0.1 * index, 'cam'))
            index += 1

    try:
        camera = harness.camera('/camera/image_raw')
        harness.wait_subscribed(camera)
        threading.Thread(target=stream, args=(camera,), daemon=True).start()
        for hidden_size in (12, 20, 16):  # each reload is another build to set it during
            wait_for(lambda: _engine(harness)[0] == 'compiling', 60, 'a compiled build')
            assert harness.set_parameter('score_threshold', 0.99).successful
            if _engine(harness)[0] == 'compiling':
                break  # set while the build ran
            assert harness.set_parameter('model.hidden_size', hidden_size).successful
        else:
            pytest.fail('every build finished before the parameter could be set')
        wait_for(lambda: _compiled_and_settled(harness), 120, 'the compiled engine')
        assert harness.get_parameter('score_threshold') == 0.99
        count = len(harness.scenes_for('/camera/image_raw'))
        scenes = wait_for(lambda: harness.scenes_for('/camera/image_raw')[count + 5:], 20,
                          'scenes after the build')
        # A random 6-class model scores far below 0.99: nothing may be published over it.
        assert all(entry['score'] >= 0.99 for scene in scenes for entry in scene['top_k'])
    finally:
        streaming.set()
        assert node.stop() == 0, node.log()


def test_a_reload_set_back_or_deactivated_during_its_build_runs_what_the_parameters_say(
        tmp_path, harness):
    node = NodeProcess(tmp_path, '-p', 'compile:=true', '-p', 'model.input_size:=[64,64]',
                       '-p', 'model.hidden_size:=16', '-p', 'device:=cpu')
    try:
        camera = harness.camera('/camera/image_raw')
        harness.wait_subscribed(camera)
        wait_for(lambda: _compiled_and_settled(harness), 120, 'the first compiled engine')
        # A -> B -> A while B builds: A runs, as the parameter says.
        assert harness.set_parameter('model.hidden_size', 24).successful
        assert harness.set_parameter('model.hidden_size', 16).successful
        time.sleep(2.0)  # B's build had time to finish, if it was going to be used
        wait_for(lambda: _compiled_and_settled(harness), 120, 'the engine after A -> B -> A')
        assert harness.get_parameter('model.hidden_size') == 16
        assert 'lstm(16)' in _engine(harness)[1], _engine(harness)
        # B, then deactivate while it builds, then activate: B runs.
        assert harness.set_parameter('model.hidden_size', 24).successful
        assert harness.change_state(Transition.TRANSITION_DEACTIVATE)
        assert harness.lifecycle_state() == 'inactive'
        assert harness.change_state(Transition.TRANSITION_ACTIVATE)
        wait_for(lambda: _compiled_and_settled(harness) and 'lstm(24)' in _engine(harness)[1],
                 120, lambda: f'the engine of hidden_size 24 after activate: {_engine(harness)}')
        assert harness.get_parameter('model.hidden_size') == 24
    finally:
        assert node.stop() == 0, node.log()
