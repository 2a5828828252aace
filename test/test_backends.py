"""Deployment backends: export, ONNX Runtime, OpenVINO, and auto, against the torch model."""

from dataclasses import replace
import json
from pathlib import Path
import subprocess
import sys

from cnn_rnn_perception.core.checkpoint import save_checkpoint, seeded
from cnn_rnn_perception.core.engine import (
    choose_backend, create_engine, EngineSettings, TorchEngine)
from cnn_rnn_perception.core.engine.export_format import read_exported
from cnn_rnn_perception.core.model import CnnRnnClassifier
from cnn_rnn_perception.core.model_config import ModelConfig, Preprocessing
from cnn_rnn_perception.core.sample_frames import selftest_frames
from cnn_rnn_perception.ros.parameters import PARAMETERS, validate
from cnn_rnn_perception.tools.training.export import export
import numpy as np
import pytest

CONFIG = ModelConfig(input_size=(64, 96), hidden_size=16, num_classes=4, sequence='columns',
                     bidirectional=True, pooling='attention', rnn='gru')
LABELS = ['corridor', 'doorway', 'junction', 'blocked']
PREPROCESSING = Preprocessing(input_size=(64, 96), color_order='bgr')
CPU = EngineSettings(device='cpu', compile_trunk=False, max_batch=4, warmup_iterations=1)
COMMAND = str(Path(sys.executable).with_name('cnn_rnn_perception'))


@pytest.fixture(scope='module')
def model():
    with seeded(4):
        return CnnRnnClassifier(CONFIG).eval()


@pytest.fixture(scope='module')
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp('backends') / 'model.pt'
    save_checkpoint(path, model, labels=LABELS, preprocessing=PREPROCESSING)
    return str(path)


def probabilities(engine, frames, orders):
    return np.stack([r.probabilities for r in engine.infer(frames, color_order=orders)])


@pytest.mark.parametrize('fmt,name,backend', [
    ('onnx', 'model.onnx', 'onnxruntime'), ('openvino', 'model.xml', 'openvino')])
def test_an_exported_file_alone_runs_the_model_with_its_labels_and_preprocessing(
        model, tmp_path, fmt, name, backend):
    report = export(model, LABELS, PREPROCESSING, fmt=fmt, output=tmp_path / name)
    assert report.max_abs_diff <= 1e-4
    info = read_exported(tmp_path / name)
    assert (info.config, info.labels, info.preprocessing) == (CONFIG, LABELS, PREPROCESSING)
    frames, orders = selftest_frames(4)
    with TorchEngine(model, labels=LABELS, preprocessing=PREPROCESSING,
                     settings=CPU) as torch_engine:
        want = probabilities(torch_engine, frames, orders)
    with create_engine(tmp_path / name, EngineSettings(device='cpu', backend=backend,
                                                       max_batch=4)) as exported:
        assert exported.labels == LABELS and exported.describe().startswith(backend)
        np.testing.assert_allclose(probabilities(exported, frames, orders), want, atol=1e-4)
        # The batch axis is dynamic: one frame, then three.
        np.testing.assert_allclose(probabilities(exported, frames[:1], orders[:1]), want[:1],
                                   atol=1e-4)


@pytest.mark.parametrize('backend', ['onnxruntime', 'openvino'])
def test_a_checkpoint_runs_on_every_backend_with_the_same_results(checkpoint, backend):
    frames, orders = selftest_frames(3)
    with create_engine(checkpoint, CPU) as torch_engine, \
            create_engine(checkpoint, EngineSettings(device='cpu', backend=backend,
                                                     max_batch=4)) as other:
        np.testing.assert_allclose(probabilities(other, frames, orders),
                                   probabilities(torch_engine, frames, orders), atol=1e-4)
        times = other.infer(frames[:2], color_order=orders[:2])[0].times
        assert times.batch_size == 2 and times.forward_ms > 0


def test_auto_keeps_the_fastest_backend_that_agrees_and_says_what_it_measured(checkpoint):
    engine, choice = choose_backend(checkpoint, EngineSettings(device='cpu', backend='auto',
                                                               compile_trunk=False))
    try:
        assert set(choice.ms_per_frame) == {'torch', 'onnxruntime', 'openvino'}
        assert all(difference <= 1e-4 for difference in choice.max_abs_diff.values())
        assert choice.chosen == min(choice.ms_per_frame, key=choice.ms_per_frame.get)
        assert engine.describe().split()[0] in (choice.chosen, 'resnet18')
        assert 'backend auto chose' in choice.summary()
    finally:
        engine.close()


def test_auto_reuses_a_choice_for_the_same_file_and_settings_and_times_a_changed_one(
        checkpoint, tmp_path):
    # A node reloading a model it has measured builds the choice at once: no timing rounds,
    # no candidate engines beside the one it keeps.
    choices, timed = {}, []

    def timing(task):
        timed.append(task)
        return task()
    settings = EngineSettings(device='cpu', backend='auto', compile_trunk=False)
    first, choice = choose_backend(checkpoint, settings, timing_on=timing, choices=choices)
    first.close()
    assert len(timed) == 1 and len(choices) == 1
    again, reused = choose_backend(checkpoint, settings, timing_on=timing, choices=choices)
    try:
        assert len(timed) == 1, 'the same file and settings were timed again'
        assert reused.reused and reused.chosen == choice.chosen
        assert 'backend auto reused its choice of' in reused.summary()
        assert again.backend_choice is reused
    finally:
        again.close()
    copy = tmp_path / 'copy.pt'  # another file (a new export, say) is measured afresh
    copy.write_bytes(Path(checkpoint).read_bytes())
    choose_backend(str(copy), settings, timing_on=timing, choices=choices)[0].close()
    choose_backend(checkpoint, replace(settings, auto_rate_hz=30.0), timing_on=timing,
                   choices=choices)[0].close()
    assert len(timed) == 3 and len(choices) == 3


def test_what_a_backend_cannot_do_is_refused_with_the_reason(
        checkpoint, tmp_path, model, monkeypatch):
    onnx_path = tmp_path / 'model.onnx'
    export(model, LABELS, PREPROCESSING, fmt='onnx', output=onnx_path)
    with pytest.raises(ValueError, match='is an exported model: run it with backend'):
        create_engine(onnx_path, CPU)
    temporal = CnnRnnClassifier(replace(model.config, temporal='gru')).eval()
    with pytest.raises(ValueError, match='temporal stage .* run the checkpoint with backend '
                       'torch'):
        export(temporal, LABELS, PREPROCESSING, fmt='onnx', output=tmp_path / 't.onnx')
    with pytest.raises(ValueError, match='OpenVINO model is an .xml file'):
        export(model, LABELS, PREPROCESSING, fmt='openvino', output=tmp_path / 'model.bin')
    # A runtime that is not installed: one line with the pip command.
    monkeypatch.setitem(sys.modules, 'openvino', None)
    with pytest.raises(RuntimeError, match=r'openvino is not installed: pip install openvino'):
        create_engine(checkpoint, EngineSettings(device='cpu', backend='openvino'))


def test_the_node_refuses_an_exported_model_on_the_torch_backend(model, tmp_path):
    onnx_path = tmp_path / 'model.onnx'
    export(model, LABELS, PREPROCESSING, fmt='onnx', output=onnx_path)
    current = {spec.name: spec.default for spec in PARAMETERS}
    reason = validate({'model.checkpoint': str(onnx_path)}, current)
    assert 'is an exported model: set backend to onnxruntime, openvino or auto' in reason
    assert validate({'model.checkpoint': str(onnx_path), 'backend': 'onnxruntime'},
                    current) is None


@pytest.mark.slow
def test_export_and_bench_backends_from_the_command_line(checkpoint, tmp_path):
    result = subprocess.run([COMMAND, 'export', checkpoint, '--format', 'onnx', '--output',
                             str(tmp_path / 'scene.onnx')], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'parity on 6 generated frames' in result.stdout
    report_path = tmp_path / 'bench.json'
    result = subprocess.run([COMMAND, 'bench', '--device', 'cpu', '--no-compile',
                             '--input-size', '64x64', '--hidden-size', '16', '--iterations', '10',
                             '--backends', 'torch,onnxruntime,openvino', '--no-progress',
                             '--precisions', 'fp32,int8', '--json', str(report_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = json.loads(report_path.read_text())['rows']
    assert [(row['path'].split()[0], row['precision']) for row in rows] == [
        ('seed', 'fp32'), ('torch', 'fp32'), ('onnxruntime', 'fp32'), ('onnxruntime', 'fp32'),
        ('openvino', 'fp32'), ('openvino', 'fp32'), ('openvino', 'int8'), ('openvino', 'int8')]
    # Each exported backend sits beside its runtime called plainly on the same file.
    assert [row['path'].endswith('called plainly') for row in rows] == [
        False, False, False, True, False, True, False, True]
    assert [row['vs_plain'] is not None for row in rows] == [
        False, False, True, False, True, False, True, False]
    assert all(row['max_abs_diff'] <= 1e-4 for row in rows if row['precision'] == 'fp32')
    assert "batch 1, fp32: the engine's best" in result.stdout
    assert "batch 1, int8: the engine's best" in result.stdout
    assert 'CPU flags:' in result.stdout


def test_auto_closes_every_engine_it_built_when_a_measurement_fails(checkpoint, monkeypatch):
    from cnn_rnn_perception.core.engine import factory
    built, closed = [], []
    create = factory.create_engine

    def recording_create(*args, **kwargs):
        engine = create(*args, **kwargs)
        close = engine.close
        engine.close = lambda: (closed.append(engine), close())[1]
        built.append(engine)
        return engine

    def failing_timing(task):
        raise RuntimeError('the inference worker stopped')

    monkeypatch.setattr(factory, 'create_engine', recording_create)
    with pytest.raises(RuntimeError, match='worker stopped'):
        choose_backend(checkpoint, EngineSettings(device='cpu', backend='auto',
                                                  compile_trunk=False),
                       on_worker=failing_timing)
    assert len(built) >= 3 and all(engine in closed for engine in built)
