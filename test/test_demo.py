"""The demo command: summary, frame accounting, and clean-up on Ctrl-C."""

import os
from pathlib import Path
import signal
import subprocess
import sys
import time

from cnn_rnn_perception.core.checkpoint import save_checkpoint, seeded
from cnn_rnn_perception.core.model import CnnRnnClassifier
from cnn_rnn_perception.core.model_config import ModelConfig
from cnn_rnn_perception.tools.demo import CAMERA_TOPIC, LABEL_TOPIC
from cnn_rnn_perception.tools.synthetic.scenes import CLASSES
from cnn_rnn_perception.tools.synthetic.synth import write_recording
import psutil
import pytest

pytestmark = pytest.mark.slow
COMMAND = str(Path(sys.executable).with_name('cnn_rnn_perception'))


def prepared_cache(root: Path, seconds_per_scene: float) -> Path:
    """Return a cache the demo takes as already prepared: a tiny model, a short recording."""
    data = root / 'data'
    write_recording(data / 'held_out', scenes=3, seconds_per_scene=seconds_per_scene,
                    rate_hz=10, seed=3, height=48, width=64, topic=CAMERA_TOPIC,
                    label_topic=LABEL_TOPIC, progress=False)
    (data / 'complete').touch()
    (root / 'model').mkdir()
    with seeded(0):
        model = CnnRnnClassifier(ModelConfig(input_size=(32, 32), hidden_size=8))
    save_checkpoint(root / 'model' / 'best.pt', model, labels=list(CLASSES))
    return root


@pytest.fixture
def cache(tmp_path) -> Path:
    return prepared_cache(tmp_path, seconds_per_scene=1.0)


def perception_nodes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(['cmdline'])
            if any('perception_node' in part for part in (p.info['cmdline'] or []))]


def test_demo_prints_results_accuracy_latency_and_balanced_accounting(cache):
    result = subprocess.run([COMMAND, 'demo', '--cache', str(cache), '--device', 'cpu'],
                            capture_output=True, text=True, timeout=300, env=os.environ.copy())
    # An untrained model: the demo runs through and reports, then fails the 90% bar.
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert 'synthetic scenes: cached' in out and 'model: cached' in out
    assert 'truth' in out and 'accuracy on the held-out recording' in out
    assert 'latency, frame in to result out of the node: p50' in out
    assert 'frames: received 30 = classified' in out and '(balanced)' in out
    assert not perception_nodes()


def test_ctrl_c_stops_the_demo_and_every_process_it_started(tmp_path):
    # A 60 s recording: Ctrl-C lands mid-replay however fast this machine is.
    cache = prepared_cache(tmp_path, seconds_per_scene=20.0)
    demo = subprocess.Popen([COMMAND, 'demo', '--cache', str(cache), '--device', 'cpu'],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ.copy())
    try:
        for line in demo.stdout:
            if line.strip().startswith('frame '):  # the node is up and classifying
                break
        assert perception_nodes(), 'the demo never started the node'
        demo.send_signal(signal.SIGINT)
        demo.wait(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 130
    deadline = time.monotonic() + 20
    while perception_nodes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not perception_nodes()
