"""
The node's parameters: every one with its default, description and range, and their checks.

The node declares exactly ``PARAMETERS`` (each with ``descriptor(spec)``); ``validate`` is what
its on-set callback asks. The ``model.*`` parameters are generated from ``ModelConfig``'s
fields, so the node, the command line and the checkpoint name a model setting alike. Pure
functions, tested without ``rclpy.init``; ``build_model`` builds the engine they describe.
"""

from __future__ import annotations

from dataclasses import dataclass
import logging
from typing import Any

from cnn_rnn_perception.core.checkpoint import default_labels
from cnn_rnn_perception.core.engine import (
    BACKENDS, create_engine, EngineSettings, inspect_model_file, is_exported,
    parse_device_name, PRECISIONS, resolve_device)
from cnn_rnn_perception.core.errors import ConfigurationError, readable_file
from cnn_rnn_perception.core.model_config import ModelConfig, user_settings
from cnn_rnn_perception.core.navigation import (
    decision_fields, DecisionSettings, load_policy, RobotDecision)
from cnn_rnn_perception.core.sample_frames import NAVIGATION_LABELS
from cnn_rnn_perception.ros.engine_slot import LoadedModel
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.exceptions import InvalidTopicNameException
from rclpy.expand_topic_name import expand_topic_name
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.validate_full_topic_name import validate_full_topic_name
from rclpy.validate_topic_name import validate_topic_name

_LOG = logging.getLogger(__name__)

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


_NODE_PARAMETERS: tuple[ParameterSpec, ...] = (
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
    ParameterSpec('labels', list(NAVIGATION_LABELS), 'Class names, used when the checkpoint '
                  'has none (and to size a model built without a checkpoint).'),
    ParameterSpec('device', 'auto', 'auto (GPU if present, else CPU), cpu, cuda or cuda:N.'),
    ParameterSpec('precision', 'auto', 'Trunk precision: auto (bf16 on GPUs that have it, '
                  'fp32 on the CPU), fp32, fp16 or bf16.', choices=PRECISIONS),
    ParameterSpec('compile', True, 'torch.compile the trunk: faster frames, a slower start.'),
    ParameterSpec('backend', 'torch', 'What runs the model: torch, onnxruntime, openvino, or '
                  'auto (times each installed one at start, and the int8 and bf16 files export '
                  'accepted beside an exported model, and keeps the fastest that agrees with '
                  'torch).', choices=BACKENDS),
    ParameterSpec('auto_rate_hz', 15.0, 'With backend auto: time each candidate at this frame '
                  "rate, the cameras' (runtimes' thread pools sleep between frames, which "
                  'changes which is fastest); 0 = back to back.', minimum=0.0, maximum=1000.0),
    ParameterSpec('max_rate_hz', 0.0, 'Most inference batches per second; 0 = as fast as '
                  'frames come. Frames in between are dropped as stale.', live=True,
                  minimum=0.0, maximum=1000.0),
    ParameterSpec('top_k', 5, 'Classes published per frame.', live=True, minimum=1,
                  maximum=1000),
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
    # The robot's decided scene and what it asks of Nav2 (core.navigation).
    ParameterSpec('navigation.policy_file', '', 'YAML file mapping each scene, unknown and '
                  'stale to a Nav2 speed limit, controller and planner (see '
                  'config/navigation_policy.yaml). Empty: ~/robot_scene only, nothing sent to '
                  'Nav2. Checked against the labels when set.', live=True),
    ParameterSpec('navigation.stale_after_s', 1.0, 'No camera classified for this long: the '
                  "decision becomes stale and the policy's stale entry is sent.", live=True,
                  minimum=0.1, maximum=60.0),
    ParameterSpec('navigation.republish_s', 1.0, 'The speed limit is sent again this often '
                  '(it is also sent at once on every decided change).', live=True, minimum=0.1,
                  maximum=60.0),
    ParameterSpec('navigation.frame_id', 'base_link', 'frame_id of ~/robot_classification '
                  "and ~/robot_scene: the robot's frame, since the fused scene is no one "
                  "camera's.", live=True),
    ParameterSpec('navigation.speed_limit_topic', 'speed_limit', 'nav2_msgs/SpeedLimit out, as '
                  "Nav2 controller_server's speed_limit_topic.", read_only=True),
    ParameterSpec('navigation.controller_selector_topic', 'controller_selector',
                  "std_msgs/String out, read by Nav2's ControllerSelector BT node.",
                  read_only=True),
    ParameterSpec('navigation.planner_selector_topic', 'planner_selector', 'std_msgs/String '
                  "out, read by Nav2's PlannerSelector BT node.", read_only=True),
    ParameterSpec('debug_image.max_rate_hz', 5.0, 'Most ~/debug_image frames a second; drawn '
                  'only while someone subscribes.', live=True, minimum=0.1, maximum=100.0),
)


def _decision_parameter(setting) -> ParameterSpec:
    """Return a DecisionSettings field as the node's parameter (live, like every one)."""
    minimum, maximum = setting.metadata['limits']
    return ParameterSpec(setting.metadata['parameter'], setting.default,
                         setting.metadata['help'], live=True, minimum=minimum, maximum=maximum)


def _model_parameter(setting) -> ParameterSpec:
    """Return a ModelConfig field as the node's ``model.<field>`` parameter (it reloads)."""
    default, meta = setting.default, setting.metadata
    minimum, maximum = meta['limits'] or (None, None)
    description = meta['help'][0].upper() + meta['help'][1:] + (
        '; used when model.checkpoint is empty.')
    return ParameterSpec(f'model.{setting.name}', list(default) if isinstance(default, tuple)
                         else default, description, minimum=minimum, maximum=maximum,
                         choices=meta['choices'])


# The model's settings after the checkpoint, the decision's beside the other navigation ones.
_MODEL_AT = 5
_DECISION_AT = [spec.name for spec in _NODE_PARAMETERS].index('navigation.stale_after_s')
PARAMETERS: tuple[ParameterSpec, ...] = (
    _NODE_PARAMETERS[:_MODEL_AT]
    + tuple(_model_parameter(setting) for setting in user_settings())
    + _NODE_PARAMETERS[_MODEL_AT:_DECISION_AT]
    + tuple(_decision_parameter(setting) for setting in decision_fields())
    + _NODE_PARAMETERS[_DECISION_AT:])

SPECS = {spec.name: spec for spec in PARAMETERS}
RELOAD_HINT = ('it needs a new engine; the node builds it in the background while the '
               'current one keeps classifying, then switches')


def _check_value(spec: ParameterSpec, value: Any) -> str | None:
    if spec.choices and value not in spec.choices:
        return f'{spec.name} must be one of {", ".join(spec.choices)}; got {value!r}'
    if spec.minimum is not None and not spec.minimum <= value <= spec.maximum:
        return f'{spec.name} must be in [{spec.minimum}, {spec.maximum}]; got {value}'
    if spec.name == 'image_topics':
        if not value:
            return 'image_topics must be a non-empty list of topic names; got []'
        for topic in value:
            problem = topic_name_problem(topic)
            if problem:
                return f'image_topics: {topic!r} is not a valid topic name: {problem}'
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
    try:
        if spec.name == 'model.checkpoint' and value:
            readable_file(value, 'model.checkpoint')
            inspect_model_file(value)
        if spec.name == 'model.trunk_weights' and value:
            readable_file(value, 'model.trunk_weights')
    except ConfigurationError as error:
        reason = str(error)
        return reason if reason.startswith(spec.name) else f'{spec.name}: {reason}'
    return None


def topic_name_problem(topic: str) -> str | None:
    """
    Return why rclpy would refuse ``topic`` as a subscription's name, or None.

    rclpy's own checks, before and after expansion (``~`` and ``{node}`` expand against any
    valid node name alike), so a name is refused when it is set, not when it is subscribed.
    """
    try:
        validate_topic_name(topic)
        validate_full_topic_name(expand_topic_name(topic, 'node', '/'))
    except (InvalidTopicNameException, ValueError) as error:
        # The first line says what; rcl appends its source location, and the rest is a caret.
        first = str(error).splitlines()[0].split(', at /')[0]
        return first.removeprefix('Invalid topic name: ').rstrip(':')
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


def policy_problem(path: str, labels: list[str]) -> str | None:
    """Return why a policy file cannot be used with these labels, or None."""
    if not path:
        return None
    try:
        load_policy(path, labels)
    except ConfigurationError as error:
        return f'navigation.policy_file: {error}'
    return None


def decision_settings(values: dict[str, Any]) -> DecisionSettings:
    """Return the DecisionSettings the node's parameters describe."""
    return DecisionSettings(**{setting.name: values[setting.metadata['parameter']]
                               for setting in decision_fields()})


def configure_decision(robot: RobotDecision, values: dict[str, Any]) -> None:
    """Apply the decision parameters and navigation.stale_after_s to a robot's decision."""
    robot.configure(decision_settings(values),
                    stale_after_s=values['navigation.stale_after_s'])


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


def descriptor(spec: ParameterSpec) -> ParameterDescriptor:
    """Return the ROS descriptor of a parameter: description, range, choices, read-only."""
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


def compiles(values: dict[str, Any]) -> bool:
    """
    Return whether a second, compiled build follows the first (eager) one.

    For torch, and for auto: its first choice is measured against eager torch so that frames
    are served within a second; the second measures compiled torch, which is often fastest.
    An exported file never runs on torch, so auto over one chooses once.
    """
    return bool(values['compile']) and (
        values['backend'] == 'torch'
        or values['backend'] == 'auto' and not is_exported(values['model.checkpoint']))


def model_config(values: dict[str, Any]) -> ModelConfig:
    """Build the ModelConfig the model.* parameters describe (no checkpoint)."""
    return ModelConfig(num_classes=len(values['labels']),
                       **{setting.name: values[f'model.{setting.name}']
                          for setting in user_settings()})


def model_parameters(config: ModelConfig) -> dict[str, Any]:
    """Return the model.* parameter values that describe ``config``: model_config's inverse."""
    return {f'model.{setting.name}': (list(value) if isinstance(value, tuple) else value)
            for setting in user_settings()
            for value in [getattr(config, setting.name)]}


def engine_settings(values: dict[str, Any], camera_count: int, *,
                    compiled: bool) -> EngineSettings:
    """
    Build the engine settings from parameters: one batch holds one frame per camera.

    A temporal model keeps a state row for every camera, so the table never has fewer rows
    than the node has cameras (a batch never needs to split, and no camera evicts another).
    """
    return EngineSettings(device=values['device'], precision=values['precision'],
                          compile_trunk=compiled, max_batch=max(camera_count, 1),
                          backend=values['backend'], auto_rate_hz=values['auto_rate_hz'],
                          reset_after_s=values['temporal.reset_after_s'],
                          max_streams=max(EngineSettings.max_streams, camera_count))


def labels_for(values: dict[str, Any]) -> list[str]:
    """Return the labels the node publishes: the checkpoint's (read from its header) or ours."""
    checkpoint = values['model.checkpoint']
    if checkpoint:
        return choose_labels(inspect_model_file(checkpoint).labels, values['labels'])
    return list(values['labels'])


def choose_labels(checkpoint_labels: list[str], parameter_labels: list[str]) -> list[str]:
    """Use the ``labels`` parameter only where the checkpoint has placeholder names."""
    if (checkpoint_labels == default_labels(len(checkpoint_labels))
            and len(parameter_labels) == len(checkpoint_labels)):
        return list(parameter_labels)
    return list(checkpoint_labels)


def plain(value: Any) -> Any:
    """Return a parameter value as plain Python: arrays as lists."""
    return list(value) if not isinstance(value, (str, bytes, bool, int, float)) else value


def subscription_qos(values: dict[str, Any]) -> QoSProfile:
    """Return the QoS the qos.* parameters ask of every camera subscription."""
    reliability = (ReliabilityPolicy.RELIABLE if values['qos.reliability'] == 'reliable'
                   else ReliabilityPolicy.BEST_EFFORT)
    return QoSProfile(depth=int(values['qos.depth']), reliability=reliability)


def build_model(values: dict[str, Any], compiled: bool, on_worker: Any = None, *,
                choices: dict | None = None, beside_running: bool = False) -> LoadedModel:
    """
    Build and warm up the engine the parameters describe (in the EngineSlot's builder).

    ``on_worker`` runs a task in the inference worker's thread between batches: a GPU engine
    captures its CUDA graphs there, where they will run, with nothing else on the device
    meanwhile (a capture beside a running batch fails or is wrong). Backend auto times its
    candidates there too, unless an engine is serving (``beside_running``): then it times them
    here, so that engine never stops classifying, and ``choices`` (kept by the node) spares
    the timing for files and settings already measured.
    """
    cameras = len(values['image_topics'])
    settings = engine_settings(values, cameras, compiled=compiled)
    checkpoint = values['model.checkpoint'] or None
    config = None if checkpoint else model_config(values)
    if config is not None and not compiled:
        _LOG.warning(f'model.checkpoint is empty: built {config.backbone} {config.sequence} '
                     'with RANDOM weights; classifications mean nothing until model.checkpoint '
                     'names a trained checkpoint')
    engine = create_engine(checkpoint, settings, config=config, labels=values['labels'],
                           on_worker=on_worker, choices=choices,
                           timing_on=(lambda task: task()) if beside_running else None)
    labels = choose_labels(engine.labels, values['labels'])
    try:
        # Every batch the worker can form (one frame per camera at most) is compiled here,
        # so nothing compiles in the inference thread.
        engine.warmup(batch_sizes=range(2, cameras + 1))
    except BaseException:
        engine.close()
        raise
    return LoadedModel(engine=engine, labels=labels, values=values, compiled=compiled)


def parameter_table() -> str:
    """
    Return every parameter as the Markdown table docs/node-and-parameters.md shows.

    The docs hold this table between markers and a test compares them, so the page cannot
    drift from the descriptors ``ros2 param describe`` prints.
    """
    def shown(value: Any) -> str:
        text = repr(value) if isinstance(value, str) else str(value).lower() \
            if isinstance(value, bool) else str(value)
        return f'`{text}`'

    rows = ['| parameter | default | range | changes | what it does |', '|---|---|---|---|---|']
    for spec in PARAMETERS:
        if spec.choices:
            limits = ', '.join(spec.choices)
        elif spec.minimum is not None:
            limits = f'{spec.minimum:g} to {spec.maximum:g}'
        else:
            limits = ''
        changes = 'read-only' if spec.read_only else 'live' if spec.live else 'reload'
        rows.append(f'| `{spec.name}` | {shown(spec.default)} | {limits} | {changes} | '
                    f'{spec.description.replace("|", "/")} |')
    return '\n'.join(rows)
