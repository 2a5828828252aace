"""selftest and the GPU check's wheelhouse: what a robot owner runs to trust an install."""

import json
from pathlib import Path
import subprocess
import sys
import zipfile

from cnn_rnn_perception.core.engine import EngineSettings
from cnn_rnn_perception.core.engine import model_parts
from cnn_rnn_perception.core.model_config import ModelConfig
from cnn_rnn_perception.core.sample_frames import selftest_frames
from cnn_rnn_perception.tools.benchmarks.selftest import _check_path, run_selftest, TOLERANCE
from cnn_rnn_perception.tools.environment.gpu_check import (
    _requirements_of, BUILD_ONLY, ON_GPU_IMAGE)
import numpy as np
import pytest

COMMAND = str(Path(sys.executable).with_name('cnn_rnn_perception'))


@pytest.mark.slow
def test_selftest_on_the_cpu_passes_and_reports_every_path(tmp_path):
    report_path = tmp_path / 'selftest.json'
    result = subprocess.run(
        [COMMAND, 'selftest', '--device', 'cpu', '--input-size', '64x64', '--hidden-size', '16',
         '--batch-sizes', '1,3', '--no-progress', '--json', str(report_path)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(report_path.read_text())
    assert report['passed'] is True
    assert [path['path'] for path in report['paths']] == [
        'eager', 'compiled', 'static buffers', 'built beside a serving engine', 'onnxruntime',
        'openvino']
    for path in report['paths']:
        assert path['max_abs_diff'] <= TOLERANCE['fp32'] and path['ms_per_frame'] > 0
    assert 'PASSED' in result.stdout and 'static buffers' in result.stdout


def test_selftest_checks_a_temporal_models_state_beside_another_camera():
    model, labels, preprocessing = model_parts(
        None, ModelConfig(input_size=(64, 64), hidden_size=8, temporal='gru',
                          temporal_hidden_size=8))
    report = run_selftest(model, labels=labels, preprocessing=preprocessing, device='cpu',
                          batch_sizes=[1, 2], compile_trunk=False, progress=False)
    assert report['passed'] is True, report
    # Exported runtimes cannot carry the state, so they are not among the paths.
    assert [path['path'] for path in report['paths']] == [
        'eager', 'static buffers', 'built beside a serving engine', 'temporal state',
        'temporal, 3 cameras on 2 state rows']


def test_a_path_that_cannot_run_fails_the_selftest_with_its_reason():
    model, labels, preprocessing = model_parts(
        None, ModelConfig(input_size=(64, 64), hidden_size=8))
    frames, orders = selftest_frames(6)
    broken = EngineSettings(device='cpu', precision='fp32', max_batch=1, warmup_iterations=1,
                            compile_trunk=False)
    result = _check_path('eager', broken, model, labels, preprocessing, frames, orders, [],
                         {}, [], [1, 2], 1, __import__('torch').device('cpu'))
    assert not result.passed and 'max_batch is 1' in result.error


def test_selftest_frames_mix_sizes_channels_and_colour_orders():
    frames, orders = selftest_frames(6)
    assert len({frame.shape for frame in frames}) == 6
    assert {frame.shape[2] for frame in frames} == {1, 3, 4} and set(orders) == {'rgb', 'bgr'}
    assert all(frame.dtype == np.uint8 for frame in frames)


def test_the_wheelhouse_follows_requirements_for_the_gpu_python_only(tmp_path):
    wheel = tmp_path / 'demo-1.0-py3-none-any.whl'
    with zipfile.ZipFile(wheel, 'w') as archive:
        archive.writestr('demo-1.0.dist-info/METADATA', '\n'.join([
            'Name: demo', 'Requires-Dist: ros_rcl (>=1)', 'Requires-Dist: numpy',
            'Requires-Dist: tomli; python_version < "3.11"',
            'Requires-Dist: pytest; extra == "test"', 'Requires-Dist: Ruamel.YAML']))
    assert _requirements_of(wheel) == ['ros-rcl', 'numpy', 'ruamel-yaml']
    assert 'numpy' in ON_GPU_IMAGE and 'empy' in BUILD_ONLY
