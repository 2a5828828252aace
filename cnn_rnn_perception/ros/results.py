"""
What a batch's results become: each camera's messages, then the robot's scene and decision.

The node's inference worker hands a classified batch here (``ResultPublisher.publish``) with
the values its batch ran with; the messages are built by the pure functions of ``ros.outputs``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from cnn_rnn_perception.core.image_conversion import annotated_bgr
from cnn_rnn_perception.core.postprocess import ProbabilitySmoother, top_k
from cnn_rnn_perception.ros.cameras import CameraRoster
from cnn_rnn_perception.ros.navigation_link import NavigationLink
from cnn_rnn_perception.ros.outputs import (
    classification_message, debug_image_message, debug_lines, robot_scene_record, scene_record,
    stamp_seconds, VISION_MSGS)
from rclpy.time import Time
from std_msgs.msg import Header, String


class ResultPublisher:
    """Publishes classified batches: per camera, the robot's scene, a debug image in turn."""

    def __init__(self, roster: CameraRoster, smoother: ProbabilitySmoother,
                 navigation: NavigationLink) -> None:
        self._roster = roster
        self._smoother = smoother
        self._navigation = navigation
        self._debug_image_at = 0.0
        self._debug_turn = 0
        self._outputs: dict[str, Any] = {}
        self._values: dict[str, Any] = {}

    def publish(self, outputs: dict[str, Any], values: dict[str, Any], batch: list,
                results: list, labels: list[str], handled: set[str]) -> None:
        """Publish each camera's result of a batch, then the robot's scene; mark them handled."""
        # The batch's own values: live changes apply from one batch to the next, never inside.
        self._outputs, self._values = outputs, values
        estimates = []
        debug_turn = self._debug_turn % len(batch)
        for position, ((topic, msg, received_at, frame, order), result) in enumerate(
                zip(batch, results)):
            estimate, best, node_ms = self._publish_result(topic, msg.header, received_at,
                                                           result, labels)
            handled.add(topic)
            estimates.append((topic, stamp_seconds(msg.header.stamp), estimate))
            if position == debug_turn:
                self._maybe_debug_image(topic, msg.header, frame, order, best, node_ms)
        self._publish_robot_scene(estimates, labels)

    def _publish_result(self, topic: str, header: Any, received_at: float, result: Any,
                        labels: list[str]) -> tuple[Any, list[tuple[str, float]], float]:
        estimate, best = self._smoother.rank(topic, stamp_seconds(header.stamp),
                                             result.probabilities, int(self._values['top_k']),
                                             labels, float(self._values['score_threshold']))
        node_ms = (time.monotonic() - received_at) * 1e3
        scene = scene_record(topic, (header.stamp.sec, header.stamp.nanosec), header.frame_id,
                             best, result.times, node_ms)
        self._outputs['scene'].publish(String(data=json.dumps(scene)))
        if VISION_MSGS:
            self._outputs['classification'].publish(
                classification_message(header, best, labels))
        self._roster.get(topic).on_classified(node_ms)
        return estimate, best, node_ms

    def _publish_robot_scene(self, estimates: list, labels: list[str]) -> None:
        """Decide on a batch's cameras (the link sends Nav2 what changed); publish the scene."""
        label, reason, since_s, scene = self._navigation.decide(estimates, labels)
        if scene is None:
            return
        best = top_k(scene.probabilities, int(self._values['top_k']), labels,
                     float(self._values['score_threshold']))
        record = robot_scene_record(scene, best, label, reason, since_s,
                                    self._values['navigation.frame_id'])
        self._outputs['robot_scene'].publish(String(data=json.dumps(record)))
        if VISION_MSGS:
            header = Header(stamp=Time(seconds=scene.stamp_s).to_msg(),
                            frame_id=self._values['navigation.frame_id'])
            self._outputs['robot_classification'].publish(
                classification_message(header, best, labels))

    def _maybe_debug_image(self, topic: str, header: Any, frame: Any, order: str,
                           best: list[tuple[str, float]], node_ms: float) -> None:
        """Draw a camera's frame (each in turn) while someone watches, at most at the set rate."""
        publisher = self._outputs['debug_image']
        now = time.monotonic()
        if (publisher.get_subscription_count() == 0
                or now - self._debug_image_at < 1.0 / self._values['debug_image.max_rate_hz']):
            return
        self._debug_turn += 1
        self._debug_image_at = now
        label = self._navigation.robot.decision.label
        picture = annotated_bgr(frame, order, debug_lines(topic, best, label, node_ms))
        publisher.publish(debug_image_message(picture, header))
