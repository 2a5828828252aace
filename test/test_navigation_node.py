"""
What Nav2 receives, over DDS, with the node as its own process and real nav2_msgs.

A per-frame model is trained on drawn scene drives; a held-out drive with figures crossing the
view is replayed into the node at 15 Hz with the shipped example policy. The speed limits and
selector choices that arrive are checked against the drive's true scenes, their QoS against
Nav2's conventions, and the fail-safe: the camera stops, and ``stale`` arrives in time; the
node is deactivated, and ``stale`` was sent before the transition completed.
"""

from __future__ import annotations

import json
from pathlib import Path
import threading
import time

from cnn_rnn_perception.core.navigation import load_policy, STALE
from cnn_rnn_perception.core.sample_frames import NAVIGATION_LABELS
from cnn_rnn_perception.ros.outputs import NAV2_MSGS, VISION_MSGS
from lifecycle_msgs.msg import Transition
import pytest
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from ros_harness import Harness, image_message, NodeProcess, wait_for
from sensor_msgs.msg import Image
from std_msgs.msg import String
from test_bags import run

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (NAV2_MSGS and VISION_MSGS),
    reason='nav2_msgs and vision_msgs (ROS packages) are not installed: make setup builds them '
           'from ../shared/ros-sources')]

ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / 'config' / 'navigation_policy.yaml'
LABEL_TOPIC = '/scene_label'
CAMERA = '/camera/image_raw'
STALE_AFTER_S = 1.0
SELECTOR_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.TRANSIENT_LOCAL)


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """
    Train a small per-frame scene model on eight drives; draw another, held out, unlike them.

    Eight short drives (144 scenes) rather than two long ones (24 scenes, which passed on the
    AMD EPYC machines CI had run on): on an Intel Xeon with AMX the model from 24 scenes
    reached 71% on the held-out drive and this test failed. From 144 scenes, there, it reached
    93-97% on four held-out drives from two training draws, each passing the checks below.
    """
    from cnn_rnn_perception.core.model_config import ModelConfig
    from cnn_rnn_perception.tools.synthetic.synth import write_recording
    from cnn_rnn_perception.tools.training.data import bag_samples
    from cnn_rnn_perception.tools.training.settings import TrainSettings
    from cnn_rnn_perception.tools.training.train import train

    root = tmp_path_factory.mktemp('navigation')
    drives = [str(write_recording(root / f'train_{seed}', scenes=18, seconds_per_scene=1.0,
                                  seed=seed, height=96, width=128, occluders=True,
                                  progress=False)) for seed in range(8)]
    # Held out: another seed, longer scenes, a larger image (the node resizes).
    held_out = write_recording(root / 'held_out', scenes=6, seconds_per_scene=3.0, seed=4242,
                               height=120, width=160, occluders=True, topic=CAMERA,
                               label_topic=LABEL_TOPIC, progress=False)
    settings = TrainSettings(model=ModelConfig(input_size=(64, 64), hidden_size=32), epochs=4,
                             batch_size=32, workers=0, device='cpu', val_block_s=4.0)
    classes, train_data, val_data, _, _ = bag_samples(drives, LABEL_TOPIC, settings,
                                                      progress=False)
    assert sorted(classes) == sorted(NAVIGATION_LABELS)
    train(settings, classes=classes, train_samples=train_data, val_samples=val_data,
          output=root / 'model', progress=False)
    return root / 'model' / 'best.pt', held_out


class Nav2Listener:
    """Subscribes as Nav2 does and keeps what arrived, with when it arrived."""

    def __init__(self, harness: Harness) -> None:
        from nav2_msgs.msg import SpeedLimit

        self._lock = threading.Lock()
        self.speed_limits: list[tuple[float, object]] = []
        self.controllers: list[tuple[float, str]] = []
        self.planners: list[tuple[float, str]] = []
        self.robot_scenes: list[tuple[float, dict]] = []
        self.debug_images: list[tuple[float, Image]] = []
        node = harness.node
        # controller_server's subscription: reliable, volatile, depth 10.
        node.create_subscription(SpeedLimit, '/speed_limit', self._keep(self.speed_limits), 10)
        node.create_subscription(String, '/controller_selector',
                                 self._keep(self.controllers, str), SELECTOR_QOS)
        node.create_subscription(String, '/planner_selector', self._keep(self.planners, str),
                                 SELECTOR_QOS)
        node.create_subscription(String, '/cnn_rnn_perception/robot_scene',
                                 self._keep(self.robot_scenes, json.loads), 100)
        node.create_subscription(Image, '/cnn_rnn_perception/debug_image',
                                 self._keep(self.debug_images), 10)

    def _keep(self, into: list, convert=None):
        def callback(message):
            value = message if convert is None else convert(message.data)
            with self._lock:
                into.append((time.monotonic(), value))
        return callback

    def since(self, into: list, started: float) -> list:
        with self._lock:
            return [value for arrived, value in into if arrived >= started]


def compress(values: list) -> list:
    """Drop repeats: what a consumer acting on changes would see."""
    return [value for index, value in enumerate(values)
            if index == 0 or value != values[index - 1]]


def test_nav2_gets_the_drives_scenes_within_the_switch_delay_and_stale_when_it_stops(
        tmp_path, trained):
    checkpoint, held_out = trained
    policy = load_policy(POLICY, NAVIGATION_LABELS)
    node = NodeProcess(tmp_path, '-p', 'compile:=false', '-p', 'device:=cpu',
                       '-p', f'model.checkpoint:={checkpoint}', '-p', 'qos.reliability:=reliable',
                       '-p', f'navigation.policy_file:={POLICY}',
                       '-p', f'navigation.stale_after_s:={STALE_AFTER_S}',
                       '-p', f"image_topics:=['{CAMERA}']")
    harness = Harness()
    listener = Nav2Listener(harness)
    try:
        wait_for(lambda: listener.speed_limits, 60, 'the first speed limit (unknown or stale)')
        started = time.monotonic()
        replay = run('replay', str(held_out), '--qos', 'reliable', '--wait', '120',
                     '--no-progress')
        assert replay.returncode == 0, replay.stderr + node.log()

        # The camera has stopped: stale must arrive within stale_after_s + 0.2 s of the last
        # result (the last robot scene was published just after it).
        stale_limit = policy.entry(STALE).speed_limit

        def stale_arrival():
            last_scene = listener.robot_scenes[-1][0]
            return next((arrived for arrived, message in listener.speed_limits
                         if arrived > last_scene and message.speed_limit == stale_limit), None)
        arrived = wait_for(stale_arrival, 10, 'the stale speed limit after the replay')
        assert arrived - listener.robot_scenes[-1][0] <= STALE_AFTER_S + 0.2
        status = wait_for(lambda: (harness.statuses.get('/cnn_rnn_perception: robot scene')
                                   or {}).get('decision') == STALE
                          and harness.statuses['/cnn_rnn_perception: robot scene'], 5,
                          'diagnostics saying the decision is stale')
        assert status['level'] == 1 and 'no camera classified' in status['message']

        scenes = listener.since(listener.robot_scenes, started)
        decisions = [scene['decision'] for scene in scenes]
        truths = _truths(held_out, [scene['stamp'] for scene in scenes])
        # Every true scene change is followed by the decision within 1 s of stamps, and the
        # decision never changes to anything but the true scene (figures cross the view
        # meanwhile; a per-frame label flips while they do).
        from cnn_rnn_perception.tools.evaluation.metrics import ChangeCount
        count = ChangeCount()
        stamps = [scene['stamp']['sec'] + scene['stamp']['nanosec'] * 1e-9 for scene in scenes]
        count.add(stamps, decisions, truths, transition_s=0.5)
        assert count.true_changes == 5 and count.missed_switches == 0, decisions
        assert max(count.switch_delays_s) <= 1.0, count.switch_delays_s
        wrong = [(stamp, decided, truth) for stamp, decided, truth, before in
                 zip(stamps[1:], decisions[1:], truths[1:], decisions)
                 if decided != before and decided != truth]
        assert not wrong, wrong

        # What Nav2 received follows the decisions: each decided change its speed limit and,
        # where the policy names them, its controller and planner; then stale's.
        states = compress(decisions) + [STALE]
        expected = compress([policy.entry(state).speed_limit or 0.0 for state in states])
        received = compress([message.speed_limit for message in
                             listener.since(listener.speed_limits, started)])
        assert received in (expected, expected[1:]), (received, states)
        for key, arrived in (('controller', listener.controllers),
                             ('planner', listener.planners)):
            expected = compress([getattr(policy.entry(state), key) for state in states
                                 if getattr(policy.entry(state), key) is not None])
            assert compress(listener.since(arrived, started)) in (expected, expected[1:]), key

        # Nav2's QoS: the speed limit reliable and volatile; the selectors reliable and
        # transient local, so a behaviour tree started now still gets the last choice.
        info = harness.node.get_publishers_info_by_topic
        speed = info('/speed_limit')[0].qos_profile
        assert (speed.reliability, speed.durability) == (ReliabilityPolicy.RELIABLE,
                                                         DurabilityPolicy.VOLATILE)
        for topic in ('/controller_selector', '/planner_selector'):
            selector = info(topic)[0].qos_profile
            assert (selector.reliability, selector.durability) == (
                ReliabilityPolicy.RELIABLE, DurabilityPolicy.TRANSIENT_LOCAL)
        late = []
        harness.node.create_subscription(String, '/controller_selector',
                                         lambda message: late.append(message.data),
                                         SELECTOR_QOS)
        wait_for(lambda: late, 10, 'the last controller choice, for a late subscriber')
        assert late == [policy.entry(STALE).controller]

        # The debug image was drawn while this test subscribed, at most at its 5 Hz cap.
        images = listener.since(listener.debug_images, started)
        assert images and images[0].encoding == 'bgr8' and images[0].width == 160
        assert len(images) <= 5 * (listener.robot_scenes[-1][0] - started) + 2
    finally:
        harness.close()
        assert node.stop() == 0


def _truths(bag: Path, stamps: list[dict]) -> list[str | None]:
    from cnn_rnn_perception.tools.evaluation.bags import BagSource

    with BagSource(bag) as source:
        labels = source.labels(LABEL_TOPIC)
    return [labels.at(stamp['sec'] * 1_000_000_000 + stamp['nanosec']) for stamp in stamps]


def test_deactivate_sends_stale_before_the_transition_completes(tmp_path, trained):
    from cnn_rnn_perception.core.image_conversion import message_to_frame
    from cnn_rnn_perception.tools.evaluation.bags import BagFrame, BagSource

    checkpoint, held_out = trained
    policy = load_policy(POLICY, NAVIGATION_LABELS)
    with BagSource(held_out) as bag:
        corridor = [message_to_frame(item.message)[0] for item in
                    bag.frames(bag.image_topics(None), bag.labels(LABEL_TOPIC))
                    if isinstance(item, BagFrame) and item.label == 'corridor'][10:40]
    node = NodeProcess(tmp_path, '-p', 'compile:=false', '-p', 'device:=cpu',
                       '-p', f'model.checkpoint:={checkpoint}', '-p', 'qos.reliability:=reliable',
                       '-p', f'navigation.policy_file:={POLICY}',
                       '-p', f"image_topics:=['{CAMERA}']")
    harness = Harness()
    listener = Nav2Listener(harness)
    camera = harness.camera(CAMERA)
    streaming = threading.Event()

    def stream():
        index = 0
        while not streaming.is_set():
            camera.publish(image_message(corridor[index % len(corridor)], 'bgr8', time.time(),
                                         'camera'))
            index += 1
            time.sleep(1 / 15)
    thread = threading.Thread(target=stream, daemon=True)
    try:
        harness.wait_subscribed(camera)
        thread.start()
        wait_for(lambda: listener.robot_scenes
                 and listener.robot_scenes[-1][1]['decision'] == 'corridor', 60,
                 'the decision to settle on corridor')
        # A policy is reloadable live, and checked first: a typo is refused with the reason.
        typo = tmp_path / 'typo.yaml'
        typo.write_text(POLICY.read_text().replace('corridor:', 'coridor:'))
        refused = harness.set_parameter('navigation.policy_file', str(typo))
        assert not refused.successful and "'coridor' is not a label" in refused.reason
        assert harness.set_parameter('navigation.policy_file', str(POLICY)).successful

        requested = time.time()
        assert harness.change_state(Transition.TRANSITION_DEACTIVATE)
        completed = time.time()
        stale_limit = policy.entry(STALE).speed_limit
        sent = wait_for(lambda: [message for message in listener.since(listener.speed_limits, 0)
                                 if message.speed_limit == stale_limit], 5,
                        'the stale speed limit after deactivate')
        stamp = sent[-1].header.stamp.sec + sent[-1].header.stamp.nanosec * 1e-9
        assert requested <= stamp <= completed
        assert harness.lifecycle_state() == 'inactive'
    finally:
        streaming.set()
        if thread.is_alive():
            thread.join(timeout=5)
        harness.close()
        assert node.stop() == 0
