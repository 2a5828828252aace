"""
What the node publishes, built by small pure functions outside its callbacks.

The scene records (``~/scene``'s and ``~/robot_scene``'s JSON), vision_msgs' ``Classification``
and ``LabelInfo``, Nav2's ``SpeedLimit``, the debug image and ``/diagnostics``' statuses (the
node's, each camera's, the robot's decision) are each built here from plain values; the node
only publishes them. vision_msgs and nav2_msgs are
optional (apt packages on a robot, no PyPI wheel): without them ``VISION_MSGS`` or
``NAV2_MSGS`` is False and the node says once which outputs are off.
"""

from __future__ import annotations

from typing import Any

from cnn_rnn_perception.core.engine import StageTimes
from cnn_rnn_perception.core.navigation import FusedScene, PolicyEntry, ScenePolicy, STALE
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
import numpy as np
from sensor_msgs.msg import Image

try:  # vision_msgs is an apt package on a ROS install; there is no PyPI wheel.
    from vision_msgs.msg import Classification, LabelInfo, ObjectHypothesis, VisionClass
    VISION_MSGS = True
except ImportError:
    Classification = LabelInfo = None
    VISION_MSGS = False

try:  # nav2_msgs likewise: an apt package on a robot (ros-<distro>-nav2-msgs).
    from nav2_msgs.msg import SpeedLimit
    NAV2_MSGS = True
except ImportError:
    SpeedLimit = None
    NAV2_MSGS = False

LEVELS = {0: DiagnosticStatus.OK, 1: DiagnosticStatus.WARN, 2: DiagnosticStatus.ERROR}
# What went wrong, for /diagnostics: (level, message); None when all is well.
Problem = tuple[int, str]


def class_hypotheses(best: list[tuple[str, float]], labels: list[str]
                     ) -> list[tuple[str, float]]:
    """
    Return (class_id, score) pairs as vision_msgs wants them.

    ``ObjectHypothesis.class_id`` is a string ID that a consumer looks up in ``LabelInfo``,
    whose ``VisionClass.class_id`` is the label's index: so the ID is that index, as text.
    """
    index = {label: position for position, label in enumerate(labels)}
    return [(str(index[label]), score) for label, score in best]


def stamp_seconds(stamp: Any) -> float:
    """Return a ``builtin_interfaces/Time`` as seconds."""
    return stamp.sec + stamp.nanosec * 1e-9


def stamp_now(ros_now_ns: int, wall_ns: int) -> int:
    """
    Return the stamp for a message the node originates.

    The ROS clock where it runs; under ``use_sim_time`` with no ``/clock`` yet it reads zero,
    and a zero stamp reads as "no time" to every consumer, so wall time stands in.
    """
    return ros_now_ns if ros_now_ns > 0 else wall_ns


def scene_record(topic: str, stamp: tuple[int, int], frame_id: str,
                 best: list[tuple[str, float]], times: StageTimes, node_ms: float
                 ) -> dict[str, Any]:
    """Return the JSON object ``~/scene`` publishes for one classified frame."""
    return {
        'topic': topic,
        'stamp': {'sec': stamp[0], 'nanosec': stamp[1]},
        'frame_id': frame_id,
        'label': best[0][0] if best else None,
        'score': best[0][1] if best else None,
        'top_k': [{'label': label, 'score': score} for label, score in best],
        'latency_ms': {'preprocess': times.preprocess_ms, 'forward': times.forward_ms,
                       'postprocess': times.postprocess_ms, 'receive_to_publish': node_ms},
        'batch_size': times.batch_size,
    }


def classification_message(header: Any, best: list[tuple[str, float]], labels: list[str]):
    """Return the ``vision_msgs/Classification`` of one frame (needs vision_msgs)."""
    message = Classification(header=header)
    message.results = [ObjectHypothesis(class_id=class_id, score=score)
                       for class_id, score in class_hypotheses(best, labels)]
    return message


def label_info_message(labels: list[str], threshold: float, stamp: Any):
    """Return the ``vision_msgs/LabelInfo`` that maps each class_id to its name."""
    message = LabelInfo()
    message.header.stamp = stamp
    message.class_map = [VisionClass(class_id=index, class_name=label)
                         for index, label in enumerate(labels)]
    message.threshold = float(threshold)
    return message


def key_values(values: dict[str, Any]) -> list[KeyValue]:
    """Return diagnostics key-values: floats with two decimals, None as empty."""
    return [KeyValue(key=key, value='' if value is None else
                     (f'{value:.2f}' if isinstance(value, float) else str(value)))
            for key, value in values.items()]


def diagnostic_status(name: str, level: int, message: str, hardware_id: str,
                      values: dict[str, Any]) -> DiagnosticStatus:
    """Return one diagnostic status: the node's, or one camera's."""
    return DiagnosticStatus(level=LEVELS[level], name=name, message=message,
                            hardware_id=hardware_id, values=key_values(values))


def robot_scene_record(scene: FusedScene, best: list[tuple[str, float]], decision: str,
                       reason: str, since_s: float | None, frame_id: str = '') -> dict[str, Any]:
    """Return the JSON object ``~/robot_scene`` publishes: the fused scene and the decision."""
    # Rounded once, as nanoseconds: 0.9999999999 s is {1, 0}, never {0, 1000000000 % 1e9}.
    sec, nanosec = divmod(int(round(scene.stamp_s * 1e9)), 1_000_000_000)
    return {
        'stamp': {'sec': sec, 'nanosec': nanosec},
        'frame_id': frame_id,
        'label': best[0][0] if best else None,
        'score': best[0][1] if best else None,
        'top_k': [{'label': label, 'score': score} for label, score in best],
        'cameras': list(scene.cameras),
        'decision': decision,
        'decision_reason': reason,
        'decided_at': since_s,
    }


def speed_limit_message(entry: PolicyEntry, stamp: Any, frame_id: str = ''):
    """
    Return the ``nav2_msgs/SpeedLimit`` a policy entry asks for (needs nav2_msgs).

    An entry without a speed limit lifts it: 0.0 is Nav2's "no limit".
    """
    message = SpeedLimit()
    message.header.stamp = stamp
    message.header.frame_id = frame_id
    message.percentage = bool(entry.percentage)
    message.speed_limit = float(entry.speed_limit or 0.0)
    return message


def debug_image_message(canvas: np.ndarray, header: Any) -> Image:
    """Return a ``bgr8`` picture (``core.image_conversion.annotated_bgr``) with its header."""
    message = Image(header=header, height=canvas.shape[0], width=canvas.shape[1],
                    encoding='bgr8', is_bigendian=0, step=canvas.shape[1] * 3)
    message.data = canvas.tobytes()
    return message


def debug_lines(topic: str, best: list[tuple[str, float]], decision: str, node_ms: float
                ) -> list[str]:
    """Return what the debug image says: camera, classes, the robot's decision, latency."""
    classes = '  '.join(f'{label} {score:.2f}' for label, score in best[:3]) or '(below threshold)'
    return [f'{topic}: {classes}', f'robot: {decision}', f'receive to publish {node_ms:.1f} ms']


def engine_values(engine: Any) -> dict[str, Any]:
    """Return what /diagnostics says of the running engine (none: nothing)."""
    if engine is None:
        return {}
    values = {}
    choice = getattr(engine, 'backend_choice', None)
    if choice is not None:
        values['backend_choice'] = choice.summary()
    return {**values, 'device': str(engine.device), 'precision': engine.precision,
            'model': engine.describe()}


def node_problem(active: bool, busy_for_s: float | None, stuck_after: float,
                 engine_status: str, serving: bool, problem: Problem | None) -> Problem | None:
    """Return what is wrong with the node as a whole, worst first, or None."""
    if active and busy_for_s is not None and busy_for_s > stuck_after:
        return 2, f'inference stuck in one batch for {busy_for_s:.0f} s'
    if active and not serving and problem is None:
        return 1, f'model {engine_status}'
    return problem


def stalled_after_s(silent_after_s: float, max_rate_hz: float) -> float:
    """Return how long frames may arrive with none classified before a camera is in error."""
    return silent_after_s + (1.0 / max_rate_hz if max_rate_hz > 0 else 0.0)


def camera_statuses(name: str, state: str, problem: Problem | None,
                    snapshots: dict[str, dict[str, Any]], memory: dict[str, Any],
                    hardware_id: str, common: dict[str, Any]) -> list[DiagnosticStatus]:
    """
    Return one status per camera (``CameraStats.snapshot``), or the node's alone with none.

    A node that is not active reports its state (or its problem) on every camera; an active
    one reports the camera's own level unless the node's problem is worse. A temporal model's
    memory of a camera (``engine.stream_status()``) is added to that camera's values.
    """
    if not snapshots:
        level, message = problem or (0, state)
        return [diagnostic_status(name, level, message, hardware_id, common)]
    statuses = []
    for topic, snapshot in snapshots.items():
        values = dict(snapshot)
        level, message = values.pop('level'), values.pop('message')
        if state != 'active':
            level, message = problem or (0, state)
        elif problem is not None and problem[0] > level:
            level, message = problem
        if topic in memory:  # a temporal model: how much of this camera it remembers
            values.update(state_age_s=memory[topic].age_s, state_frames=memory[topic].frames,
                          state_started_by=memory[topic].reason)
        statuses.append(diagnostic_status(f'{name}: {topic}', level, message, hardware_id,
                                          {**values, **common}))
    return statuses


def decision_status(name: str, hardware_id: str,
                    snapshot: tuple[str, str, float | None, FusedScene | None],
                    policy: ScenePolicy | None, speed_limit_output: bool) -> DiagnosticStatus:
    """Return the robot's decision for /diagnostics: its state, why, and what Nav2 gets."""
    label, reason, _, scene = snapshot
    values = {'decision': label, 'reason': reason,
              'cameras': ' '.join(scene.cameras) if scene is not None else '',
              'policy_file': policy.source if policy is not None else '',
              'speed_limit_output': ('on' if speed_limit_output else 'off: nav2_msgs is not '
                                     'installed') if policy is not None else 'no policy'}
    if policy is not None:
        values['policy_entry'] = policy.entry(label).describe()
    level = 1 if label == STALE else 0
    return diagnostic_status(name, level, f'decision {label}: {reason}', hardware_id, values)
