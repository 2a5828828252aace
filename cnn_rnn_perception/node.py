"""
The perception node: the rclpy adapter over the engine.

A ``LifecycleNode``: configure validates parameters and loads the model, activate subscribes
and starts the inference worker, deactivate stops it and releases the device. Image callbacks
only store the newest frame of each camera; one worker thread takes the newest frame of every
camera and runs them as one batch, so there is never a backlog and parameter and lifecycle
services always answer. Every output carries the source image's header.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from typing import Any

from cnn_rnn_perception.engine import InferenceEngine, precision_name
from cnn_rnn_perception.image_conversion import ImageRejected, message_to_frame
from cnn_rnn_perception.node_config import (
    CameraStats, choose_labels, engine_settings, LatestFrames, model_config, needs_reload,
    PARAMETERS, ParameterSpec, RELOAD_HINT, scene_record, SPECS, validate)
from cnn_rnn_perception.postprocess import ProbabilitySmoother, top_k
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (
    FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult)
import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, State, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

try:  # Iron and later
    from rclpy.event_handler import SubscriptionEventCallbacks
except ImportError:  # Humble
    from rclpy.qos_event import SubscriptionEventCallbacks

try:  # vision_msgs is an apt package on a ROS install; there is no PyPI wheel.
    from vision_msgs.msg import Classification, LabelInfo, ObjectHypothesis, VisionClass
except ImportError:
    Classification = None

SUCCESS = TransitionCallbackReturn.SUCCESS
FAILURE = TransitionCallbackReturn.FAILURE
_LEVELS = {0: DiagnosticStatus.OK, 1: DiagnosticStatus.WARN, 2: DiagnosticStatus.ERROR}


def _descriptor(spec: ParameterSpec) -> ParameterDescriptor:
    descriptor = ParameterDescriptor(description=spec.description, read_only=spec.read_only)
    if spec.choices:
        descriptor.additional_constraints = f'one of: {", ".join(spec.choices)}'
    if not spec.live and not spec.read_only:
        descriptor.additional_constraints += (
            ('; ' if descriptor.additional_constraints else '') + 'changing it reloads the model')
    if spec.minimum is not None and isinstance(spec.default, int):
        descriptor.integer_range = [IntegerRange(from_value=int(spec.minimum),
                                                 to_value=int(spec.maximum), step=1)]
    elif spec.minimum is not None:
        descriptor.floating_point_range = [FloatingPointRange(
            from_value=float(spec.minimum), to_value=float(spec.maximum), step=0.0)]
    return descriptor


def _plain(value: Any) -> Any:
    """Parameter values as plain Python: arrays as lists."""
    return list(value) if not isinstance(value, (str, bytes, bool, int, float)) else value


class _RosLogHandler(logging.Handler):
    """Send the core modules' Python log records to the node's ROS logger."""

    def __init__(self, ros_logger) -> None:
        super().__init__()
        self._ros_logger = ros_logger

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self._ros_logger.error(record.getMessage())
        elif record.levelno >= logging.WARNING:
            self._ros_logger.warning(record.getMessage())
        else:
            self._ros_logger.info(record.getMessage())


class PerceptionNode(LifecycleNode):
    """Classifies camera topics with the CNN-RNN scene model."""

    def __init__(self, node_name: str = 'cnn_rnn_perception', **kwargs: Any) -> None:
        """Declare parameters and outputs; the model loads on configure."""
        super().__init__(node_name, **kwargs)
        for spec in PARAMETERS:
            self.declare_parameter(spec.name, spec.default, _descriptor(spec))
        self.add_on_set_parameters_callback(self._on_set_parameters)
        core_logger = logging.getLogger('cnn_rnn_perception')
        core_logger.setLevel(logging.INFO)
        core_logger.propagate = False
        core_logger.handlers = [_RosLogHandler(self.get_logger())]

        self._scene_pub = self.create_publisher(String, '~/scene', 10)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        if Classification is not None:
            self._classification_pub = self.create_publisher(
                Classification, '~/classification', 10)
            self._label_info_pub = self.create_publisher(
                LabelInfo, '~/label_info',
                QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        else:
            self.get_logger().info('vision_msgs is not installed: ~/classification and '
                                   '~/label_info are off; ~/scene carries every result')
        self._state = 'unconfigured'
        self._values: dict[str, Any] = {}
        self._labels: list[str] = []
        self._engine: InferenceEngine | None = None
        self._stats: dict[str, CameraStats] = {}
        self._subscriptions_: list = []
        self._frames = LatestFrames()
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        self._smoother = ProbabilitySmoother()
        self._live_lock = threading.Lock()
        self._live_changes: dict[str, Any] = {}
        self._one_shot_timers: list = []
        self._rejections_logged: dict[tuple[str, str], float] = {}
        self._diagnostics_timer = self.create_timer(1.0, self._publish_diagnostics)
        if self.get_parameter('autostart').value:
            self._call_soon(self._autostart)

    # -- parameters --------------------------------------------------------------------------

    def _parameter_values(self) -> dict[str, Any]:
        return {spec.name: _plain(self.get_parameter(spec.name).value) for spec in PARAMETERS}

    def _on_set_parameters(self, parameters: list) -> SetParametersResult:
        changes = {p.name: _plain(p.value) for p in parameters if p.name in SPECS}
        reason = validate(changes, self._parameter_values())
        if reason:
            return SetParametersResult(successful=False, reason=reason)
        reload = needs_reload(changes)
        if reload and self._state in ('inactive', 'active'):
            self.get_logger().info(f'{", ".join(reload)} changed: {RELOAD_HINT}')
            self._call_soon(self._reload)
        # rclpy stores the values after this callback returns, so the worker takes the
        # validated values from here, before its next batch.
        with self._live_lock:
            self._live_changes.update({name: value for name, value in changes.items()
                                       if SPECS[name].live})
        return SetParametersResult(successful=True)

    def _call_soon(self, callback) -> None:
        """Run ``callback`` once on the executor, after the current callback returns."""
        def once() -> None:
            timer.cancel()
            self._one_shot_timers.remove(timer)
            self.destroy_timer(timer)
            callback()
        timer = self.create_timer(0.0, once)
        self._one_shot_timers.append(timer)

    def _autostart(self) -> None:
        if self.trigger_configure() == SUCCESS:
            self.trigger_activate()

    def _reload(self) -> None:
        was_active = self._state == 'active'
        if was_active:
            self.trigger_deactivate()
        self.trigger_cleanup()
        if self.trigger_configure() == SUCCESS and was_active:
            self.trigger_activate()

    # -- lifecycle ---------------------------------------------------------------------------

    def on_configure(self, state: State) -> TransitionCallbackReturn:
        """Validate the parameters and load the model."""
        values = self._parameter_values()
        try:
            self._engine, self._labels = self._build_engine(values)
        except (ValueError, FileNotFoundError, RuntimeError) as error:
            self.get_logger().error(f'configure failed: {error}')
            return FAILURE
        self._values = values
        self._stats = {topic: CameraStats(topic) for topic in values['image_topics']}
        self._smoother.configure(values['smoothing'], values['smoothing_reset_s'])
        self._smoother.reset()
        self._publish_label_info()
        self._state = 'inactive'
        self.get_logger().info(f'configured: {self._engine.describe()}, '
                               f'{len(self._labels)} classes, cameras {values["image_topics"]}')
        return SUCCESS

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        """Subscribe to the cameras and start the inference worker."""
        if self._engine is None:  # released by a deactivate
            try:
                self._engine, self._labels = self._build_engine(self._values)
            except (ValueError, FileNotFoundError, RuntimeError) as error:
                self.get_logger().error(f'activate failed: {error}')
                return FAILURE
        qos = self._subscription_qos()
        for topic in self._values['image_topics']:
            self._subscribe(topic, qos)
        self._stop.clear()
        self._frames.reopen()
        self._worker = threading.Thread(target=self._inference_loop, name='inference',
                                        daemon=True)
        self._worker.start()
        self._state = 'active'
        return super().on_activate(state)

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        """Stop inference and release the model's device memory."""
        self._stop_inference()
        self._state = 'inactive'
        return super().on_deactivate(state)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        """Forget the configuration; the parameters keep their values."""
        self._stop_inference()
        self._stats = {}
        self._values = {}
        self._state = 'unconfigured'
        return SUCCESS

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        """Stop everything before the node goes away."""
        self._stop_inference()
        self._state = 'finalized'
        return SUCCESS

    def on_error(self, state: State) -> TransitionCallbackReturn:
        """Release everything; the node returns to unconfigured."""
        self._stop_inference()
        self._state = 'unconfigured'
        return SUCCESS

    def destroy_node(self) -> None:
        """Stop the worker before the node's handles go."""
        self._stop_inference()
        super().destroy_node()

    def _build_engine(self, values: dict[str, Any]) -> tuple[InferenceEngine, list[str]]:
        settings = engine_settings(values, len(values['image_topics']))
        if values['model.checkpoint']:
            engine = InferenceEngine.from_checkpoint(values['model.checkpoint'], settings)
            return engine, choose_labels(engine.labels, values['labels'])
        config = model_config(values)
        self.get_logger().warning(
            f'model.checkpoint is empty: built {config.backbone} {config.sequence} with RANDOM '
            'weights; classifications mean nothing until model.checkpoint names a trained '
            'checkpoint')
        return InferenceEngine.from_config(config, labels=values['labels'],
                                           settings=settings), list(values['labels'])

    def _stop_inference(self) -> None:
        self._stop.set()
        # Subscriptions first: no callback can then store a frame after the drain below.
        for subscription in self._subscriptions_:
            self.destroy_subscription(subscription)
        self._subscriptions_ = []
        for topic in self._frames.close():
            if topic in self._stats:
                self._stats[topic].on_dropped_stale()  # never reached a batch
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    # -- subscriptions -----------------------------------------------------------------------

    def _subscription_qos(self) -> QoSProfile:
        reliability = (ReliabilityPolicy.RELIABLE
                       if self._values['qos.reliability'] == 'reliable'
                       else ReliabilityPolicy.BEST_EFFORT)
        return QoSProfile(depth=int(self._values['qos.depth']), reliability=reliability)

    def _subscribe(self, topic: str, qos: QoSProfile) -> None:
        message_type = CompressedImage if topic.endswith('/compressed') else Image
        events = SubscriptionEventCallbacks(
            incompatible_qos=functools.partial(self._on_incompatible_qos, topic))
        self._subscriptions_.append(self.create_subscription(
            message_type, topic, functools.partial(self._on_image, topic), qos,
            event_callbacks=events))
        for info in self.get_publishers_info_by_topic(topic):
            if (qos.reliability == ReliabilityPolicy.RELIABLE
                    and info.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT):
                self._warn_best_effort_publisher(topic)

    def _on_incompatible_qos(self, topic: str, event: Any) -> None:
        self._warn_best_effort_publisher(topic)

    def _warn_best_effort_publisher(self, topic: str) -> None:
        self.get_logger().warning(
            f'{topic}: a publisher offers QoS this subscription cannot receive (it publishes '
            'best effort, the node asks for reliable): set qos.reliability to best_effort, '
            'or make the camera publish reliable')

    def _on_image(self, topic: str, msg: Image | CompressedImage) -> None:
        stats = self._stats[topic]
        stats.on_received()
        if self._frames.put(topic, (msg, time.monotonic())):
            stats.on_dropped_stale()

    # -- inference worker --------------------------------------------------------------------

    def _inference_loop(self) -> None:
        next_batch_at = 0.0
        while not self._stop.is_set():
            wait = next_batch_at - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                break
            slots = self._frames.take_all(timeout_s=0.2)
            if not slots:
                continue
            self._apply_live_changes()
            rate = self._values['max_rate_hz']
            next_batch_at = time.monotonic() + (1.0 / rate if rate > 0 else 0.0)
            self._classify(slots)

    def _apply_live_changes(self) -> None:
        with self._live_lock:
            changes, self._live_changes = self._live_changes, {}
        if changes:
            self._values.update(changes)
            self._smoother.configure(self._values['smoothing'],
                                     self._values['smoothing_reset_s'])

    def _classify(self, slots: dict[str, tuple[Any, float]]) -> None:
        batch = []
        for topic, (msg, received_at) in slots.items():
            try:
                frame, color_order = message_to_frame(msg)
            except ImageRejected as error:
                self._reject(topic, str(error))
                continue
            batch.append((topic, msg, received_at, frame, color_order))
        if not batch:
            return
        try:
            # top_k=1: the published top-k is taken after smoothing, in _publish_result.
            results = self._engine.infer([item[3] for item in batch],
                                         color_order=[item[4] for item in batch],
                                         streams=[item[0] for item in batch], top_k=1)
        except (ValueError, RuntimeError) as error:
            for topic, *_ in batch:
                self._reject(topic, f'inference failed: {error}')
            return
        for (topic, msg, received_at, _, _), result in zip(batch, results):
            self._publish_result(topic, msg.header, received_at, result)

    def _reject(self, topic: str, reason: str) -> None:
        self._stats[topic].on_rejected(reason)
        # A new reason is logged at once; a camera repeating one is logged every 5 s.
        now = time.monotonic()
        if now - self._rejections_logged.get((topic, reason), -1e9) >= 5.0:
            self._rejections_logged[(topic, reason)] = now
            self.get_logger().warning(f'{topic}: frame rejected: {reason}')

    def _publish_result(self, topic: str, header: Any, received_at: float, result: Any) -> None:
        stamp = header.stamp.sec + header.stamp.nanosec * 1e-9
        probabilities = self._smoother.update(topic, stamp, result.probabilities)
        best = top_k(probabilities, int(self._values['top_k']), self._labels,
                     float(self._values['score_threshold']))
        node_ms = (time.monotonic() - received_at) * 1e3
        scene = scene_record(topic, (header.stamp.sec, header.stamp.nanosec), header.frame_id,
                             best, result.times, node_ms)
        self._scene_pub.publish(String(data=json.dumps(scene)))
        if Classification is not None:
            message = Classification(header=header)
            message.results = [ObjectHypothesis(class_id=label, score=score)
                               for label, score in best]
            self._classification_pub.publish(message)
        self._stats[topic].on_classified(node_ms)

    # -- outputs -----------------------------------------------------------------------------

    def _publish_label_info(self) -> None:
        if Classification is None:
            return
        message = LabelInfo()
        message.header.stamp = self.get_clock().now().to_msg()
        message.class_map = [VisionClass(class_id=index, class_name=label)
                             for index, label in enumerate(self._labels)]
        message.threshold = float(self._values['score_threshold'])
        self._label_info_pub.publish(message)

    def _publish_diagnostics(self) -> None:
        array = DiagnosticArray()
        array.header.stamp = self.get_clock().now().to_msg()
        engine = self._engine
        common = [KeyValue(key='state', value=self._state)]
        if engine is not None:
            common += [KeyValue(key='device', value=str(engine.device)),
                       KeyValue(key='precision', value=precision_name(engine.dtype)),
                       KeyValue(key='model', value=engine.describe())]
        silent_after = float(self.get_parameter('silent_after_s').value)
        name = self.get_fully_qualified_name()
        if not self._stats:
            array.status.append(DiagnosticStatus(
                level=DiagnosticStatus.OK, name=name, message=self._state, values=common))
        for topic, stats in list(self._stats.items()):
            snapshot = stats.snapshot(silent_after)
            level = snapshot.pop('level')
            message = snapshot.pop('message')
            if self._state != 'active':
                level, message = 0, self._state
            values = [KeyValue(key=key, value='' if value is None else
                               (f'{value:.2f}' if isinstance(value, float) else str(value)))
                      for key, value in snapshot.items()]
            array.status.append(DiagnosticStatus(
                level=_LEVELS[level], name=f'{name}: {topic}', message=message,
                hardware_id=str(engine.device) if engine is not None else '',
                values=values + common))
        self._diagnostics_pub.publish(array)


def main(args: list[str] | None = None) -> None:
    """Run the node until shut down: init, executor, spin, shutdown."""
    rclpy.init(args=args)
    node = PerceptionNode()
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
