"""
The perception node: the rclpy adapter over the engine.

A ``LifecycleNode``: configure validates the parameters (and reads the checkpoint's header),
activate starts building the engine in the background, subscribes and starts the inference
worker, deactivate stops it and releases the device. No callback on the executor does slow
work, so lifecycle and parameter services always answer: engines are built (loaded, compiled,
warmed up) by an ``EngineSlot`` off the executor thread and swapped in whole, and a model change
keeps the running engine classifying until its replacement is ready, or for good if it fails.

Image callbacks only store the newest frame of each camera; the ``InferenceWorker``
(``ros.worker``) takes the newest frame of every camera and hands them here as one batch, so
there is never a backlog. Every per-frame output carries the source image's header.

After each batch the cameras' results go to the ``NavigationLink`` (``ros.navigation_link``),
which fuses them into the robot's scene, decides, and sends what the scene policy asks of Nav2;
a steady-clock timer finds staleness. Messages and statuses are built in ``ros.outputs``.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
import traceback
from typing import Any, Callable

from cnn_rnn_perception.core.image_conversion import ImageRejected, message_to_frame
from cnn_rnn_perception.core.postprocess import ProbabilitySmoother
from cnn_rnn_perception.ros.cameras import CameraRoster, LatestFrames, RateLimitedLog
from cnn_rnn_perception.ros.engine_slot import EngineSlot, LoadedModel
from cnn_rnn_perception.ros.navigation_link import NavigationLink
from cnn_rnn_perception.ros.outputs import (
    camera_statuses, decision_status, engine_values, label_info_message, NAV2_MSGS,
    node_problem, Problem, stalled_after_s, stamp_now, stamp_seconds, VISION_MSGS)
from cnn_rnn_perception.ros.parameters import (
    build_model, compiles, descriptor, labels_for, needs_reload, PARAMETERS, plain,
    policy_problem, RELOAD_HINT, SPECS, validate, validate_startup)
from cnn_rnn_perception.ros.publishers import create_outputs, destroy_outputs
from cnn_rnn_perception.ros.results import ResultPublisher
from cnn_rnn_perception.ros.runtime import forward_core_logs, ignore_stop_signals, stop_on_signals
from cnn_rnn_perception.ros.subscriptions import CameraSubscriptions
from cnn_rnn_perception.ros.worker import InferenceWorker, stuck_after_s
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
import rclpy
from rclpy.clock import Clock, ClockType
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, State, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.signals import SignalHandlerOptions
from rclpy.time import Time

SUCCESS = TransitionCallbackReturn.SUCCESS
FAILURE = TransitionCallbackReturn.FAILURE
NAVIGATION_TICK_S = 0.05


class PerceptionNode(LifecycleNode):
    """Classifies camera topics with the CNN-RNN scene model."""

    def __init__(self, node_name: str = 'cnn_rnn_perception', **kwargs: Any) -> None:
        """Declare parameters and outputs; the model loads on activate."""
        super().__init__(node_name, **kwargs)
        for spec in PARAMETERS:
            self.declare_parameter(spec.name, spec.default, descriptor(spec))
        self.add_on_set_parameters_callback(self._on_set_parameters)
        forward_core_logs(self.get_logger())

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
        self._frames = LatestFrames()
        self._roster = CameraRoster(self._frames)
        self._cameras = CameraSubscriptions(self, self._frames, self._roster.get)
        self._smoother = ProbabilitySmoother()
        self._navigation = NavigationLink(stamp=self._stamp)
        self._results = ResultPublisher(self._roster, self._smoother, self._navigation)
        self._live_lock = threading.Lock()
        self._live_changes: dict[str, Any] = {}
        self._rejection_log = RateLimitedLog(period_s=5.0)
        self._problem: Problem | None = None  # what went wrong last, for /diagnostics
        # Backend auto's measurements by model file and settings: a reload of files already
        # measured builds the choice without timing every candidate again.
        self._backend_choices: dict[tuple, Any] = {}
        self._slot = EngineSlot(self._build_model, on_ready=self._on_model_ready,
                                on_failed=self._on_model_failed)
        self._worker = InferenceWorker(
            self._frames, self._slot, self._classify, self._reject,
            before_batch=self._apply_live_changes, min_interval_s=self._batch_interval_s)
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
            NAVIGATION_TICK_S,
            lambda: self._navigation.tick(self.get_parameter('navigation.republish_s').value),
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
            try:
                callback()
            except Exception as error:  # noqa: B902 - the executor thread must not die of it
                self._report_error(f'{getattr(callback, "__name__", "work")} failed', error)

    def _report_error(self, what: str, error: BaseException) -> None:
        """Say an unexpected error at ERROR, with its traceback, and in /diagnostics."""
        self._problem = (2, f'{what}: {type(error).__name__}: {error}')
        self.get_logger().error(f'{what}: {type(error).__name__}: {error}\n'
                                + ''.join(traceback.format_exception(error)))

    # -- parameters --------------------------------------------------------------------------

    def _parameter_values(self) -> dict[str, Any]:
        return {spec.name: plain(self.get_parameter(spec.name).value) for spec in PARAMETERS}

    def _on_set_parameters(self, parameters: list) -> SetParametersResult:
        try:
            return self._check_parameters(parameters)
        except Exception as error:  # noqa: B902 - a check that raised must not kill the node
            self.get_logger().error(f'a parameter check raised {type(error).__name__}: '
                                    f'{error}; the set is refused\n'
                                    + ''.join(traceback.format_exception(error)))
            return SetParametersResult(successful=False, reason=(
                f'could not be checked ({type(error).__name__}: {error}); nothing changed'))

    def _check_parameters(self, parameters: list) -> SetParametersResult:
        changes = {p.name: plain(p.value) for p in parameters if p.name in SPECS}
        reason = validate(changes, self._parameter_values())
        if not reason and changes.get('navigation.policy_file') and self._state != 'unconfigured':
            reason = policy_problem(changes['navigation.policy_file'], self._labels)
        if reason:
            return SetParametersResult(successful=False, reason=reason)
        if any(name.startswith('navigation.') or name == 'score_threshold' for name in changes):
            self._post(self._configure_navigation)
        if 'score_threshold' in changes:  # LabelInfo carries it, for late subscribers too
            self._post(self._publish_label_info)
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
        self._labels = labels_for(self._values)
        self._roster.set_topics(self._values['image_topics'])
        if self._state == 'active':
            self._cameras.subscribe(self._values)
        if not self._worker.running:  # else the worker retires them, between batches
            self._retire_cameras()
        self._publish_label_info()
        self._configure_navigation()

    def _retire_cameras(self) -> None:
        for final in self._roster.retire():
            self._navigation.robot.fusion.forget(final['topic'])
            self.get_logger().info(
                f'{final["topic"]}: no longer a camera; of its {final["received"]} frames '
                f'{final["classified"]} were classified, {final["dropped_stale"]} dropped as '
                f'stale, {final["rejected"]} rejected')

    # -- lifecycle ---------------------------------------------------------------------------

    def on_configure(self, state: State) -> TransitionCallbackReturn:
        """Validate every parameter and read the checkpoint's header; no model loads yet."""
        try:
            return self._configure()
        except Exception as error:  # noqa: B902 - the transition fails, saying why
            self._report_error('configure failed', error)
            return FAILURE

    def _configure(self) -> TransitionCallbackReturn:
        values = self._parameter_values()
        reason = validate_startup(values) or policy_problem(
            values['navigation.policy_file'], labels_for(values))
        if reason:
            self._problem = (2, f'configure failed: {reason}')
            self.get_logger().error(f'configure failed: {reason}')
            return FAILURE
        self._problem = None
        self._values = {}
        self._roster.clear()
        self._smoother.configure(values['smoothing'], values['smoothing_reset_s'])
        self._smoother.reset()
        self._outputs = create_outputs(self, values)
        self._state = 'inactive'
        self._adopt_values(values)
        self._target = values
        self.get_logger().info(f'configured: {len(self._labels)} classes, cameras '
                               f'{values["image_topics"]}')
        return SUCCESS

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        """Start building the engine and the worker; cameras are subscribed once it serves."""
        try:
            return self._activate(state)
        except Exception as error:  # noqa: B902 - the transition fails, saying why
            self._stop_inference()
            self._state = 'inactive'
            self._report_error('activate failed', error)
            return FAILURE

    def _activate(self, state: State) -> TransitionCallbackReturn:
        # Subscribing only when an engine is in service means a camera's first frames are
        # classified, not overwritten while the model loads. The parameters as they are now:
        # a reload whose build a deactivate abandoned is built here.
        values = self._parameter_values()
        self._adopt_values(values)
        self._target = values
        self._slot.build(values, compiled=compiles(values))
        self._state = 'active'
        self._worker.start()
        result = super().on_activate(state)  # activates the output publishers
        self._publish_label_info()
        self._navigation.start_sending(self._outputs)  # unknown until a scene has dwelt
        return result

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        """Stop inference, send the stale policy, and release the model's device memory."""
        self._stop_inference()
        self._navigation.stop_sending('the node was deactivated')
        self._state = 'inactive'
        return super().on_deactivate(state)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        """Forget the configuration; the parameters keep their values."""
        self._stop_inference()
        destroy_outputs(self, self._outputs)
        self._outputs = {}
        self._roster.clear()
        self._values = {}
        self._target = {}
        self._state = 'unconfigured'
        return SUCCESS

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        """Stop everything before the node goes away; Nav2 hears stale first."""
        self._stop_inference()
        self._navigation.stop_sending('the node is shutting down')
        self._state = 'finalized'
        return SUCCESS

    def on_error(self, state: State) -> TransitionCallbackReturn:
        """Release everything; the node returns to unconfigured."""
        self._stop_inference()
        self._state = 'unconfigured'
        return SUCCESS

    def destroy_node(self) -> None:
        """Stop the worker and any engine build, say so in /diagnostics, then go."""
        self._stop_inference()
        # Ctrl-C or SIGTERM with no lifecycle transition first: Nav2 hears stale.
        self._navigation.stop_sending('the node is shutting down')
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
        """Build for the slot; backend auto times its candidates beside a serving engine."""
        return build_model(values, compiled, on_worker=self._slot.on_worker,
                           choices=self._backend_choices,
                           beside_running=self._slot.current is not None)

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

    # -- the inference worker's batches -----------------------------------------------------

    def _stop_inference(self) -> None:
        self._cameras.unsubscribe()
        self._worker.stop()
        # A batch stuck past the worker's join must not hang the lifecycle services here.
        self._slot.release(timeout_s=1.0)

    def _batch_interval_s(self) -> float:
        rate = self._values['max_rate_hz']
        return 1.0 / rate if rate > 0 else 0.0

    def _apply_live_changes(self) -> None:
        """Between the worker's batches: take the live values, retire removed cameras."""
        if self._roster.retiring:
            self._retire_cameras()
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
                return self._drop_as_stale(batch, handled)
            try:
                # A live change applies from this batch on, whichever engine is serving.
                model.engine.streams.set_reset_after(self._values['temporal.reset_after_s'])
                # Probabilities only: what is published is ranked once, after smoothing.
                results = model.engine.infer(
                    [item[3] for item in batch], color_order=[item[4] for item in batch],
                    streams=[item[0] for item in batch],
                    stamps=[stamp_seconds(item[1].header.stamp) for item in batch])
            except (ValueError, RuntimeError) as error:
                for topic, *_ in batch:
                    self._reject(topic, f'inference failed: {error}')
                    handled.add(topic)
                return
            labels = model.labels
        with self._worker.publishing() as allowed:
            if not allowed:  # a worker given up on while this batch was stuck
                return self._drop_as_stale(batch, handled)
            self._results.publish(self._outputs, self._values, batch, results, labels, handled)

    def _drop_as_stale(self, batch: list, handled: set[str]) -> None:
        for topic, *_ in batch:
            self._roster.on_dropped_stale(topic)
            handled.add(topic)

    def _reject(self, topic: str, reason: str) -> None:
        self._roster.on_rejected(topic, reason)
        # A new reason is logged at once; a camera repeating one is logged every 5 s.
        if self._rejection_log.should_log(topic, reason):
            self.get_logger().warning(f'{topic}: frame rejected: {reason}')

    def _configure_navigation(self) -> None:
        problem = self._navigation.configure(self._parameter_values(), self._labels)
        if problem:
            self._problem = (1, problem)

    # -- outputs -----------------------------------------------------------------------------

    def _stamp(self):
        return Time(nanoseconds=stamp_now(self.get_clock().now().nanoseconds,
                                          time.time_ns())).to_msg()

    def _publish_label_info(self) -> None:
        if VISION_MSGS and self._state == 'active':
            # The parameter, not the worker's copy: a live change is published before the
            # worker's next batch takes it.
            self._outputs['label_info'].publish(label_info_message(
                self._labels, self.get_parameter('score_threshold').value, self._stamp()))

    def _publish_diagnostics(self) -> None:
        self._worker.supervise()
        model = self._slot.current
        common = {'state': self._state, 'engine': self._slot.status,
                  'worker_errors': self._worker.errors,
                  'worker_restarts': self._worker.restarts,
                  **engine_values(model.engine if model is not None else None)}
        silent_after = float(self.get_parameter('silent_after_s').value)
        active = self._state == 'active'
        problem = node_problem(active, self._worker.busy_for(), stuck_after_s(silent_after),
                               self._slot.status, model is not None, self._problem)
        stalled_after = stalled_after_s(silent_after, self.get_parameter('max_rate_hz').value)
        snapshots = {topic: stats.snapshot(silent_after, stalled_after,
                                           cause=problem[1] if problem else '')
                     for topic, stats in self._roster.items()}
        name = self.get_fully_qualified_name()
        hardware_id = str(model.engine.device) if model is not None else ''
        array = DiagnosticArray()
        array.header.stamp = self._stamp()
        array.status = camera_statuses(
            name, self._state, problem, snapshots,
            model.engine.stream_status() if model is not None else {}, hardware_id, common)
        if active:
            array.status.append(decision_status(
                f'{name}: robot scene', hardware_id, self._navigation.robot.snapshot(),
                self._navigation.policy, NAV2_MSGS))
        self._diagnostics_pub.publish(array)


def main(args: list[str] | None = None) -> None:
    """Run the node until Ctrl-C or SIGTERM: init, executor, spin, shutdown."""
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = stop_on_signals()
    node = PerceptionNode()
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        while not stop.is_set():
            executor.spin_once(timeout_sec=0.1)
    except ExternalShutdownException:
        pass
    finally:
        ignore_stop_signals()
        node.destroy_node()
        rclpy.try_shutdown()
