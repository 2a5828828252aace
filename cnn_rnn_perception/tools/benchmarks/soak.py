"""
A long run of the node under change: ``bench-node --soak MINUTES``.

Two cameras stream into ``perception_node`` (its own process, as a robot starts it) while, by
turns, ``image_topics`` swaps the second camera for a third and back, and a model parameter
changes so that a new engine is built beside the running one. At the end it reports what a
robot would notice over hours: the node's memory growth, worker restarts, frames received but
unaccounted for (every frame must be classified, dropped as stale or rejected, on the cameras
present at the end and on those retired on the way), and the longest gap in the first
camera's results, the dark time a reload costs. DDS stays on loopback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import re
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Sequence

from cnn_rnn_perception.core.sample_frames import camera_frame
from cnn_rnn_perception.tools.environment.ros_env import (
    BackgroundNode, stop_process, use_loopback_dds)
from cnn_rnn_perception.tools.report import render_table
import numpy as np
import psutil
from tqdm import tqdm

NODE = '/cnn_rnn_perception'
CAMERAS = [f'/soak/camera_{index}/image_raw' for index in range(3)]
# The node's line for a camera it retired (ros.perception_node._retire_cameras).
RETIRED = re.compile(r'(\S+): no longer a camera; of its (\d+) frames (\d+) were classified, '
                     r'(\d+) dropped as stale, (\d+) rejected')


class _SoakProbe:
    """The cameras, a results listener, /diagnostics and a parameter client, in this process."""

    def __init__(self, frame_size: tuple[int, int]) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from rcl_interfaces.srv import SetParameters
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import Image
        from std_msgs.msg import String

        self.ros = BackgroundNode('soak_probe')
        node = self.ros.node
        self.clock = node.get_clock()
        height, width = frame_size
        self.cameras = []
        for index, topic in enumerate(CAMERAS):
            pixels = camera_frame(height, width, seed=index)[:, :, ::-1]
            message = Image(height=height, width=width, encoding='rgb8', step=width * 3,
                            data=np.ascontiguousarray(pixels).tobytes())
            message.header.frame_id = f'camera_{index}'
            self.cameras.append((node.create_publisher(Image, topic, qos_profile_sensor_data),
                                 message))
        self.lock = threading.Lock()
        self.first_camera_results: list[float] = []  # time.monotonic() of each
        self.results = 0
        self.diagnostics: dict[str, dict[str, str]] = {}
        node.create_subscription(String, f'{NODE}/scene', self._on_scene, 100)
        node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 10)
        self._set = node.create_client(SetParameters, f'{NODE}/set_parameters')

    def _on_scene(self, message) -> None:
        topic = json.loads(message.data)['topic']
        with self.lock:
            self.results += 1
            if topic == CAMERAS[0]:
                self.first_camera_results.append(time.monotonic())

    def _on_diagnostics(self, message) -> None:
        with self.lock:
            for status in message.status:
                self.diagnostics[status.name] = {
                    'message': status.message, **{kv.key: kv.value for kv in status.values}}

    def publish(self) -> None:
        stamp = self.clock.now().to_msg()
        for publisher, message in self.cameras:
            message.header.stamp = stamp
            publisher.publish(message)

    def subscribed(self, topics: Sequence[str]) -> bool:
        return all(publisher.get_subscription_count() > 0
                   for (publisher, _), topic in zip(self.cameras, CAMERAS) if topic in topics)

    def set_parameter(self, name: str, value: Any, timeout_s: float = 30.0) -> tuple[bool, str]:
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        if not self._set.wait_for_service(timeout_sec=timeout_s):
            return False, 'the set_parameters service did not answer'
        future = self._set.call_async(SetParameters.Request(
            parameters=[Parameter(name, value=value).to_parameter_msg()]))
        deadline = time.monotonic() + timeout_s
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not future.done():
            return False, f'no answer within {timeout_s:g} s'
        result = future.result().results[0]
        return result.successful, result.reason

    def counts(self, topic: str) -> dict[str, int] | None:
        with self.lock:
            status = self.diagnostics.get(f'{NODE}: {topic}')
        if status is None or 'received' not in status:
            return None
        return {key: int(status[key]) for key in
                ('received', 'classified', 'dropped_stale', 'rejected', 'pending')}

    def worker_value(self, key: str) -> int:
        with self.lock:
            values = [int(status[key]) for status in self.diagnostics.values() if key in status]
        return max(values, default=0)

    def close(self) -> None:
        self.ros.close()


def _changes(hidden_size: int) -> list[tuple[str, Any]]:
    """Return the changes made in turn: a camera swapped, a model rebuilt, and back."""
    return [('image_topics', [CAMERAS[0], CAMERAS[2]]),
            ('model.hidden_size', hidden_size + 8),
            ('image_topics', [CAMERAS[0], CAMERAS[1]]),
            ('model.hidden_size', hidden_size)]


def _retired_counts(log_text: str) -> dict[str, int]:
    totals = dict.fromkeys(('received', 'classified', 'dropped_stale', 'rejected'), 0)
    for match in RETIRED.finditer(log_text):
        for key, value in zip(totals, match.groups()[1:]):
            totals[key] += int(value)
    return totals


def run_soak(minutes: float, *, rate_hz: float = 15.0, change_every_s: float = 20.0,
             frame_size: tuple[int, int] = (240, 320), node_args: Sequence[str] = (),
             hidden_size: int = 256, startup_timeout_s: float = 180.0,
             progress: bool = True) -> dict[str, Any]:
    """Run the node for ``minutes`` under camera and model changes; return what it measured."""
    domain = use_loopback_dds()
    topics = CAMERAS[:2]
    log = tempfile.NamedTemporaryFile('w+', prefix='perception_node_soak_', suffix='.log',
                                      delete=False)
    command = [str(Path(sys.executable).with_name('perception_node')), '--ros-args',
               '-p', f'image_topics:={json.dumps(topics)}', *node_args,
               '-p', f'model.hidden_size:={hidden_size}']
    node = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    probe = _SoakProbe(frame_size)
    refused: list[str] = []
    rss: list[tuple[float, float]] = []  # (seconds into the run, MB)
    sent = 0
    try:
        deadline = time.monotonic() + startup_timeout_s
        # Both cameras' results first: the first camera's gaps are measured from there.
        while not (probe.subscribed(topics) and probe.first_camera_results
                   and probe.results > len(probe.first_camera_results)):
            if node.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f'the node did not classify within {startup_timeout_s:g} s; '
                                   f'its log ({log.name}):\n{log.read()[-2000:]}')
            probe.publish()
            time.sleep(0.2)
        process = psutil.Process(node.pid)
        changes = _changes(hidden_size)
        started = time.monotonic()
        ticks = int(minutes * 60 * rate_hz)
        next_change = change_every_s
        made = 0
        change_times: list[float] = []
        for tick in tqdm(range(ticks), desc=f'soak, {minutes:g} min', unit='frame',
                         unit_scale=1 / rate_hz, disable=not progress, leave=False):
            at = tick / rate_hz
            if node.poll() is not None:
                raise RuntimeError(f'the node exited with {node.returncode} after {at:.0f} s')
            probe.publish()
            sent += 1
            if at >= next_change:
                name, value = changes[made % len(changes)]
                change_times.append(time.monotonic())
                accepted, reason = probe.set_parameter(name, value)
                if not accepted:
                    refused.append(f'{name}={value}: {reason}')
                made += 1
                next_change += change_every_s
            if tick % int(10 * rate_hz) == 0:
                rss.append((at, process.memory_info().rss / 2**20))
            delay = started + (tick + 1) / rate_hz - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        rss.append((ticks / rate_hz, process.memory_info().rss / 2**20))
        time.sleep(3.0)  # the last frames through, and a diagnostics period
        swaps = (made + 1) // 2  # changes alternate: a camera swap first, then a model
        final_topics = [CAMERAS[0], CAMERAS[2 if swaps % 2 else 1]]
        present = {}
        settle = time.monotonic() + 20.0
        while time.monotonic() < settle:
            present = {topic: probe.counts(topic) for topic in final_topics}
            if all(counts and counts['pending'] == 0 for counts in present.values()):
                break
            time.sleep(0.5)
        restarts, errors = probe.worker_value('worker_restarts'), probe.worker_value(
            'worker_errors')
        with probe.lock:
            arrivals = list(probe.first_camera_results)
            results = probe.results
    finally:
        probe.close()
        stop_process(node)
        log.close()
    log_text = Path(log.name).read_text()
    retired = _retired_counts(log_text)
    totals = dict(retired)
    for counts in present.values():
        for key in totals:
            totals[key] += (counts or {}).get(key, 0)
    unaccounted = totals['received'] - totals['classified'] - totals['dropped_stale'] - \
        totals['rejected']
    # RSS swings by a model's size at every rebuild (two engines live during a swap), so
    # medians: the second fifth of the run (allocators and caches have settled after the
    # first) against the last fifth.
    run_s = minutes * 60
    baseline = float(np.median([mb for at, mb in rss if run_s / 5 <= at <= 2 * run_s / 5]
                               or [rss[0][1]]))
    final = float(np.median([mb for at, mb in rss if at >= 4 * run_s / 5] or [rss[-1][1]]))
    # Only the measured stretch: from the first result of the loop on.
    arrivals = [at for at in arrivals if at >= started]
    gaps = np.diff(arrivals) if len(arrivals) > 1 else np.zeros(1)
    longest = np.argsort(gaps)[::-1][:5]
    # Each long gap with where it began in the run and how long after the last change.
    worst = [{'at_s': round(arrivals[i] - started, 1), 'gap_s': round(float(gaps[i]), 2),
              'after_change_s': round(min((arrivals[i] - at for at in change_times
                                           if at <= arrivals[i]), default=-1.0), 1)}
             for i in longest if len(arrivals) > 1]
    report = {
        'domain_id': domain, 'minutes': minutes, 'rate_hz': rate_hz,
        'change_every_s': change_every_s, 'changes_made': made, 'changes_refused': refused,
        'frames_sent_per_camera': sent, 'results': results, 'frames': totals,
        'frames_unaccounted': unaccounted, 'retired_cameras': len(RETIRED.findall(log_text)),
        'worker_restarts': restarts, 'worker_errors': errors,
        'rss_mb': [round(mb, 1) for _, mb in rss], 'rss_baseline_mb': baseline,
        'rss_final_mb': final, 'rss_growth_percent': 100.0 * (final - baseline) / baseline,
        'longest_gap_s': float(gaps.max()), 'longest_gaps': worst, 'node_log': log.name,
        'node_args': list(node_args), 'frame_size': list(frame_size),
    }
    report['passed'] = (unaccounted == 0 and restarts == 0 and not refused
                        and report['rss_growth_percent'] < 5.0)
    return report


def format_soak(report: dict[str, Any]) -> str:
    """Render the soak's figures as the README quotes them."""
    frames = report['frames']
    rows = [
        ('run', f'{report["minutes"]:g} min, 2 cameras at {report["rate_hz"]:g} Hz, a change '
                f'every {report["change_every_s"]:g} s ({report["changes_made"]} made, '
                f'{len(report["changes_refused"])} refused)'),
        ('frames received by the node', str(frames['received'])),
        ('classified / dropped stale / rejected',
         f'{frames["classified"]} / {frames["dropped_stale"]} / {frames["rejected"]}'),
        ('unaccounted', str(report['frames_unaccounted'])),
        ('cameras retired on the way', str(report['retired_cameras'])),
        ('worker restarts / batch errors',
         f'{report["worker_restarts"]} / {report["worker_errors"]}'),
        ('node RSS MB, median of the 2nd fifth -> of the last',
         f'{report["rss_baseline_mb"]:.0f} -> {report["rss_final_mb"]:.0f} '
         f'({report["rss_growth_percent"]:+.1f}%)'),
        ("longest gap in the first camera's results", f'{report["longest_gap_s"]:.2f} s'),
        ('verdict', 'PASS' if report['passed'] else 'FAIL (goal: RSS growth under 5%, no '
                                                    'frame unaccounted, no restart)'),
    ]
    lines = render_table(('soak', 'measured'), rows)
    return '\n'.join(lines + [f'refused: {reason}' for reason in report['changes_refused']])
