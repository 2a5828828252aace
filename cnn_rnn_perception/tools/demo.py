"""
The demo: synthetic scenes, a trained model, the node in its own process, a bag replayed in.

Everything it makes is cached (data, then the model), so a second run starts at the node.
Every process it starts is stopped on the way out, Ctrl-C included. DDS stays on loopback.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import subprocess
import sys
import threading
import time
from typing import Any

from cnn_rnn_perception.tools import options
from cnn_rnn_perception.tools.environment.ros_env import (
    BackgroundNode, stop_process, use_loopback_dds)
import numpy as np

DEMO_MODEL = {'backbone': 'resnet18', 'sequence': 'spatial', 'hidden_size': 64,
              'input_size': (96, 128)}
SCENE_TOPIC = '/cnn_rnn_perception/scene'
CAMERA_TOPIC = '/camera/image_raw'
LABEL_TOPIC = '/scene_label'


def _say(text: str) -> None:
    print(text, flush=True)


def prepare_data(cache: Path) -> Path:
    """Draw the training images and a held-out recording once; reuse them afterwards."""
    from cnn_rnn_perception.tools.synthetic.synth import write_image_folder, write_recording
    data = cache / 'data'
    done = data / 'complete'
    if done.exists():
        _say(f'[1/4] synthetic scenes: cached in {data}')
        return data
    _say('[1/4] drawing synthetic navigation scenes (900 training, 180 validation images, '
         'one held-out 24 s recording)')
    progress = sys.stderr.isatty()
    write_image_folder(data / 'images', train_per_class=150, val_per_class=30, seed=0,
                       height=120, width=160, progress=progress)
    write_recording(data / 'held_out', scenes=12, rate_hz=15.0, seed=2024, height=240,
                    width=320, topic=CAMERA_TOPIC, label_topic=LABEL_TOPIC, progress=progress)
    done.touch()
    return data


def prepare_model(cache: Path, data: Path, device: str, retrain: bool) -> Path:
    """Train the demo model once (about 2 minutes on 2 CPU cores); reuse it afterwards."""
    from cnn_rnn_perception.core.model_config import ModelConfig
    from cnn_rnn_perception.tools.training.data import image_folder_samples
    from cnn_rnn_perception.tools.training.settings import TrainSettings
    from cnn_rnn_perception.tools.training.train import train
    checkpoint = cache / 'model' / 'best.pt'
    if checkpoint.exists() and not retrain:
        _say(f'[2/4] model: cached {checkpoint}')
        return checkpoint
    _say('[2/4] training resnet18 + LSTM on the synthetic scenes (5 epochs)')
    classes, train_set, val_set, _ = image_folder_samples(data / 'images', 0.2, 0)
    settings = TrainSettings(model=ModelConfig(**DEMO_MODEL), epochs=5, batch_size=32,
                             device=device)
    train(settings, classes=classes, train_samples=train_set, val_samples=val_set,
          output=cache / 'model', progress=sys.stderr.isatty())
    return checkpoint


class _Listener:
    """Prints the node's results as they come and keeps its latest diagnostics."""

    def __init__(self, truth_at) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from std_msgs.msg import String
        self._truth_at = truth_at
        self.ros = BackgroundNode('demo_listener')
        self.lock = threading.Lock()
        self.scenes: list[dict] = []
        self.camera_status: dict[str, str] = {}
        self._last_line = None
        self.ros.node.create_subscription(String, SCENE_TOPIC, self._on_scene, 100)
        self.ros.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_status, 10)

    def _on_scene(self, message: Any) -> None:
        scene = json.loads(message.data)
        stamp_ns = scene['stamp']['sec'] * 1_000_000_000 + scene['stamp']['nanosec']
        truth = self._truth_at(stamp_ns)
        with self.lock:
            self.scenes.append(scene)
            count = len(self.scenes)
        line = (scene['label'], truth)
        if line != self._last_line or count % 45 == 0:
            mark = 'ok' if scene['label'] == truth else '--'
            node_ms = scene['latency_ms']['receive_to_publish']
            _say(f'  frame {count:>4}  {scene["label"]:<14} {scene["score"]:.2f}   truth '
                 f'{truth or "-":<14} {mark}   node {node_ms:.1f} ms')
            self._last_line = line

    def _on_status(self, message: Any) -> None:
        for status in message.status:
            if status.name.endswith(CAMERA_TOPIC):
                with self.lock:
                    self.camera_status = {kv.key: kv.value for kv in status.values}

    def close(self) -> None:
        self.ros.close()


def run_demo(cache: str | Path = '.cache/demo', *, device: str = 'auto',
             retrain: bool = False) -> int:
    """Run the whole demo; return 0 when the held-out accuracy reaches 90%."""
    from cnn_rnn_perception.tools.evaluation.bags import BagSource
    from cnn_rnn_perception.tools.evaluation.replay import replay_bag
    from cnn_rnn_perception.tools.evaluation.runner import score_scene_recording

    started = time.monotonic()
    cache = Path(cache)
    use_loopback_dds()
    data = prepare_data(cache)
    checkpoint = prepare_model(cache, data, device, retrain)
    bag = data / 'held_out'
    with BagSource(bag) as source:
        labels = source.labels(LABEL_TOPIC)
    _say('[3/4] starting perception_node and replaying the held-out recording into it '
         '(15 Hz, 24 s)')
    log_path = cache / 'perception_node.log'
    node = subprocess.Popen(
        [str(Path(sys.executable).with_name('perception_node')), '--ros-args',
         '-p', f'model.checkpoint:={checkpoint}', '-p', f"image_topics:=['{CAMERA_TOPIC}']",
         '-p', f'device:={device}', '-p', 'compile:=false'],
        stdout=log_path.open('w'), stderr=subprocess.STDOUT)
    listener = _Listener(labels.at)
    record = cache / 'scenes.jsonl'
    try:
        replay_bag(str(bag), topics=[CAMERA_TOPIC], label_topic=LABEL_TOPIC, rate=1.0,
                   scene_topic=SCENE_TOPIC, record_path=record, wait_subscribers_s=120.0,
                   progress=False)
        time.sleep(1.5)  # one more diagnostics period
        with listener.lock:
            status = dict(listener.camera_status)
            scenes = list(listener.scenes)
    finally:
        listener.close()
        stop_process(node)
    summary = score_scene_recording(record, str(bag), label_topic=LABEL_TOPIC)['summary']
    node_ms = [s['latency_ms']['receive_to_publish'] for s in scenes]
    engine_ms = [s['latency_ms']['preprocess'] + s['latency_ms']['forward']
                 + s['latency_ms']['postprocess'] for s in scenes]
    _say('[4/4] summary')
    accuracy = summary['accuracy'] or 0.0
    _say(f'  accuracy on the held-out recording: {accuracy:.1%} '
         f'({summary["scored_frames"]} labelled frames)')
    if node_ms:
        _say(f'  latency, frame in to result out of the node: p50 {np.percentile(node_ms, 50):.1f}'
             f' ms, p95 {np.percentile(node_ms, 95):.1f} ms (engine alone: p50 '
             f'{np.percentile(engine_ms, 50):.1f} ms)')
    if status:
        counts = {key: int(status[key]) for key in
                  ('received', 'classified', 'dropped_stale', 'rejected', 'pending')}
        balanced = counts['received'] == (counts['classified'] + counts['dropped_stale']
                                          + counts['rejected'] + counts['pending'])
        _say(f'  frames: received {counts["received"]} = classified {counts["classified"]} + '
             f'dropped stale {counts["dropped_stale"]} + rejected {counts["rejected"]}'
             f'{" + pending " + str(counts["pending"]) if counts["pending"] else ""}'
             f'  ({"balanced" if balanced else "NOT balanced"})')
    _say(f'  took {time.monotonic() - started:.0f} s; node log: {log_path}')
    return 0 if accuracy >= 0.9 else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo command's flags."""
    parser.description = (
        'Draw synthetic navigation scenes, train a model on them (both cached), start '
        'perception_node as its own process, replay a held-out recording into it while '
        "printing its results, and end with the accuracy against the recording's labels, the "
        'latency and the frame accounting. Exit code 1 when accuracy is below 90%. '
        '--temporal instead compares per-frame and temporal models on drives where time '
        'matters (ego-motion, figures crossing the view): accuracy and flicker side by side; '
        'exit code 1 when a target is missed.')
    parser.add_argument('--temporal', action='store_true',
                        help='the temporal demo (cache default: .cache/demo-temporal)')
    parser.add_argument('--cache', help='where data, model and logs are kept (default: '
                                        '.cache/demo)')
    parser.add_argument('--retrain', action='store_true',
                        help='train again, ignoring the cache')
    options.add(parser, '--device')
    parser.add_argument('--held-out', type=int, metavar='N',
                        help='with --temporal: held-out drives per task (default: 2 '
                             'ego-motion, 5 scene drives); more give steadier figures and '
                             'take longer')


def main(args: argparse.Namespace) -> int:
    """Run the demo, or the temporal demo."""
    if args.held_out is not None and args.held_out < 1:
        raise ValueError(f'--held-out must be at least 1; got {args.held_out}')
    if args.temporal:
        from cnn_rnn_perception.tools.temporal_demo import run_temporal_demo
        return run_temporal_demo(args.cache or '.cache/demo-temporal', device=args.device,
                                 retrain=args.retrain, held_out=args.held_out)
    return run_demo(args.cache or '.cache/demo', device=args.device, retrain=args.retrain)
