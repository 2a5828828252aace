"""
The node's camera subscriptions: one per image topic, each storing only the newest frame.

A callback counts the frame and puts it in ``LatestFrames`` (overwriting one inference never
saw counts it as a stale drop); the inference worker does the rest. Subscribing again happens
only when the topics or the QoS change, and unsubscribing counts every frame still waiting, so
every frame received is accounted for. A ``/compressed`` topic is a ``CompressedImage``.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

from cnn_rnn_perception.ros.cameras import CameraStats, LatestFrames, RateLimitedLog
from cnn_rnn_perception.ros.parameters import plain, RESUBSCRIBE, subscription_qos
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image

try:  # Iron and later
    from rclpy.event_handler import SubscriptionEventCallbacks
except ImportError:  # Humble
    from rclpy.qos_event import SubscriptionEventCallbacks


class CameraSubscriptions:
    """Subscribes a node to its cameras and hands each newest frame to ``frames``."""

    def __init__(self, node: Node, frames: LatestFrames,
                 stats_of: Callable[[str], CameraStats | None]) -> None:
        self._node = node
        self._frames = frames
        self._stats_of = stats_of
        self._subscriptions: list = []
        self._subscribed_as: tuple | None = None
        self._qos_log = RateLimitedLog(period_s=30.0)

    def subscribe(self, values: dict[str, Any]) -> None:
        """Subscribe as the parameters say; nothing happens when that is unchanged."""
        wanted = tuple(plain(values[name]) if name != 'image_topics'
                       else tuple(values[name]) for name in RESUBSCRIBE)
        if wanted == self._subscribed_as:
            return
        self.unsubscribe()
        qos = subscription_qos(values)
        for topic in values['image_topics']:
            self._subscribe(topic, qos)
        self._subscribed_as = wanted

    def unsubscribe(self) -> None:
        """Drop every subscription; frames still waiting count as stale drops."""
        # Subscriptions first: no callback can then store a frame after the drain below.
        for subscription in self._subscriptions:
            self._node.destroy_subscription(subscription)
        self._subscriptions = []
        self._subscribed_as = None
        for topic in self._frames.drain():
            stats = self._stats_of(topic)
            if stats is not None:
                stats.on_dropped_stale()  # never reached a batch

    def _subscribe(self, topic: str, qos: QoSProfile) -> None:
        message_type = CompressedImage if topic.endswith('/compressed') else Image
        events = SubscriptionEventCallbacks(
            incompatible_qos=functools.partial(self._on_incompatible_qos, topic))
        self._subscriptions.append(self._node.create_subscription(
            message_type, topic, functools.partial(self._on_image, topic), qos,
            event_callbacks=events))
        for info in self._node.get_publishers_info_by_topic(topic):
            if (qos.reliability == ReliabilityPolicy.RELIABLE
                    and info.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT):
                self._warn_best_effort_publisher(topic)

    def _on_incompatible_qos(self, topic: str, event: Any) -> None:
        self._warn_best_effort_publisher(topic)

    def _warn_best_effort_publisher(self, topic: str) -> None:
        if not self._qos_log.should_log(topic, 'best effort publisher'):
            return
        self._node.get_logger().warning(
            f'{topic}: a publisher offers QoS this subscription cannot receive (it publishes '
            'best effort, the node asks for reliable): set qos.reliability to best_effort, '
            'or make the camera publish reliable')

    def _on_image(self, topic: str, msg: Image | CompressedImage) -> None:
        stats = self._stats_of(topic)
        if stats is None:  # a message in flight while the topic was unsubscribed
            return
        stats.on_received()
        if self._frames.put(topic, (msg, time.monotonic())):
            stats.on_dropped_stale()
