"""
Real-process test harness: the node runs from its console script; this process is the camera.

DDS stays on loopback (conftest sets ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and a per-run
ROS_DOMAIN_ID) and uses the package's large shared-memory profile, as the launch file does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from cnn_rnn_perception.tools.environment.ros_env import BackgroundNode, stop_process
import cv2
from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.srv import ChangeState, GetState
import numpy as np
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import GetParameters, SetParameters
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

ROOT = Path(__file__).resolve().parents[1]
NODE_COMMAND = str(Path(sys.executable).with_name('perception_node'))
# A small model keeps start-up and inference fast; the node code paths are the same.
SMALL_MODEL = ['-p', 'compile:=false', '-p', 'model.input_size:=[64,64]',
               '-p', 'model.hidden_size:=16', '-p', 'device:=cpu']


def wait_for(predicate: Callable[[], Any], timeout_s: float = 20.0,
             what: str | Callable[[], str] = '') -> Any:
    """Poll until ``predicate`` is truthy; on time-out fail, saying ``what`` (or its result)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f'timed out after {timeout_s} s waiting for '
                         f'{what() if callable(what) else what}')


class NodeProcess:
    """The perception node as its own process, with its log captured to a file."""

    def __init__(self, tmp_path: Path, *ros_args: str, name: str = 'cnn_rnn_perception'):
        self.log_path = tmp_path / f'{name}.log'
        self._log = open(self.log_path, 'w')
        self.process = subprocess.Popen(
            [NODE_COMMAND, '--ros-args', '-r', f'__node:={name}', *ros_args],
            stdout=self._log, stderr=subprocess.STDOUT, env=os.environ.copy())

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        returncode = stop_process(self.process)
        self._log.close()
        return returncode


class Harness:
    """A camera and listener node in this process, spinning in a background thread."""

    def __init__(self, node_fqn: str = '/cnn_rnn_perception') -> None:
        self.node_fqn = node_fqn
        self.ros = BackgroundNode('test_harness')
        self.node = self.ros.node
        self._lock = threading.Lock()
        self.scenes: list[dict] = []
        self.scene_arrivals: list[float] = []  # time.monotonic() of each scene
        self.statuses: dict[str, dict] = {}
        self._get_state = self.node.create_client(GetState, f'{node_fqn}/get_state')
        self.node.create_subscription(String, f'{node_fqn}/scene', self._on_scene, 100)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 10)

    def close(self) -> None:
        self.ros.close()

    # -- listening -----------------------------------------------------------------------

    def _on_scene(self, msg: String) -> None:
        with self._lock:
            self.scenes.append(json.loads(msg.data))
            self.scene_arrivals.append(time.monotonic())

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        with self._lock:
            for status in msg.status:
                values = {kv.key: kv.value for kv in status.values}
                self.statuses[status.name] = {'level': status.level[0] if isinstance(
                    status.level, bytes) else status.level, 'message': status.message, **values}

    def scenes_for(self, topic: str) -> list[dict]:
        with self._lock:
            return [scene for scene in self.scenes if scene['topic'] == topic]

    def camera_status(self, topic: str) -> dict | None:
        with self._lock:
            return self.statuses.get(f'{self.node_fqn}: {topic}')

    def counts(self, topic: str) -> dict[str, int] | None:
        status = self.camera_status(topic)
        if status is None:
            return None
        return {key: int(status[key]) for key in
                ('received', 'classified', 'dropped_stale', 'rejected', 'pending')}

    def wait_accounted(self, topic: str, received: int, timeout_s: float = 20.0) -> dict:
        """Wait until diagnostics show ``received`` frames, all accounted for."""
        def settled():
            counts = self.counts(topic)
            return counts if counts and counts['received'] == received and \
                counts['pending'] == 0 else None
        return wait_for(settled, timeout_s, f'{received} frames accounted on {topic}: '
                                            f'last {self.counts(topic)}')

    # -- the camera --------------------------------------------------------------------------

    def camera(self, topic: str, reliable: bool = True, compressed: bool = False,
               depth: int = 10):
        qos = QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE if reliable
                         else ReliabilityPolicy.BEST_EFFORT)
        return self.node.create_publisher(CompressedImage if compressed else Image, topic, qos)

    def wait_subscribed(self, publisher, timeout_s: float = 60.0) -> None:
        wait_for(lambda: publisher.get_subscription_count() > 0, timeout_s,
                 f'the node to subscribe to {publisher.topic_name}')
        time.sleep(0.3)  # discovery is done per endpoint; give the reverse direction a moment

    # -- services ----------------------------------------------------------------------------

    def _call(self, service_type, name: str, request, timeout_s: float = 30.0):
        client = self.node.create_client(service_type, name)
        try:
            wait_for(client.service_is_ready, timeout_s, f'service {name}')
            future = client.call_async(request)
            wait_for(future.done, timeout_s, f'a reply from {name}')
            return future.result()
        finally:
            self.node.destroy_client(client)

    def set_parameter(self, name: str, value: Any):
        """Set one parameter through the node's service; return the SetParametersResult."""
        request = SetParameters.Request(parameters=[Parameter(name=name,
                                                              value=parameter_value(value))])
        return self._call(SetParameters, f'{self.node_fqn}/set_parameters', request).results[0]

    def get_parameter(self, name: str) -> Any:
        """Return one parameter's value as plain Python, read through the node's service."""
        reply = self._call(GetParameters, f'{self.node_fqn}/get_parameters',
                           GetParameters.Request(names=[name]))
        value = reply.values[0]
        return {ParameterType.PARAMETER_STRING: value.string_value,
                ParameterType.PARAMETER_BOOL: value.bool_value,
                ParameterType.PARAMETER_INTEGER: value.integer_value,
                ParameterType.PARAMETER_DOUBLE: value.double_value,
                ParameterType.PARAMETER_STRING_ARRAY: list(value.string_array_value),
                ParameterType.PARAMETER_INTEGER_ARRAY: list(value.integer_array_value),
                ParameterType.PARAMETER_DOUBLE_ARRAY: list(value.double_array_value),
                }.get(value.type)

    def timed_get_state(self, timeout_s: float = 10.0) -> tuple[str, float]:
        """Ask get_state on a long-lived client; return (state, seconds to the answer)."""
        wait_for(self._get_state.service_is_ready, 30, 'the get_state service')
        started = time.monotonic()
        future = self._get_state.call_async(GetState.Request())
        wait_for(future.done, timeout_s, 'a get_state answer')
        return future.result().current_state.label, time.monotonic() - started

    def lifecycle_state(self) -> str:
        return self._call(GetState, f'{self.node_fqn}/get_state',
                          GetState.Request()).current_state.label

    def change_state(self, transition_id: int) -> bool:
        request = ChangeState.Request()
        request.transition.id = transition_id
        return self._call(ChangeState, f'{self.node_fqn}/change_state', request).success


class Streamer:
    """A camera publishing at ``rate_hz`` in a thread, and a prober timing get_state."""

    def __init__(self, harness, camera, rate_hz: float = 20.0) -> None:
        self.harness, self.camera, self.period = harness, camera, 1.0 / rate_hz
        self.stop = threading.Event()
        self.state_seconds: list[float] = []
        self.threads = [threading.Thread(target=self._stream),
                        threading.Thread(target=self._probe)]
        for thread in self.threads:
            thread.start()

    def _stream(self) -> None:
        frame = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
        index = 0
        while not self.stop.wait(self.period):
            index += 1
            self.camera.publish(image_message(frame, 'rgb8', 1000 + index * self.period, 'cam'))

    def _probe(self) -> None:
        while not self.stop.wait(0.1):
            self.state_seconds.append(self.harness.timed_get_state()[1])

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def parameter_value(value: Any) -> ParameterValue:
    """Return ``value`` as the ParameterValue of its type (lists by their first item)."""
    if isinstance(value, bool):
        return ParameterValue(type=ParameterType.PARAMETER_BOOL, bool_value=value)
    if isinstance(value, int):
        return ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=value)
    if isinstance(value, float):
        return ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=value)
    if isinstance(value, list) and value and isinstance(value[0], int):
        return ParameterValue(type=ParameterType.PARAMETER_INTEGER_ARRAY,
                              integer_array_value=value)
    if isinstance(value, list) and value and isinstance(value[0], float):
        return ParameterValue(type=ParameterType.PARAMETER_DOUBLE_ARRAY,
                              double_array_value=value)
    if isinstance(value, list):
        return ParameterValue(type=ParameterType.PARAMETER_STRING_ARRAY,
                              string_array_value=value)
    return ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=value)


def image_message(pixels: np.ndarray, encoding: str, stamp_s: float, frame_id: str,
                  step: int | None = None, data: bytes | None = None) -> Image:
    """Build an Image; ``step`` and ``data`` override the honest values to make bad frames."""
    msg = Image(height=pixels.shape[0], width=pixels.shape[1], encoding=encoding,
                step=step if step is not None else pixels.shape[1] * pixels.strides[1],
                data=data if data is not None else pixels.tobytes())
    msg.header.stamp.sec = int(stamp_s)
    msg.header.stamp.nanosec = int(round((stamp_s % 1) * 1e9))
    msg.header.frame_id = frame_id
    return msg


def jpeg_message(pixels: np.ndarray, stamp_s: float, frame_id: str,
                 data: bytes | None = None) -> CompressedImage:
    msg = CompressedImage(format='jpeg')
    msg.data = data if data is not None else cv2.imencode('.jpg', pixels)[1].tobytes()
    msg.header.stamp.sec = int(stamp_s)
    msg.header.stamp.nanosec = int(round((stamp_s % 1) * 1e9))
    msg.header.frame_id = frame_id
    return msg
