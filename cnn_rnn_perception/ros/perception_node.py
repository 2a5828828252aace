"""
The perception node: the rclpy adapter over the engine.

A ``LifecycleNode``: configure validates the parameters (and reads the checkpoint's header),
activate starts building the engine in the background, subscribes and starts the inference
worker, deactivate stops it and releases the device. No callback on the executor does slow
work, so lifecycle and parameter services always answer: engines are built (loaded, compiled,
warmed up) by an ``EngineSlot`` off the executor thread and swapped in whole, and a model change
keeps the running engine classifying until its replacement is ready, or for good if it fails.

Image callbacks only store the newest frame of each camera; one supervised worker thread takes
the newest frame of every camera and runs them as one batch, so there is never a backlog.
Every per-frame output carries the source image's header.

After each batch the cameras' results are fused into the robot's scene and decided on
(``core.navigation``); a decided change, and staleness found by a steady-clock timer, send what
the scene policy asks of Nav2 (a speed limit, a controller, a planner).
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import signal
import threading
import time
from typing import Any, Callable

from cnn_rnn_perception.core.engine import create_engine, inspect_model_file
from cnn_rnn_perception.core.image_conversion import (
    annotated_bgr, ImageRejected, message_to_frame)
from cnn_rnn_perception.core.navigation import load_policy, RobotDecision, ScenePolicy, STALE
from cnn_rnn_perception.core.postprocess import ProbabilitySmoother, top_k
from cnn_rnn_perception.ros.cameras import (
    CameraStats, LatestFrames, RateLimitedLog, run_supervised, stuck_after_s)
from cnn_rnn_perception.ros.engine_slot import EngineSlot, LoadedModel
from cnn_rnn_perception.ros.outputs import (
    Classification, classification_message, debug_image_message, debug_lines,
    diagnostic_status, label_info_message, LabelInfo, NAV2_MSGS, robot_scene_record,
    scene_record, speed_limit_message, SpeedLimit, stamp_now, VISION_MSGS)
from cnn_rnn_perception.ros.parameters import (
    choose_labels, compiles, configure_decision, descriptor, engine_settings, model_config,
    needs_reload, PARAMETERS, policy_problem, RELOAD_HINT, RESUBSCRIBE, SPECS, validate,
    validate_startup)
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
import rclpy
from rclpy.clock import Clock, ClockType
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, State, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from rclpy.time import Time
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, String

try:  # Iron and later
    from rclpy.event_handler import SubscriptionEventCallbacks
except ImportError:  # Humble
    from rclpy.qos_event import SubscriptionEventCallbacks

SUCCESS = TransitionCallbackReturn.SUCCESS
FAILURE = TransitionCallbackReturn.FAILURE
# Nav2's conventions: controller_server subscribes to the speed limit reliable and volatile
# (depth 10, as Nav2's own SpeedFilter publishes it); the BT selector nodes ask for reliable,
# transient local, so a tree started later still gets the choice.
SPEED_LIMIT_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.VOLATILE)
SELECTOR_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.TRANSIENT_LOCAL)
NAVIGATION_TICK_S = 0.05


def _seconds(stamp: Any) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


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
        """Declare parameters and outputs; the model loads on activate."""
        super().__init__(node_name, **kwargs)
        for spec in PARAMETERS:
            self.declare_parameter(spec.name, spec.default, descriptor(spec))
        self.add_on_set_parameters_callback(self._on_set_parameters)
        core_logger = logging.getLogger('cnn_rnn_perception')
        core_logger.setLevel(logging.INFO)
        core_logger.propagate = False
        core_logger.handlers = [_RosLogHandler(self.get_logger())]

        # /diagnostics reports in every state, so it is a plain publisher; the outputs are
        # lifecycle publishers, made in on_configure and publishing only while active.
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self._outputs: dict[str, Any] = {}
        if not VISION_MSGS:
            self.get_logger().info('vision_msgs is not installed: ~/classification, '
                                   '~/robot_classification and ~/label_info are off; ~/scene and '
                                   '~/robot_scene carry every result')
        if not NAV2_MSGS:
            self.get_logger().info('nav2_msgs is not installed: the speed limit output is off; '
                                   'the controller and planner selectors stay on')
        self._state = 'unconfigured'
        self._values: dict[str, Any] = {}
        # The parameters of the engine built last (running, or still being built): a reload
        # parameter set back while its build runs differs from these, not from what runs.
        self._target: dict[str, Any] = {}
        self._labels: list[str] = []
        self._stats: dict[str, CameraStats] = {}
        self._subscriptions_: list = []
        self._subscribed_as: tuple | None = None
        self._frames = LatestFrames()
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        self._busy_since: float | None = None
        self._worker_errors = 0
        self._worker_restarts = 0
        self._smoother = ProbabilitySmoother()
        # The robot's decided scene and what it asks of Nav2. The send lock keeps a decided
        # change and the timer's staleness in order: what Nav2 gets last is what holds.
        self._robot = RobotDecision()
        self._policy: ScenePolicy | None = None
        self._policy_checked: tuple[str, list[str]] = ('', [])
        self._send_lock = threading.Lock()
        self._speed_limit_sent_at = 0.0
        self._debug_image_at = 0.0
        self._debug_turn = 0
        self._live_lock = threading.Lock()
        self._live_changes: dict[str, Any] = {}
        self._rejection_log = RateLimitedLog(period_s=5.0)
        # What went wrong last, for /diagnostics: (level, message), or None when all is well.
        self._problem: tuple[int, str] | None = None
        self._slot = EngineSlot(self._build_model, on_ready=self._on_model_ready,
                                on_failed=self._on_model_failed)
        # Work handed to the executor thread from other threads (the engine builder) or from
        # a parameter callback (which must return before rclpy stores the new values).
        self._pending: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wakeup = self.create_guard_condition(self._run_pending)
        # A steady clock: diagnostics keep coming under use_sim_time with no /clock (a bag
        # replayed without --clock), which is exactly when an operator needs them.
        self._diagnostics_timer = self.create_timer(
            1.0, self._publish_diagnostics, clock=Clock(clock_type=ClockType.STEADY_TIME))
        # Staleness must be found within navigation.stale_after_s + 0.2 s, on any clock.
        self._navigation_timer = self.create_timer(
            NAVIGATION_TICK_S, self._navigation_tick,
            clock=Clock(clock_type=ClockType.STEADY_TIME))
        if self.get_parameter('autostart').value:
            self._post(self._autostart)

    # -- work for the executor thread --------------------------------------------------------

    def _post(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the executor thread soon; safe to call from any thread."""
        self._pending.put(callback)
        self._wakeup.trigger()

    def _run_pending(self) -> None:
        while True:
            try:
                callback = self._pending.get_nowait()
            except queue.Empty:
                return
            callback()

    # -- parameters --------------------------------------------------------------------------

    def _parameter_values(self) -> dict[str, Any]:
        return {spec.name: _plain(self.get_parameter(spec.name).value) for spec in PARAMETERS}

    def _on_set_parameters(self, parameters: list) -> SetParametersResult:
        changes = {p.name: _plain(p.value) for p in parameters if p.name in SPECS}
        reason = validate(changes, self._parameter_values())
        if not reason and changes.get('navigation.policy_file') and self._state != 'unconfigured':
            reason = policy_problem(changes['navigation.policy_file'], self._labels)
        if reason:
            return SetParametersResult(successful=False, reason=reason)
        if any(name.startswith('navigation.') or name == 'score_threshold' for name in changes):
            self._post(self._configure_navigation)
        reload = needs_reload(changes, self._target) if self._target else []
        if reload and self._state in ('inactive', 'active'):
            self.get_logger().info(f'{", ".join(reload)} changed: {RELOAD_HINT}')
            self._post(self._apply_reload)
        # rclpy stores the values after this callback returns, so the worker takes the
        # validated values from here, before its next batch.
        with self._live_lock:
            self._live_changes.update({name: value for name, value in changes.items()
                                       if SPECS[name].live})
        return SetParametersResult(successful=True)

    def _autostart(self) -> None:
        if self.trigger_configure() == SUCCESS:
            self.trigger_activate()

    def _apply_reload(self) -> None:
        """Take the stored reload parameters: a new engine while active, else at activate."""
        values = self._parameter_values()
        if not needs_reload(values, self._target):
            return
        self._target = values
        if self._state == 'active':
            self._slot.build(values, compiled=compiles(values))
        elif self._state == 'inactive':
            self._adopt_values(values)

    def _adopt_values(self, values: dict[str, Any]) -> None:
        """Make ``values`` the configuration: labels, cameras and subscriptions follow."""
        with self._live_lock:  # the worker merges live changes into the same dict
            self._values = {**self._values, **values}
        self._labels = self._labels_for(self._values)
        for topic in self._values['image_topics']:
            self._stats.setdefault(topic, CameraStats(topic))
        if self._state == 'active':
            self._subscribe_all()
        for topic in set(self._stats) - set(self._values['image_topics']):
            del self._stats[topic]
            self._robot.fusion.forget(topic)
        self._publish_label_info()
        self._configure_navigation()

    @staticmethod
    def _labels_for(values: dict[str, Any]) -> list[str]:
        checkpoint = values['model.checkpoint']
        if checkpoint:
            return choose_labels(inspect_model_file(checkpoint).labels, values['labels'])
        return list(values['labels'])

    # -- lifecycle ---------------------------------------------------------------------------

    def on_configure(self, state: State) -> TransitionCallbackReturn:
        """Validate every parameter and read the checkpoint's header; no model loads yet."""
        values = self._parameter_values()
        reason = validate_startup(values) or policy_problem(
            values['navigation.policy_file'], self._labels_for(values))
        if reason:
            self._problem = (2, f'configure failed: {reason}')
            self.get_logger().error(f'configure failed: {reason}')
            return FAILURE
        self._problem = None
        self._values = {}
        self._stats = {}
        self._smoother.configure(values['smoothing'], values['smoothing_reset_s'])
        self._smoother.reset()
        self._create_outputs()
        self._state = 'inactive'
        self._adopt_values(values)
        self._target = values
        self.get_logger().info(f'configured: {len(self._labels)} classes, cameras '
                               f'{values["image_topics"]}')
        return SUCCESS

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        """Start building the engine and the worker; cameras are subscribed once it serves."""
        # Subscribing only when an engine is in service means a camera's first frames are
        # classified, not overwritten while the model loads. The parameters as they are now:
        # a reload whose build a deactivate abandoned is built here.
        values = self._parameter_values()
        self._robot = RobotDecision(now=time.monotonic())  # unknown until a scene has dwelt
        self._adopt_values(values)
        self._target = values
        self._slot.build(values, compiled=compiles(values))
        self._state = 'active'
        self._start_worker()
        result = super().on_activate(state)  # activates the output publishers
        self._publish_label_info()
        self._send_decision(changed=True)  # Nav2 hears "unknown" from the start
        return result

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        """Stop inference, send the stale policy, and release the model's device memory."""
        self._stop_inference()
        self._fail_safe('the node was deactivated')
        self._state = 'inactive'
        return super().on_deactivate(state)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        """Forget the configuration; the parameters keep their values."""
        self._stop_inference()
        self._destroy_outputs()
        self._stats = {}
        self._values = {}
        self._target = {}
        self._state = 'unconfigured'
        return SUCCESS

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        """Stop everything before the node goes away; Nav2 hears stale first."""
        self._stop_inference()
        self._fail_safe('the node is shutting down')
        self._state = 'finalized'
        return SUCCESS

    def on_error(self, state: State) -> TransitionCallbackReturn:
        """Release everything; the node returns to unconfigured."""
        self._stop_inference()
        self._state = 'unconfigured'
        return SUCCESS

    def _create_outputs(self) -> None:
        self._outputs = {'scene': self.create_lifecycle_publisher(String, '~/scene', 10)}
        if VISION_MSGS:
            self._outputs['classification'] = self.create_lifecycle_publisher(
                Classification, '~/classification', 10)
            # Transient local, as vision_msgs asks: a consumer that starts later gets it.
            self._outputs['label_info'] = self.create_lifecycle_publisher(
                LabelInfo, '~/label_info',
                QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                           durability=DurabilityPolicy.TRANSIENT_LOCAL))
            self._outputs['robot_classification'] = self.create_lifecycle_publisher(
                Classification, '~/robot_classification', 10)
        self._outputs['robot_scene'] = self.create_lifecycle_publisher(
            String, '~/robot_scene', 10)
        self._outputs['debug_image'] = self.create_lifecycle_publisher(
            Image, '~/debug_image', 1)
        topic = self.get_parameter
        if NAV2_MSGS:
            self._outputs['speed_limit'] = self.create_lifecycle_publisher(
                SpeedLimit, topic('navigation.speed_limit_topic').value, SPEED_LIMIT_QOS)
        for key in ('controller', 'planner'):
            self._outputs[f'{key}_selector'] = self.create_lifecycle_publisher(
                String, topic(f'navigation.{key}_selector_topic').value, SELECTOR_QOS)

    def _destroy_outputs(self) -> None:
        for publisher in self._outputs.values():
            self.destroy_lifecycle_publisher(publisher)
        self._outputs = {}

    def destroy_node(self) -> None:
        """Stop the worker and any engine build, say so in /diagnostics, then go."""
        self._stop_inference()
        if self._state == 'active':  # Ctrl-C or SIGTERM with no lifecycle transition first
            self._fail_safe('the node is shutting down')
        # A build thread still inside torch when the interpreter exits aborts the process
        # ("terminate called without an active exception"): let it finish; its engine is
        # thrown away. An eager build takes about a second; a compile can take longer.
        if not self._slot.wait_idle(timeout_s=60.0):
            self.get_logger().error('an engine build did not finish within 60 s of shutdown')
        self._state = 'finalized'
        if self.context.ok():  # the last word, for whoever watches /diagnostics
            self._publish_diagnostics()
            # The process ends right after: give reliable readers a moment to have it.
            self._diagnostics_pub.wait_for_all_acked(Duration(seconds=1.0))
        super().destroy_node()

    # -- engines: built off the executor, adopted on it --------------------------------------

    def _build_model(self, values: dict[str, Any], compiled: bool) -> LoadedModel:
        """Build and warm up an engine (runs in the EngineSlot's builder thread)."""
        cameras = len(values['image_topics'])
        settings = engine_settings(values, cameras, compiled=compiled)
        checkpoint = values['model.checkpoint'] or None
        config = None if checkpoint else model_config(values)
        if config is not None and not compiled:
            self.get_logger().warning(
                f'model.checkpoint is empty: built {config.backbone} {config.sequence} with '
                'RANDOM weights; classifications mean nothing until model.checkpoint names a '
                'trained checkpoint')
        # backend auto times the backends, and a GPU engine captures its CUDA graphs, in the
        # inference worker's thread between batches: where they will run, with nothing else
        # on the device meanwhile (a capture beside a running batch fails or is wrong).
        engine = create_engine(checkpoint, settings, config=config, labels=values['labels'],
                               on_worker=self._slot.on_worker)
        labels = choose_labels(engine.labels, values['labels'])
        try:
            # Every batch the worker can form (one frame per camera at most) is compiled here,
            # so nothing compiles in the inference thread.
            engine.warmup(batch_sizes=range(2, cameras + 1))
        except BaseException:
            engine.close()
            raise
        return LoadedModel(engine=engine, labels=labels, values=values, compiled=compiled)

    def _on_model_ready(self, model: LoadedModel) -> None:
        self._post(functools.partial(self._adopt_model, model))

    def _on_model_failed(self, values: dict[str, Any], error: BaseException) -> None:
        self._post(functools.partial(self._model_failed, values, error))

    def _adopt_model(self, model: LoadedModel) -> None:
        if self._state not in ('inactive', 'active') or self._slot.current is not model:
            return
        if not model.compiled:
            self._smoother.reset()  # probabilities of another model are no history for this
        self._problem = None
        # Only what needs an engine: live values set during the build are newer than the
        # build's snapshot of them, and stay.
        self._adopt_values({name: value for name, value in model.values.items()
                            if name in SPECS and not SPECS[name].live})
        choice = getattr(model.engine, 'backend_choice', None)
        self.get_logger().info(f'classifying with {model.engine.describe()}'
                               + (f' ({choice.summary()})' if choice is not None else ''))

    def _model_failed(self, values: dict[str, Any], error: BaseException) -> None:
        running = self._slot.current
        if running is None:
            self._problem = (2, f'model failed to load: {error}')
            self.get_logger().error(f'model failed to load: {error}')
            return
        changed = needs_reload(values, running.values)
        self._problem = (1, f'reload failed, still running the previous model: {error}')
        self.get_logger().error(
            f'reload failed ({error}); still classifying with {running.engine.describe()}; '
            f'{", ".join(changed)} set back to the running values')
        # Set back what the running engine was built from; the on-set callback sees values
        # equal to the target and schedules nothing.
        self._target = dict(running.values)
        self.set_parameters([Parameter(name, value=running.values[name]) for name in changed])

    # -- subscriptions -----------------------------------------------------------------------

    def _subscribe_all(self) -> None:
        """Subscribe as the configuration says; nothing happens when that is unchanged."""
        wanted = tuple(_plain(self._values[name]) if name != 'image_topics'
                       else tuple(self._values[name]) for name in RESUBSCRIBE)
        if wanted == self._subscribed_as:
            return
        self._unsubscribe_all()
        qos = self._subscription_qos()
        for topic in self._values['image_topics']:
            self._subscribe(topic, qos)
        self._subscribed_as = wanted

    def _unsubscribe_all(self) -> None:
        # Subscriptions first: no callback can then store a frame after the drain below.
        for subscription in self._subscriptions_:
            self.destroy_subscription(subscription)
        self._subscriptions_ = []
        self._subscribed_as = None
        for topic in self._frames.drain():
            if topic in self._stats:
                self._stats[topic].on_dropped_stale()  # never reached a batch

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
        stats = self._stats.get(topic)
        if stats is None:  # a message in flight while the topic was unsubscribed
            return
        stats.on_received()
        if self._frames.put(topic, (msg, time.monotonic())):
            stats.on_dropped_stale()

    # -- the supervised inference worker -----------------------------------------------------

    def _start_worker(self) -> None:
        self._stop.clear()
        self._frames.reopen()
        self._worker = threading.Thread(target=self._inference_loop, name='inference',
                                        daemon=True)
        self._worker.start()

    def _stop_inference(self) -> None:
        self._stop.set()
        self._unsubscribe_all()
        self._frames.close()
        if self._worker is not None:
            self._worker.join(timeout=5.0)
            if self._worker.is_alive():
                self.get_logger().error('the inference worker did not stop within 5 s (a '
                                        'batch is stuck); it is abandoned')
            self._worker = None
        self._busy_since = None
        # A batch stuck past the join above must not hang the lifecycle services here.
        self._slot.release(timeout_s=1.0)

    def _supervise(self) -> None:
        """Restart a worker that died; runs with diagnostics, on the executor."""
        if self._state != 'active' or (self._worker is not None and self._worker.is_alive()):
            return
        self._worker_restarts += 1
        self.get_logger().error('the inference worker had stopped; restarted it '
                                f'(restart {self._worker_restarts})')
        self._start_worker()

    def _inference_loop(self) -> None:
        next_batch_at = 0.0
        self._slot.worker_serves = True
        try:
            self._serve_frames(next_batch_at)
        finally:
            self._slot.worker_serves = False
            self._slot.serve_tasks()  # a builder waiting on this thread must not hang

    def _serve_frames(self, next_batch_at: float) -> None:
        while not self._stop.is_set():
            self._slot.serve_tasks()
            wait = next_batch_at - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                break
            if self._slot.current is None:
                # The engine is still being built: frames wait in their slots (a newer
                # frame replaces an older one, counted as stale).
                self._stop.wait(0.05)
                continue
            slots = self._frames.take_all(timeout_s=0.2)
            if not slots:
                continue
            self._apply_live_changes()
            rate = self._values['max_rate_hz']
            next_batch_at = time.monotonic() + (1.0 / rate if rate > 0 else 0.0)
            self._busy_since = time.monotonic()
            try:
                error = run_supervised(functools.partial(self._classify, slots), slots,
                                       self._reject)
            finally:
                self._busy_since = None
            if error is not None:
                self._worker_errors += 1
                self.get_logger().error(f'inference batch failed ({type(error).__name__}: '
                                        f'{error}); the worker goes on with the next frames')

    def _apply_live_changes(self) -> None:
        with self._live_lock:
            changes, self._live_changes = self._live_changes, {}
            if changes:
                self._values = {**self._values, **changes}
        if changes:
            self._smoother.configure(self._values['smoothing'],
                                     self._values['smoothing_reset_s'])

    def _classify(self, slots: dict[str, tuple[Any, float]], handled: set[str]) -> None:
        batch = []
        for topic, (msg, received_at) in slots.items():
            try:
                frame, color_order = message_to_frame(msg)
            except ImageRejected as error:
                self._reject(topic, str(error))
                handled.add(topic)
                continue
            batch.append((topic, msg, received_at, frame, color_order))
        if not batch:
            return
        with self._slot.borrow() as model:
            if model is None:  # released between the check and here (a deactivate)
                for topic, *_ in batch:
                    self._stats[topic].on_dropped_stale()
                    handled.add(topic)
                return
            try:
                # A live change applies from this batch on, whichever engine is serving.
                model.engine.streams.set_reset_after(self._values['temporal.reset_after_s'])
                # Probabilities only: what is published is ranked once, after smoothing.
                results = model.engine.infer(
                    [item[3] for item in batch], color_order=[item[4] for item in batch],
                    streams=[item[0] for item in batch],
                    stamps=[_seconds(item[1].header.stamp) for item in batch])
            except (ValueError, RuntimeError) as error:
                for topic, *_ in batch:
                    self._reject(topic, f'inference failed: {error}')
                    handled.add(topic)
                return
            labels = model.labels
        estimates = []
        debug_turn = self._debug_turn % len(batch)
        for position, ((topic, msg, received_at, frame, order), result) in enumerate(
                zip(batch, results)):
            estimate, best, node_ms = self._publish_result(topic, msg.header, received_at,
                                                           result, labels)
            handled.add(topic)
            estimates.append((topic, _seconds(msg.header.stamp), estimate))
            if position == debug_turn:
                self._maybe_debug_image(topic, msg.header, frame, order, best, node_ms)
        self._decide(estimates, labels)

    def _reject(self, topic: str, reason: str) -> None:
        self._stats[topic].on_rejected(reason)
        # A new reason is logged at once; a camera repeating one is logged every 5 s.
        if self._rejection_log.should_log(topic, reason):
            self.get_logger().warning(f'{topic}: frame rejected: {reason}')

    def _publish_result(self, topic: str, header: Any, received_at: float, result: Any,
                        labels: list[str]) -> tuple[Any, list[tuple[str, float]], float]:
        estimate, best = self._smoother.rank(topic, _seconds(header.stamp),
                                             result.probabilities, int(self._values['top_k']),
                                             labels, float(self._values['score_threshold']))
        node_ms = (time.monotonic() - received_at) * 1e3
        scene = scene_record(topic, (header.stamp.sec, header.stamp.nanosec), header.frame_id,
                             best, result.times, node_ms)
        self._outputs['scene'].publish(String(data=json.dumps(scene)))
        if VISION_MSGS:
            self._outputs['classification'].publish(
                classification_message(header, best, labels))
        self._stats[topic].on_classified(node_ms)
        return estimate, best, node_ms

    # -- the robot's decision and what it asks of Nav2 --------------------------------------

    def _decide(self, estimates: list, labels: list[str]) -> None:
        """Fuse a batch's cameras into the robot's scene, decide, and send what changed."""
        with self._send_lock:
            changed = self._robot.add(estimates, labels, time.monotonic())
            label, reason, since_s, scene = self._robot.snapshot()
            if changed:
                self.get_logger().info(f'decided scene: {label} ({reason})')
                self._send_decision(changed=True)
        if scene is None:
            return
        best = top_k(scene.probabilities, int(self._values['top_k']), labels,
                     float(self._values['score_threshold']))
        record = robot_scene_record(scene, best, label, reason, since_s)
        self._outputs['robot_scene'].publish(String(data=json.dumps(record)))
        if VISION_MSGS:
            header = Header(stamp=Time(seconds=scene.stamp_s).to_msg())
            self._outputs['robot_classification'].publish(
                classification_message(header, best, labels))

    def _send_decision(self, changed: bool) -> None:
        """
        Send what the policy asks for the decided state.

        The speed limit every time (a timer also re-sends it); the controller and planner
        only when the decision changed.
        """
        policy, label = self._policy, self._robot.decision.label
        if policy is None or self._state != 'active':
            return
        entry = policy.entry(label)
        if 'speed_limit' in self._outputs and policy.uses('speed_limit'):
            self._outputs['speed_limit'].publish(speed_limit_message(entry, self._stamp()))
            self._speed_limit_sent_at = time.monotonic()
        for key in ('controller', 'planner') if changed else ():
            name = getattr(entry, key)
            if name is not None:
                self._outputs[f'{key}_selector'].publish(String(data=name))

    def _fail_safe(self, reason: str) -> None:
        """Make the decision stale and send the policy's stale entry, delivered if possible."""
        if self._state != 'active':
            return
        with self._send_lock:
            self._robot.force_stale(reason)
            self._send_decision(changed=True)
        # The publishers go inactive (or away) right after this: let reliable readers have it.
        for key in ('speed_limit', 'controller_selector', 'planner_selector'):
            if key in self._outputs:
                self._outputs[key].wait_for_all_acked(Duration(seconds=0.5))

    def _navigation_tick(self) -> None:
        """Find staleness in time and re-send the speed limit; on the steady clock."""
        if self._state != 'active':
            return
        now = time.monotonic()
        with self._send_lock:
            if self._robot.check_stale(now):
                self.get_logger().warning(
                    f'decided scene: {STALE} ({self._robot.decision.reason})')
                self._send_decision(changed=True)
            elif (now - self._speed_limit_sent_at
                  >= self.get_parameter('navigation.republish_s').value):
                self._send_decision(changed=False)

    def _configure_navigation(self) -> None:
        """Apply the navigation parameters; a new policy file is sent at once."""
        values = self._parameter_values()
        configure_decision(self._robot, values)
        path = values['navigation.policy_file']
        # A new checkpoint may bring other labels: the same file is checked against them.
        if (path, self._labels) == self._policy_checked:
            return
        self._policy_checked = (path, list(self._labels))
        try:
            self._policy = load_policy(path, self._labels) if path else None
        except ValueError as error:  # the labels changed under it (a new checkpoint)
            self._policy = None
            self._problem = (1, f'navigation.policy_file no longer applies: {error}')
            self.get_logger().error(f'{error}; nothing is sent to Nav2 until it is fixed')
            return
        if path:
            self.get_logger().info(f'scene policy {path}: ' + '; '.join(
                f'{state}: {entry.describe()}' for state, entry in self._policy.entries.items()))
        with self._send_lock:
            self._send_decision(changed=True)

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
        label = self._robot.decision.label
        picture = annotated_bgr(frame, order, debug_lines(topic, best, label, node_ms))
        publisher.publish(debug_image_message(picture, header))

    # -- outputs -----------------------------------------------------------------------------

    def _stamp(self):
        return Time(nanoseconds=stamp_now(self.get_clock().now().nanoseconds,
                                          time.time_ns())).to_msg()

    def _publish_label_info(self) -> None:
        if VISION_MSGS and self._state == 'active':
            self._outputs['label_info'].publish(label_info_message(
                self._labels, self._values['score_threshold'], self._stamp()))

    def _node_problem(self) -> tuple[int, str] | None:
        """Return what is wrong with the node as a whole, worst first, or None."""
        busy_since = self._busy_since
        silent_after = float(self._values.get('silent_after_s', 2.0))
        if self._state == 'active' and busy_since is not None:
            busy_for = time.monotonic() - busy_since
            if busy_for > stuck_after_s(silent_after):
                return 2, f'inference stuck in one batch for {busy_for:.0f} s'
        if self._state == 'active' and self._slot.current is None and self._problem is None:
            return 1, f'model {self._slot.status}'
        return self._problem

    def _publish_diagnostics(self) -> None:
        self._supervise()
        array = DiagnosticArray()
        array.header.stamp = self._stamp()
        model = self._slot.current
        common = {'state': self._state, 'engine': self._slot.status,
                  'worker_errors': self._worker_errors, 'worker_restarts': self._worker_restarts}
        if model is not None:
            choice = getattr(model.engine, 'backend_choice', None)
            if choice is not None:
                common['backend_choice'] = choice.summary()
            common.update(device=str(model.engine.device),
                          precision=model.engine.precision,
                          model=model.engine.describe())
        problem = self._node_problem()
        silent_after = float(self.get_parameter('silent_after_s').value)
        rate = float(self.get_parameter('max_rate_hz').value)
        stalled_after = silent_after + (1.0 / rate if rate > 0 else 0.0)
        name = self.get_fully_qualified_name()
        hardware_id = str(model.engine.device) if model is not None else ''
        memory = model.engine.stream_status() if model is not None else {}
        if not self._stats:
            level, message = problem or (0, self._state)
            array.status.append(diagnostic_status(name, level, message, hardware_id, common))
        for topic, stats in list(self._stats.items()):
            snapshot = stats.snapshot(silent_after, stalled_after,
                                      cause=problem[1] if problem else '')
            level = snapshot.pop('level')
            message = snapshot.pop('message')
            if self._state != 'active':
                level, message = problem or (0, self._state)
            elif problem is not None and problem[0] > level:
                level, message = problem
            if topic in memory:  # a temporal model: how much of this camera it remembers
                snapshot.update(state_age_s=memory[topic].age_s,
                                state_frames=memory[topic].frames,
                                state_started_by=memory[topic].reason)
            array.status.append(diagnostic_status(f'{name}: {topic}', level, message,
                                                  hardware_id, {**snapshot, **common}))
        if self._state == 'active':
            array.status.append(self._decision_status(f'{name}: robot scene', hardware_id))
        self._diagnostics_pub.publish(array)

    def _decision_status(self, name: str, hardware_id: str):
        """Return the robot's decision for /diagnostics: its state, why, and what Nav2 gets."""
        label, reason, _, scene = self._robot.snapshot()
        policy = self._policy
        values = {'decision': label, 'reason': reason,
                  'cameras': ' '.join(scene.cameras) if scene is not None else '',
                  'policy_file': policy.source if policy is not None else '',
                  'speed_limit_output': ('on' if NAV2_MSGS else 'off: nav2_msgs is not '
                                         'installed') if policy is not None else 'no policy'}
        if policy is not None:
            values['policy_entry'] = policy.entry(label).describe()
        level = 1 if label == STALE else 0
        return diagnostic_status(name, level, f'decision {label}: {reason}', hardware_id, values)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop_on_signals() -> threading.Event:
    """
    Return an event that SIGINT and SIGTERM set, however often they come.

    rclpy's own handlers shut the context down at the first signal, before the node could
    publish its last diagnostics, and a second Ctrl-C (the terminal's and the one ``ros2
    launch`` forwards arrive together) raised KeyboardInterrupt in the middle of
    ``destroy_node``. Here a signal only asks the spin loop to stop.
    """
    stop = threading.Event()
    for number in STOP_SIGNALS:
        signal.signal(number, lambda *_: stop.set())
    return stop


def main(args: list[str] | None = None) -> None:
    """Run the node until Ctrl-C or SIGTERM: init, executor, spin, shutdown."""
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = _stop_on_signals()
    node = PerceptionNode()
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        while not stop.is_set():
            executor.spin_once(timeout_sec=0.1)
    except ExternalShutdownException:
        pass
    finally:
        # From here on a signal could only cut the shutdown short; and while the interpreter
        # exits, Python puts back the default (fatal) handlers of those it caught: ignore them.
        for number in STOP_SIGNALS:
            signal.signal(number, signal.SIG_IGN)
        node.destroy_node()
        rclpy.try_shutdown()
