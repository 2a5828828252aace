"""
What the node publishes, built by small pure functions outside its callbacks.

The scene record (``~/scene``'s JSON), vision_msgs' ``Classification`` and ``LabelInfo``, and
``/diagnostics``' statuses are each built here from plain values; the node only publishes
them. vision_msgs is optional (an apt package on a robot, no PyPI wheel): without it
``VISION_MSGS`` is False and the node says once which outputs are off.
"""

from __future__ import annotations

from typing import Any

from cnn_rnn_perception.core.engine import StageTimes
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

try:  # vision_msgs is an apt package on a ROS install; there is no PyPI wheel.
    from vision_msgs.msg import Classification, LabelInfo, ObjectHypothesis, VisionClass
    VISION_MSGS = True
except ImportError:
    Classification = LabelInfo = None
    VISION_MSGS = False

LEVELS = {0: DiagnosticStatus.OK, 1: DiagnosticStatus.WARN, 2: DiagnosticStatus.ERROR}


def class_hypotheses(best: list[tuple[str, float]], labels: list[str]
                     ) -> list[tuple[str, float]]:
    """
    Return (class_id, score) pairs as vision_msgs wants them.

    ``ObjectHypothesis.class_id`` is a string ID that a consumer looks up in ``LabelInfo``,
    whose ``VisionClass.class_id`` is the label's index: so the ID is that index, as text.
    """
    index = {label: position for position, label in enumerate(labels)}
    return [(str(index[label]), score) for label, score in best]


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
