"""
Live replay: publish a bag's image (and label) topics into ROS, in place of ``ros2 bag play``.

Messages go out as the bag's own serialized bytes, so header stamps are exactly the recorded
ones. Timing follows the recording (optionally faster or slower), runs as fast as possible, or
runs in lockstep with the node (each frame waits for its ``~/scene`` result). The node's scene
output can be recorded to JSONL and scored by the evaluation code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import threading
import time
from typing import Any, Sequence

from cnn_rnn_perception.tools import options
from cnn_rnn_perception.tools.environment.ros_env import BackgroundNode
from cnn_rnn_perception.tools.evaluation.bags import BagError, BagSource, IMAGE_TYPES, LABEL_TYPE
from tqdm import tqdm


def parse_remaps(remaps: Sequence[str]) -> dict[str, str]:
    """Parse ``FROM:=TO`` pairs."""
    mapping = {}
    for remap in remaps:
        source, separator, target = remap.partition(':=')
        if not separator or not source or not target:
            raise ValueError(f'remap must look like /from:=/to; got {remap!r}')
        mapping[source] = target
    return mapping


class _Player:
    def __init__(self, topics: dict[str, str], remap: dict[str, str], reliable: bool,
                 scene_topic: str | None) -> None:
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CompressedImage, Image
        from std_msgs.msg import String

        types = {'sensor_msgs/msg/Image': Image, 'sensor_msgs/msg/CompressedImage':
                 CompressedImage, LABEL_TYPE: String}
        self.ros = BackgroundNode('bag_replay')
        self.node = self.ros.node
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE if reliable
                         else ReliabilityPolicy.BEST_EFFORT)
        self.publishers = {topic: self.node.create_publisher(
            types[msgtype], remap.get(topic, topic), qos) for topic, msgtype in topics.items()}
        self.condition = threading.Condition()
        self.scenes: list[dict] = []
        if scene_topic:
            self.node.create_subscription(String, scene_topic, self._on_scene, 100)

    def _on_scene(self, message: Any) -> None:
        with self.condition:
            self.scenes.append(json.loads(message.data))
            self.condition.notify_all()

    def wait_for_subscribers(self, topics: Sequence[str], timeout_s: float) -> list[str]:
        """Wait until every image topic has a subscriber; return those still without one."""
        deadline = time.monotonic() + timeout_s
        missing = list(topics)
        while missing and time.monotonic() < deadline:
            missing = [t for t in topics if self.publishers[t].get_subscription_count() == 0]
            time.sleep(0.05)
        return missing

    def wait_for_scene(self, topic: str, stamp: tuple[int, int], timeout_s: float) -> bool:
        def seen() -> bool:
            return any(scene['stamp']['sec'] == stamp[0]
                       and scene['stamp']['nanosec'] == stamp[1]
                       and scene['topic'] == topic for scene in self.scenes[-8:])
        with self.condition:
            return self.condition.wait_for(seen, timeout_s)

    def close(self) -> None:
        self.ros.close()


def replay_bag(path: str, *, topics: Sequence[str] | None = None,
               label_topic: str | None = None, rate: float = 1.0, loop: bool = False,
               remap: dict[str, str] | None = None, reliable: bool = False,
               scene_topic: str | None = None, lockstep: bool = False,
               record_path: str | Path | None = None, wait_subscribers_s: float = 30.0,
               lockstep_timeout_s: float = 10.0, settle_s: float = 0.5,
               progress: bool = True) -> dict[str, Any]:
    """
    Publish a bag's frames (and labels) with their recorded stamps; return what happened.

    ``rate`` multiplies the recorded speed; 0 publishes as fast as possible. ``lockstep``
    waits after each frame until its ``~/scene`` result arrives on ``scene_topic``.
    """
    if rate < 0:
        raise ValueError(f'rate must be >= 0 (0 = as fast as possible); got {rate}')
    if (lockstep or record_path) and not scene_topic:
        raise ValueError("lockstep and recording need the node's scene topic")
    remap = remap or {}
    with BagSource(path) as bag:
        if not bag.is_ros2:
            raise BagError(f'{path}: replay publishes rosbag2 (CDR) messages; convert this ROS 1 '
                           'bag first with rosbags-convert')
        image_topics = bag.image_topics(topics)
        if label_topic:
            bag.labels(label_topic)  # checks the topic exists and has the right type
        selected = {topic: bag.topics[topic] for topic in image_topics}
        if label_topic:
            selected[label_topic] = LABEL_TYPE
        total = bag.message_count(list(selected))
        player = _Player(selected, remap, reliable, scene_topic)
        published = dict.fromkeys(selected, 0)
        late = 0
        try:
            missing = player.wait_for_subscribers(image_topics, wait_subscribers_s)
            if missing:
                raise BagError(f'no subscriber on {", ".join(remap.get(t, t) for t in missing)} '
                               f'after {wait_subscribers_s:g} s: is the node running, and on '
                               'the same ROS_DOMAIN_ID?')
            # Discovery completes per direction: the publisher can see its subscriber before
            # the subscriber has matched the publisher, and a volatile writer never resends
            # what went out in between (the first frames). Let both sides settle.
            time.sleep(settle_s)
            bar = tqdm(total=total * (1 if not loop else 0) or None, desc='replaying',
                       unit='msg', disable=not progress)
            while True:
                started = time.monotonic()
                first_log_time = None
                for topic, msgtype, log_time, raw in bag.raw_messages(list(selected)):
                    first_log_time = log_time if first_log_time is None else first_log_time
                    if rate > 0:
                        due = started + (log_time - first_log_time) * 1e-9 / rate
                        delay = due - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                    player.publishers[topic].publish(bytes(raw))
                    published[topic] += 1
                    bar.update(1)
                    if lockstep and msgtype in IMAGE_TYPES:
                        header = bag.deserialize(raw, msgtype).header
                        stamp = (header.stamp.sec, header.stamp.nanosec)
                        if not player.wait_for_scene(remap.get(topic, topic), stamp,
                                                     lockstep_timeout_s):
                            late += 1
                if not loop:
                    break
            bar.close()
            time.sleep(0.5 if scene_topic else 0.0)  # the last results are still in flight
        finally:
            with player.condition:
                scenes = list(player.scenes)
            player.close()
    if record_path:
        with open(record_path, 'w') as out:
            for scene in scenes:
                out.write(json.dumps(scene) + '\n')
    return {'bag': str(path), 'published': published, 'scenes': len(scenes),
            'lockstep_timeouts': late, 'record': str(record_path) if record_path else None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the replay command's flags."""
    parser.description = (
        "Publish a rosbag2's image topics (and label topic) with their recorded header stamps: "
        'at the recorded rate, scaled, as fast as possible, or in lockstep with the node. '
        "--record saves the node's ~/scene output for \"evaluate --scenes\".")
    parser.add_argument('bag', metavar='BAG')
    options.add(parser, '--topics', '--remap')
    options.add(parser, '--label-topic', help='also publish this std_msgs/String topic')
    options.add(parser, '--rate', help='speed relative to the recording (default: 1.0)')
    parser.add_argument('--as-fast-as-possible', action='store_true',
                        help='no pauses between messages')
    parser.add_argument('--lockstep', action='store_true',
                        help="wait for each frame's ~/scene result before the next frame")
    parser.add_argument('--loop', action='store_true', help='start again at the end')
    parser.add_argument('--qos', choices=('best_effort', 'reliable'), default='best_effort',
                        help='publisher reliability (default: best_effort, like a camera)')
    parser.add_argument('--scene-topic', default='/cnn_rnn_perception/scene',
                        help="the node's scene topic, for --lockstep and --record")
    parser.add_argument('--record', metavar='FILE.jsonl', help='record ~/scene to JSONL')
    parser.add_argument('--wait', type=float, default=30.0,
                        help='seconds to wait for subscribers (default: 30)')
    options.add(parser, '--no-progress')


def main(args: argparse.Namespace) -> int:
    """Replay the bag and say what was published and recorded."""
    record = replay_bag(args.bag, topics=args.topics, label_topic=args.label_topic,
                        rate=0.0 if args.as_fast_as_possible else args.rate, loop=args.loop,
                        remap=parse_remaps(args.remap), reliable=args.qos == 'reliable',
                        scene_topic=args.scene_topic if (args.lockstep or args.record)
                        else None, lockstep=args.lockstep, record_path=args.record,
                        wait_subscribers_s=args.wait, progress=not args.no_progress)
    published = ', '.join(f'{topic} {count}' for topic, count in record['published'].items())
    print(f'published {published}')
    if args.record:
        print(f'recorded {record["scenes"]} scene messages to {args.record}')
    if record['lockstep_timeouts']:
        print(f'{record["lockstep_timeouts"]} frames got no scene result in time')
    return 0
