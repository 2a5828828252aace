"""
End-to-end latency of the running node: camera publish to ``~/scene`` receipt.

The node runs as its own process, started from its console script as a robot starts it. This
process publishes camera frames stamped with the send time and listens to ``~/scene``; each
scene also carries the engine's own stage times for that batch, so the node's overhead
(end-to-end minus engine) comes from the same frames. DDS stays on loopback.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import subprocess
import sys
import tempfile
import threading
import time
from typing import Sequence

from cnn_rnn_perception.core.sample_frames import camera_frame
from cnn_rnn_perception.tools import options
from cnn_rnn_perception.tools.environment.ros_env import (
    BackgroundNode, stop_process, use_loopback_dds)
from cnn_rnn_perception.tools.report import render_table, write_json
import numpy as np
import psutil
from tqdm import tqdm


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {'p50': None, 'p95': None, 'p99': None}
    array = np.array(values)
    return {f'p{q}': float(np.percentile(array, q)) for q in (50, 95, 99)}


class _Probe:
    """Camera publishers and a scene listener in this process."""

    def __init__(self, topics: list[str], frame_size: tuple[int, int], node_fqn: str) -> None:
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import Image
        from std_msgs.msg import String

        self.ros = BackgroundNode('latency_probe')
        self.node = self.ros.node
        self.clock = self.node.get_clock()
        height, width = frame_size
        self.messages = []
        for index, topic in enumerate(topics):
            pixels = camera_frame(height, width, seed=index)[:, :, ::-1]  # rgb8
            message = Image(height=height, width=width, encoding='rgb8', step=width * 3,
                            data=np.ascontiguousarray(pixels).tobytes())
            message.header.frame_id = f'camera_{index}'
            # Camera drivers publish best effort (sensor-data QoS); so does this probe.
            self.messages.append((self.node.create_publisher(
                Image, topic, qos_profile_sensor_data), message))
        self.lock = threading.Lock()
        self.records: list[tuple[float, float, float]] = []  # (received, e2e ms, engine ms)
        self.recording = False
        self.node.create_subscription(String, f'{node_fqn}/scene', self._on_scene, 100)

    def _on_scene(self, message) -> None:
        now = self.clock.now().nanoseconds * 1e-9
        scene = json.loads(message.data)
        stamp = scene['stamp']['sec'] + scene['stamp']['nanosec'] * 1e-9
        stages = scene['latency_ms']
        engine_ms = stages['preprocess'] + stages['forward'] + stages['postprocess']
        with self.lock:
            if self.recording:
                self.records.append((now, (now - stamp) * 1e3, engine_ms))

    def subscribed(self) -> bool:
        return all(publisher.get_subscription_count() > 0 for publisher, _ in self.messages)

    def publish_all(self) -> None:
        stamp = self.clock.now().to_msg()
        for publisher, message in self.messages:
            message.header.stamp = stamp
            publisher.publish(message)

    def close(self) -> None:
        self.ros.close()


def measure(cameras: int, rate_hz: float, *, duration_s: float, warmup_s: float,
            frame_size: tuple[int, int], node_args: Sequence[str], startup_timeout_s: float,
            progress: bool) -> dict[str, object]:
    """Run one node process at one load; return latencies, overhead, drift and memory."""
    topics = [f'/bench/camera_{index}/image_raw' for index in range(cameras)]
    command = [str(Path(sys.executable).with_name('perception_node')), '--ros-args',
               '-p', f'image_topics:={topics}', *node_args]
    log = tempfile.NamedTemporaryFile('w+', prefix='perception_node_', suffix='.log',
                                      delete=False)
    node = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    probe = _Probe(topics, frame_size, '/cnn_rnn_perception')
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not probe.subscribed():
            if node.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f'the node did not subscribe within {startup_timeout_s} s; '
                                   f'its log ({log.name}):\n{log.read()[-2000:]}')
            time.sleep(0.1)
        period = 1.0 / rate_hz
        rss = {}
        started = time.monotonic()
        ticks = int((warmup_s + duration_s) * rate_hz)
        bar = tqdm(range(ticks), desc=f'{cameras} camera(s) at {rate_hz:g} Hz', leave=False,
                   disable=not progress)
        for tick in bar:
            if tick == int(warmup_s * rate_hz):
                with probe.lock:
                    probe.recording = True
                rss['first'] = psutil.Process(node.pid).memory_info().rss
            probe.publish_all()
            delay = started + (tick + 1) * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        rss['last'] = psutil.Process(node.pid).memory_info().rss
        time.sleep(1.0)  # let the last frames through
        with probe.lock:
            probe.recording = False
            records = list(probe.records)
    finally:
        probe.close()
        stop_process(node)
        log.close()
    sent = int(duration_s * rate_hz) * cameras
    e2e = [record[1] for record in records]
    engine = [record[2] for record in records]
    third = max(len(e2e) // 3, 1)
    summary = {
        'cameras': cameras, 'rate_hz': rate_hz, 'sent': sent, 'classified': len(records),
        'e2e_ms': _percentiles(e2e), 'engine_ms': _percentiles(engine),
        'first_third_p50_ms': float(np.median(e2e[:third])) if e2e else None,
        'last_third_p50_ms': float(np.median(e2e[-third:])) if e2e else None,
        'node_rss_first_mb': rss['first'] / 2**20, 'node_rss_last_mb': rss['last'] / 2**20,
    }
    if e2e:
        summary['overhead_p50_ms'] = summary['e2e_ms']['p50'] - summary['engine_ms']['p50']
    os.unlink(log.name)
    return summary


def run_node_benchmark(*, cameras: Sequence[int], rates_hz: Sequence[float],
                       duration_s: float, warmup_s: float = 3.0,
                       frame_size: tuple[int, int] = (480, 640),
                       node_args: Sequence[str] = (), startup_timeout_s: float = 180.0,
                       progress: bool = True) -> dict[str, object]:
    """Measure every (cameras, rate) pair, each against a fresh node process."""
    domain = use_loopback_dds()
    rows = [measure(count, rate, duration_s=duration_s, warmup_s=warmup_s,
                    frame_size=frame_size, node_args=node_args,
                    startup_timeout_s=startup_timeout_s, progress=progress)
            for count in cameras for rate in rates_hz]
    return {'domain_id': domain, 'frame_size': list(frame_size), 'duration_s': duration_s,
            'node_args': list(node_args), 'rows': rows}


def format_node_table(report: dict[str, object]) -> str:
    """Render the node benchmark as the table the README quotes."""
    header = ('cameras', 'rate Hz', 'sent', 'classified', 'e2e p50', 'e2e p95', 'e2e p99',
              'engine p50', 'overhead p50', 'p50 first/last third', 'node RSS MB first/last')

    def ms(value):
        return '-' if value is None else f'{value:.1f}'
    lines = []
    for row in report['rows']:
        lines.append((
            str(row['cameras']), f'{row["rate_hz"]:g}', str(row['sent']), str(row['classified']),
            ms(row['e2e_ms']['p50']), ms(row['e2e_ms']['p95']), ms(row['e2e_ms']['p99']),
            ms(row['engine_ms']['p50']), ms(row.get('overhead_p50_ms')),
            f'{ms(row["first_third_p50_ms"])} / {ms(row["last_third_p50_ms"])}',
            f'{row["node_rss_first_mb"]:.0f} / {row["node_rss_last_mb"]:.0f}'))
    render = render_table(header, lines)
    height, width = report['frame_size']
    return '\n'.join(render + ['', f'rgb8 {width}x{height} frames, best effort, '
                                   f'{report["duration_s"]:g} s per row; times in ms.'])


def node_arguments(args: argparse.Namespace) -> list[str]:
    """Return the node's ``--ros-args`` for the engine and model flags (one -p each)."""
    from cnn_rnn_perception.ros.parameters import model_parameters

    values = {'device': args.device, 'precision': args.precision, 'backend': args.backend,
              'auto_rate_hz': args.auto_rate_hz, 'compile': not args.no_compile,
              **model_parameters(options.model_config(args, num_classes=1))}
    if args.checkpoint:
        values['model.checkpoint'] = args.checkpoint
    return [word for name, value in values.items()
            for word in ('-p', f'{name}:={json.dumps(value)}')]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the bench-node command's flags."""
    parser.description = (
        'Start perception_node as its own process, publish camera frames stamped at send '
        "time, and time each ~/scene result: end-to-end p50/p95/p99 next to the engine's own "
        "time for the same frames, latency drift over the run and the node's memory. DDS "
        'stays on loopback.')
    parser.add_argument('--cameras', type=options.int_list, default=[1, 4], metavar='N[,N...]',
                        help='camera counts to measure (default: 1,4)')
    parser.add_argument('--rates', type=options.float_list, default=[15.0, 30.0],
                        metavar='HZ[,HZ...]', help='frame rates per camera (default: 15,30)')
    parser.add_argument('--duration', type=float, default=20.0,
                        help='measured seconds per (cameras, rate) (default: 20)')
    parser.add_argument('--warmup', type=float, default=3.0,
                        help='unmeasured seconds first (default: 3)')
    parser.add_argument('--soak', type=float, metavar='MINUTES',
                        help='instead: run the node this long with 2 cameras at the first '
                        '--rates, swapping a camera and rebuilding the model by turns; report '
                        'RSS growth, worker restarts, frames unaccounted and the longest gap '
                        'in results')
    parser.add_argument('--change-every', type=float, default=20.0, metavar='SECONDS',
                        help='with --soak: seconds between changes (default: 20)')
    options.add(parser, '--frame-size', help='rgb8 frame width x height (default: 640x480)')
    options.add(parser, '--checkpoint', help='a checkpoint for the node to load')
    options.add(parser, '--no-compile', '--json', '--no-progress')
    options.add_engine_arguments(parser)
    options.add_model_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """Run the node under load (or soak it) and print the table."""
    frame_width, frame_height = args.frame_size
    if args.soak:
        from cnn_rnn_perception.tools.benchmarks.soak import format_soak, run_soak

        report = run_soak(args.soak, rate_hz=args.rates[0], change_every_s=args.change_every,
                          frame_size=(frame_height, frame_width),
                          node_args=node_arguments(args),
                          hidden_size=options.model_config(args, num_classes=1).hidden_size,
                          progress=not args.no_progress)
        print(format_soak(report))
        write_json(args.json, report)
        return 0 if report['passed'] else 1
    report = run_node_benchmark(cameras=args.cameras, rates_hz=args.rates,
                                duration_s=args.duration, warmup_s=args.warmup,
                                frame_size=(frame_height, frame_width),
                                node_args=node_arguments(args), progress=not args.no_progress)
    print(format_node_table(report))
    write_json(args.json, report)
    return 0
