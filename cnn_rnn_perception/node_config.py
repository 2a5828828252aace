"""
The node's parameters, validation and bookkeeping, without ROS.

The node declares exactly ``PARAMETERS``; ``validate`` is what its on-set callback asks;
``CameraStats`` and ``LatestFrames`` hold the per-camera state. All are plain Python, tested
without ``rclpy.init``.
"""

from __future__ import annotations

from collections import deque, OrderedDict
from dataclasses import dataclass
import threading
import time
from typing import Any, Callable, Hashable, Iterable

from cnn_rnn_perception.engine import (
    BACKENDS, EngineSettings, parse_device_name, PRECISIONS, resolve_device, StageTimes)
from cnn_rnn_perception.export import is_exported, read_exported
from cnn_rnn_perception.model import (
    default_labels, inspect_checkpoint, ModelConfig, POOLINGS, RNNS, SEQUENCES)
from cnn_rnn_perception.synthetic import NAVIGATION_LABELS
import numpy as np
RELIABILITIES = ('best_effort', 'reliable')


@dataclass(frozen=True)
class ParameterSpec:
    """One ROS parameter: default, description, limits, and whether it can change live."""

    name: str
    default: Any
    description: str
    live: bool = False
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    read_only: bool = False


PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec('autostart', True, 'Configure and activate on start. False leaves the node '
                  'unconfigured for a lifecycle manager.', read_only=True),
    ParameterSpec('image_topics', ['/camera/image_raw'], 'Camera topics. A name ending in '
                  '/compressed is sensor_msgs/CompressedImage, others sensor_msgs/Image.'),
    ParameterSpec('qos.reliability', 'best_effort', 'Subscription reliability. best_effort '
                  'matches camera drivers; reliable receives only from reliable publishers.',
                  choices=RELIABILITIES),
    ParameterSpec('qos.depth', 2, 'Subscription queue depth; the node keeps only the newest '
                  'frame per camera anyway.', minimum=1, maximum=100),
    ParameterSpec('model.checkpoint', '', 'Checkpoint file, or a model exported with '
                  '"cnn_rnn_perception export" (.onnx, OpenVINO .xml). Empty: build from the '
                  'model.* parameters with random weights (a loud warning: results mean '
                  'nothing).'),
    ParameterSpec('model.backbone', 'resnet18', 'CNN trunk when no checkpoint is given.',
                  choices=('resnet18', 'resnet34', 'resnet50', 'mobilenet_v3_small',
                           'mobilenet_v3_large', 'efficientnet_b0', 'vgg16')),
    ParameterSpec('model.sequence', 'spatial', 'Feature map to sequence: spatial, rows or '
                  'columns.', choices=SEQUENCES),
    ParameterSpec('model.strip', 1, 'Feature-map rows or columns per timestep.',
                  minimum=1, maximum=64),
    ParameterSpec('model.rnn', 'lstm', 'Recurrent encoder.', choices=RNNS),
    ParameterSpec('model.hidden_size', 256, 'RNN hidden size.', minimum=1, maximum=4096),
    ParameterSpec('model.num_layers', 1, 'RNN layers.', minimum=1, maximum=8),
    ParameterSpec('model.bidirectional', False, 'Bidirectional RNN.'),
    ParameterSpec('model.pooling', 'last', 'RNN outputs to one vector.', choices=POOLINGS),
    ParameterSpec('model.input_size', [224, 224], 'Model input [height, width] in pixels.'),
    ParameterSpec('model.trunk_weights', '', 'Local torchvision weights file for the trunk '
                  'when no checkpoint is given.'),
    ParameterSpec('labels', list(NAVIGATION_LABELS), 'Class names, used when the checkpoint '
                  'has none (and to size a model built without a checkpoint).'),
    ParameterSpec('device', 'auto', 'auto (GPU if present, else CPU), cpu, cuda or cuda:N.'),
    ParameterSpec('precision', 'auto', 'Trunk precision: auto (bf16 on GPUs that have it, '
                  'fp32 on the CPU), fp32, fp16 or bf16.', choices=PRECISIONS),
    ParameterSpec('compile', True, 'torch.compile the trunk: faster frames, a slower start.'),
    ParameterSpec('backend', 'torch', 'What runs the model: torch, onnxruntime, openvino, or '
                  'auto (times each installed one at start and keeps the fastest that agrees '
                  'with torch).', choices=BACKENDS),
    ParameterSpec('max_rate_hz', 0.0, 'Most inference batches per second; 0 = as fast as '
                  'frames come. Frames in between are dropped as stale.', live=True,
                  minimum=0.0, maximum=1000.0),
    ParameterSpec('top_k', 5, 'Classes published per frame.', live=True, minimum=1,
                  maximum=1000),
    ParameterSpec('score_threshold', 0.0, 'Classes scoring below this are not published.',
                  live=True, minimum=0.0, maximum=1.0),
    ParameterSpec('smoothing', 0.0, "Exponential moving average weight of each camera's "
                  'class history; 0 = off.', live=True, minimum=0.0, maximum=0.99),
    ParameterSpec('smoothing_reset_s', 2.0, 'A camera gap longer than this (by frame stamps) '
                  'drops its history.', live=True, minimum=0.001, maximum=3600.0),
    ParameterSpec('temporal.reset_after_s', 1.0, 'Temporal models: a camera whose frames are '
                  'further apart than this (by their stamps) starts its state afresh, as it '
                  'does when its stamps go backwards.', live=True, minimum=0.001,
                  maximum=3600.0),
    ParameterSpec('silent_after_s', 2.0, 'Diagnostics warn when a camera sends nothing for '
                  'this long, and report an error when frames arrive but none is classified '
                  'for this long.', live=True, minimum=0.1, maximum=3600.0),
)
SPECS = {spec.name: spec for spec in PARAMETERS}
RELOAD_HINT = ('it needs a new engine; the node builds it in the background while the '
               'current one keeps classifying, then switches')


def _check_value(spec: ParameterSpec, value: Any) -> str | None:
    if spec.choices and value not in spec.choices:
        return f'{spec.name} must be one of {", ".join(spec.choices)}; got {value!r}'
    if spec.minimum is not None and not spec.minimum <= value <= spec.maximum:
        return f'{spec.name} must be in [{spec.minimum}, {spec.maximum}]; got {value}'
    if spec.name == 'image_topics':
        if not value or any(not topic or ' ' in topic for topic in value):
            return f'image_topics must be a non-empty list of topic names; got {list(value)}'
        if len(set(value)) != len(value):
            return f'image_topics has duplicates: {list(value)}'
    if spec.name == 'labels' and (not value or len(set(value)) != len(value)):
        return f'labels must be a non-empty list of distinct names; got {list(value)}'
    if spec.name == 'model.input_size' and (len(value) != 2 or min(value) < 32):
        return f'model.input_size must be [height, width], each >= 32; got {list(value)}'
    if spec.name == 'device':
        try:
            # The spelling, then the hardware: cuda:3 on a one-GPU robot is refused here.
            parse_device_name(value)
            resolve_device(value, quiet=True)
        except ValueError as error:
            return str(error)
    if spec.name == 'model.checkpoint' and value:
        try:
            (read_exported if is_exported(value) else inspect_checkpoint)(value)
        except FileNotFoundError:
            return f'model.checkpoint {value!r}: file not found'
        except (ValueError, RuntimeError) as error:
            return f'model.checkpoint: {error}'
    return None


def validate(changes: dict[str, Any], current: dict[str, Any], *,
             startup: bool = False) -> str | None:
    """
    Return why a set of parameter changes is refused, or None when it is valid.

    ``current`` holds every parameter's present value; model fields are checked together, so
    a strip that does not divide the new feature map is refused with the fix. ``startup``
    checks values given at start-up (read-only ones included) the same way.
    """
    for name, value in changes.items():
        spec = SPECS.get(name)
        if spec is None:
            continue
        if spec.read_only and not startup:
            return f'{name} is read-only: set it at start-up (--ros-args -p {name}:=...)'
        reason = _check_value(spec, value)
        if reason:
            return reason
    merged = {**current, **changes}
    if ('backend' in changes or 'model.checkpoint' in changes) and merged['backend'] == 'torch' \
            and merged['model.checkpoint'] and is_exported(merged['model.checkpoint']):
        return (f'model.checkpoint {merged["model.checkpoint"]!r} is an exported model: set '
                'backend to onnxruntime, openvino or auto to run it')
    if any(name.startswith('model.') or name == 'labels' for name in changes):
        if not merged['model.checkpoint']:
            try:
                model_config(merged)
            except ValueError as error:
                return str(error)
    return None


def validate_startup(values: dict[str, Any]) -> str | None:
    """Return why start-up (or configure-time) parameter values are refused, or None."""
    return validate(values, values, startup=True)


def needs_reload(changes: dict[str, Any], running: dict[str, Any] | None = None) -> list[str]:
    """
    Return the changed parameters that take effect only through a new engine.

    With ``running`` (the values the current engine was built from), a value set back to
    what is running needs nothing: that is how a failed reload's revert is told apart.
    """
    return sorted(name for name, value in changes.items()
                  if name in SPECS and not SPECS[name].live and not SPECS[name].read_only
                  and (running is None or running.get(name) != value))


RESUBSCRIBE = ('image_topics', 'qos.reliability', 'qos.depth')


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


def run_supervised(classify: Callable[[set], None], topics: Iterable[str],
                   reject: Callable[[str, str], None]) -> Exception | None:
    """
    Run one batch so that nothing it raises stops the worker or loses a frame.

    ``classify(handled)`` adds each topic it published or rejected to ``handled``; when it
    raises, every other topic of the batch is rejected with the error, and the error returned.
    """
    handled: set[str] = set()
    try:
        classify(handled)
    except Exception as error:  # noqa: B902 - one bad batch must not stop the cameras
        reason = f'internal error: {type(error).__name__}: {error}'
        for topic in set(topics) - handled:
            reject(topic, reason)
        return error
    return None


class RateLimitedLog:
    """
    Say a message at once, then at most once per ``period_s`` per (key, message).

    Bounded: reasons carry numbers (byte counts, sizes), so a camera sending ever-different
    garbage would otherwise grow the table for ever. The oldest entries go first.
    """

    def __init__(self, period_s: float = 5.0, max_entries: int = 256) -> None:
        self.period_s = period_s
        self.max_entries = max_entries
        self._last: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._last)

    def should_log(self, key: str, message: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        entry = (key, message)
        with self._lock:
            last = self._last.get(entry)
            if last is not None and now - last < self.period_s:
                return False
            self._last[entry] = now
            self._last.move_to_end(entry)
            while len(self._last) > self.max_entries:
                self._last.popitem(last=False)
        return True


def model_config(values: dict[str, Any]) -> ModelConfig:
    """Build the ModelConfig the model.* parameters describe (no checkpoint)."""
    return ModelConfig(
        num_classes=len(values['labels']), backbone=values['model.backbone'],
        sequence=values['model.sequence'], strip=int(values['model.strip']),
        rnn=values['model.rnn'], hidden_size=int(values['model.hidden_size']),
        num_layers=int(values['model.num_layers']),
        bidirectional=bool(values['model.bidirectional']), pooling=values['model.pooling'],
        input_size=tuple(int(v) for v in values['model.input_size']),
        trunk_weights=values['model.trunk_weights'])


def engine_settings(values: dict[str, Any], camera_count: int, *,
                    compiled: bool) -> EngineSettings:
    """Build the engine settings from parameters: one batch holds one frame per camera."""
    return EngineSettings(device=values['device'], precision=values['precision'],
                          compile_trunk=compiled, max_batch=max(camera_count, 1),
                          backend=values['backend'],
                          reset_after_s=values['temporal.reset_after_s'])


def stuck_after_s(silent_after_s: float) -> float:
    """Return how long one batch may run before the worker counts as stuck."""
    # Batches take milliseconds to a second; compiling never happens in the worker.
    return max(10.0, 3.0 * silent_after_s)


def choose_labels(checkpoint_labels: list[str], parameter_labels: list[str]) -> list[str]:
    """Use the ``labels`` parameter only where the checkpoint has placeholder names."""
    if (checkpoint_labels == default_labels(len(checkpoint_labels))
            and len(parameter_labels) == len(checkpoint_labels)):
        return list(parameter_labels)
    return list(checkpoint_labels)


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


class CameraStats:
    """Counters and latencies of one camera; every method is thread-safe."""

    def __init__(self, topic: str, latency_window: int = 512) -> None:
        self.topic = topic
        self._lock = threading.Lock()
        self.received = self.classified = self.dropped_stale = self.rejected = 0
        self.last_reason = ''
        self.last_received_at: float | None = None
        self._progress_at = time.monotonic()  # last frame handled, or when counting began
        self._received_since_progress = 0
        self._latencies_ms: deque[float] = deque(maxlen=latency_window)
        self._window_start = time.monotonic()
        self._window_received = self._window_classified = self._window_rejected = 0

    def on_received(self) -> None:
        with self._lock:
            self.received += 1
            self._received_since_progress += 1
            self._window_received += 1
            self.last_received_at = time.monotonic()

    def on_dropped_stale(self, count: int = 1) -> None:
        with self._lock:
            self.dropped_stale += count

    def on_rejected(self, reason: str) -> None:
        with self._lock:
            self.rejected += 1
            self._progress_at = time.monotonic()
            self._received_since_progress = 0
            self._window_rejected += 1
            self.last_reason = reason

    def on_classified(self, latency_ms: float) -> None:
        with self._lock:
            self._progress_at = time.monotonic()
            self._received_since_progress = 0
            self.classified += 1
            self._window_classified += 1
            self._latencies_ms.append(latency_ms)

    def snapshot(self, silent_after_s: float, stalled_after_s: float | None = None,
                 cause: str = '') -> dict[str, Any]:
        """
        Return totals, rates since the last snapshot, latency percentiles and a level.

        Frames arriving with none classified for ``stalled_after_s`` (default
        ``silent_after_s``) is an error, whatever the reason; ``cause`` names it when known.
        """
        stalled_after_s = silent_after_s if stalled_after_s is None else stalled_after_s
        with self._lock:
            now = time.monotonic()
            elapsed = max(now - self._window_start, 1e-6)
            latencies = np.array(self._latencies_ms) if self._latencies_ms else None
            p50, p95 = (None, None) if latencies is None else (
                float(np.percentile(latencies, 50)), float(np.percentile(latencies, 95)))
            silent_for = None if self.last_received_at is None else now - self.last_received_at
            snap = {
                'topic': self.topic, 'received': self.received, 'classified': self.classified,
                'dropped_stale': self.dropped_stale, 'rejected': self.rejected,
                'pending': self.received - self.classified - self.dropped_stale - self.rejected,
                'last_reject_reason': self.last_reason,
                'input_hz': self._window_received / elapsed,
                'classified_hz': self._window_classified / elapsed,
                'latency_p50_ms': p50, 'latency_p95_ms': p95,
            }
            window_all_rejected = self._window_rejected > 0 and self._window_classified == 0
            stalled_for = now - self._progress_at
            stalled = (silent_for is not None and silent_for <= silent_after_s
                       and self._received_since_progress > 0
                       and stalled_for > stalled_after_s)
            self._window_start = now
            self._window_received = self._window_classified = self._window_rejected = 0
        if window_all_rejected:
            snap['level'], snap['message'] = 2, f'every frame rejected: {self.last_reason}'
        elif stalled:
            snap['level'] = 2
            snap['message'] = (f'frames arrive but none classified for {stalled_for:.1f} s'
                               + (f': {cause}' if cause else ''))
        elif silent_for is None:
            snap['level'], snap['message'] = 1, 'no frames received yet'
        elif silent_for > silent_after_s:
            snap['level'], snap['message'] = 1, f'silent for {silent_for:.1f} s'
        else:
            snap['level'], snap['message'] = 0, 'ok'
        return snap


class LatestFrames:
    """
    The newest unprocessed frame of each camera, and nothing older: no backlog, ever.

    ``put`` returns True when it overwrote a frame inference never saw (a stale drop).
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._slots: dict[Hashable, Any] = {}
        self._closed = False

    def put(self, key: Hashable, item: Any) -> bool:
        with self._condition:
            replaced = key in self._slots
            self._slots[key] = item
            self._condition.notify()
        return replaced

    def take_all(self, timeout_s: float) -> dict[Hashable, Any]:
        """Wait up to ``timeout_s`` for frames; return and clear every slot."""
        with self._condition:
            if not self._slots and not self._closed:
                self._condition.wait(timeout_s)
            slots, self._slots = self._slots, {}
        return slots

    def drain(self) -> dict[Hashable, Any]:
        """Return and clear what is pending; waiting goes on as before."""
        with self._condition:
            slots, self._slots = self._slots, {}
        return slots

    def close(self) -> dict[Hashable, Any]:
        """Wake any waiter; return what was still pending."""
        with self._condition:
            self._closed = True
            slots, self._slots = self._slots, {}
            self._condition.notify_all()
        return slots

    def reopen(self) -> None:
        with self._condition:
            self._closed = False
