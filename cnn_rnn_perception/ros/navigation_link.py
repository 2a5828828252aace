"""
The robot's decided scene and what the node sends Nav2 for it, in order.

``core.navigation`` decides (fusion, dwell, staleness) and reads the scene policy; this link
owns one ``RobotDecision`` and the policy, and sends what the decided state asks of Nav2 on the
publishers it is given while the node is active: the speed limit every time (and again every
``navigation.republish_s``, as Nav2's own filters do), the controller and planner only when the
decision changes. One lock keeps a decided change (from the inference worker) and staleness
(from the node's timer) in order: what Nav2 gets last is what holds.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Sequence

from cnn_rnn_perception.core.navigation import (
    FusedScene, load_policy, RobotDecision, ScenePolicy, STALE)
from cnn_rnn_perception.ros.outputs import speed_limit_message
from cnn_rnn_perception.ros.parameters import configure_decision
from rclpy.duration import Duration
from std_msgs.msg import String

_LOG = logging.getLogger(__name__)
NAV2_OUTPUTS = ('speed_limit', 'controller_selector', 'planner_selector')


class NavigationLink:
    """Decides the robot's scene from the cameras' results and tells Nav2 what it asks for."""

    def __init__(self, stamp: Callable[[], Any]) -> None:
        self._stamp = stamp
        self._lock = threading.Lock()
        self._publishers: dict[str, Any] = {}
        self.robot = RobotDecision()
        self.policy: ScenePolicy | None = None
        self._policy_checked: tuple[str, list[str]] = ('', [])
        self._speed_limit_sent_at = 0.0

    def start_sending(self, publishers: dict[str, Any]) -> None:
        """Start deciding afresh (unknown until a scene has dwelt) and send it at once."""
        old = self.robot
        self.robot = RobotDecision(old.decision.settings, old.stale_after_s,
                                   now=time.monotonic())
        self._publishers = {key: publishers[key] for key in NAV2_OUTPUTS if key in publishers}
        with self._lock:
            self._send(changed=True)  # Nav2 hears "unknown" from the start

    def stop_sending(self, reason: str) -> None:
        """Make the decision stale, send the policy's stale entry, delivered if possible."""
        if not self._publishers:
            return
        with self._lock:
            self.robot.force_stale(reason)
            self._send(changed=True)
        # The publishers go inactive (or away) right after this: let reliable readers have it.
        for publisher in self._publishers.values():
            publisher.wait_for_all_acked(Duration(seconds=0.5))
        self._publishers = {}

    def decide(self, estimates: Sequence[tuple[str, float, Any]], labels: Sequence[str]
               ) -> tuple[str, str, float | None, FusedScene | None]:
        """Fuse a batch's cameras, decide, send what changed; return the decision snapshot."""
        with self._lock:
            changed = self.robot.add(estimates, labels, time.monotonic())
            snapshot = self.robot.snapshot()
            if changed:
                _LOG.info(f'decided scene: {snapshot[0]} ({snapshot[1]})')
                self._send(changed=True)
        return snapshot

    def tick(self, republish_s: float) -> None:
        """Find staleness in time and re-send the speed limit when it is due."""
        if not self._publishers:
            return
        now = time.monotonic()
        with self._lock:
            if self.robot.check_stale(now):
                _LOG.warning(f'decided scene: {STALE} ({self.robot.decision.reason})')
                self._send(changed=True)
            elif now - self._speed_limit_sent_at >= republish_s:
                self._send(changed=False)

    def configure(self, values: dict[str, Any], labels: list[str]) -> str | None:
        """
        Apply the navigation parameters; a new policy file is read and sent at once.

        Returns why the policy no longer applies (the labels changed under it), or None.
        """
        configure_decision(self.robot, values)
        path = values['navigation.policy_file']
        # A new checkpoint may bring other labels: the same file is checked against them.
        if (path, labels) == self._policy_checked:
            return None
        self._policy_checked = (path, list(labels))
        try:
            self.policy = load_policy(path, labels) if path else None
        except ValueError as error:
            self.policy = None
            _LOG.error(f'{error}; nothing is sent to Nav2 until it is fixed')
            return f'navigation.policy_file no longer applies: {error}'
        if path:
            _LOG.info(f'scene policy {path}: ' + '; '.join(
                f'{state}: {entry.describe()}' for state, entry in self.policy.entries.items()))
        with self._lock:
            self._send(changed=True)
        return None

    def _send(self, changed: bool) -> None:
        """Send what the policy asks for the decided state; the caller holds the lock."""
        policy = self.policy
        if policy is None or not self._publishers:
            return
        entry = policy.entry(self.robot.decision.label)
        if 'speed_limit' in self._publishers and policy.uses('speed_limit'):
            self._publishers['speed_limit'].publish(speed_limit_message(entry, self._stamp()))
            self._speed_limit_sent_at = time.monotonic()
        for key in ('controller', 'planner') if changed else ():
            name = getattr(entry, key)
            if name is not None:
                self._publishers[f'{key}_selector'].publish(String(data=name))
