"""Bags: reading, offline evaluation, and the evaluate command; bags are written here."""

import csv
import json
import os
from pathlib import Path
import subprocess
import sys
import threading
import time

from cnn_rnn_perception.core.checkpoint import save_checkpoint
from cnn_rnn_perception.core.engine import EngineSettings, TorchEngine
from cnn_rnn_perception.core.image_conversion import message_to_frame
from cnn_rnn_perception.core.model import CnnRnnClassifier
from cnn_rnn_perception.core.model_config import ModelConfig
from cnn_rnn_perception.core.sample_frames import camera_frame
from cnn_rnn_perception.tools.evaluation.bags import (
    BadMessage, BagError, BagSource, BagWriter, Labels)
from cnn_rnn_perception.tools.evaluation.metrics import NO_LABEL
from cnn_rnn_perception.tools.evaluation.runner import evaluate_bags, score_scene_recording
import cv2
import numpy as np
import pytest
import torch

LABELS = ['corridor', 'doorway_left', 'doorway_right']
COMMAND = str(Path(sys.executable).with_name('cnn_rnn_perception'))
SECOND = 1_000_000_000
FIRST_LABEL = 10 * SECOND + 150_000_000  # write_scene_bag's first label


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = CnnRnnClassifier(ModelConfig(input_size=(64, 64), hidden_size=16, num_classes=3))
    path = tmp_path_factory.mktemp('model') / 'model.pt'
    save_checkpoint(path, model, labels=LABELS)
    return path


def write_scene_bag(path: Path, storage: str = 'sqlite3', bad_frame: bool = True) -> Path:
    """
    Write 12 raw frames (rgb8, bgr8, mono8, yuv422) and 6 JPEGs over 1.2 s, labels changing.

    The first label arrives at 0.15 s, so the first two frames of each topic have no label.
    """
    with BagWriter(path, storage=storage) as bag:
        bag.write_label('/scene_label', 'corridor', FIRST_LABEL)
        bag.write_label('/scene_label', 'doorway_left', 10 * SECOND + 600_000_000)
        for index in range(12):
            stamp = 10 * SECOND + index * 100_000_000
            frame = camera_frame(120, 160, seed=index)
            encoding, pixels = [('bgr8', frame), ('rgb8', frame[..., ::-1]),
                                ('mono8', cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)),
                                ('yuv422', np.zeros((120, 160, 2), np.uint8) + 128)][index % 4]
            bag.write_image('/front/image_raw', pixels, encoding, stamp, 'front')
            if index % 2 == 0:
                jpeg = cv2.imencode('.jpg', frame)[1].tobytes()
                bag.write_compressed('/rear/image_raw/compressed', jpeg, 'jpeg', stamp + 1, 'rear')
        if bad_frame:
            bad = bag.typestore.types['sensor_msgs/msg/Image'](
                header=bag.header(12 * SECOND, 'front'), height=120, width=160,
                encoding='rgb8', is_bigendian=0, step=480, data=np.zeros(100, np.uint8))
            bag.write_message('/front/image_raw', 'sensor_msgs/msg/Image', 12 * SECOND, bad)
    return path


def engine_for(checkpoint) -> TorchEngine:
    return TorchEngine.from_checkpoint(
        checkpoint, EngineSettings(device='cpu', compile_trunk=False, max_batch=4))


@pytest.mark.parametrize('storage', ['sqlite3', 'mcap'])
def test_evaluate_gives_the_same_predictions_as_the_engine_frame_by_frame(
        tmp_path, checkpoint, storage):
    bag_path = write_scene_bag(tmp_path / 'scenes', storage)
    engine = engine_for(checkpoint)
    result = evaluate_bags([str(bag_path)], engine, label_topic='/scene_label', batch_size=4,
                           progress=False)
    predictions = result['predictions']
    with BagSource(bag_path) as bag:
        frames = [item for item in bag.frames(bag.image_topics())
                  if not isinstance(item, BadMessage)]
    expected = []
    for record in frames:
        try:
            frame, order = message_to_frame(record.message)
        except ValueError:
            continue
        expected.append((record.topic, record.stamp_ns,
                         engine.infer([frame], color_order=order)[0]))
    assert len(predictions) == len(expected) == 18
    for prediction, (topic, stamp_ns, single) in zip(predictions, expected):
        assert (prediction.topic, round(prediction.stamp * 1e9)) == (topic, stamp_ns)
        assert prediction.label == single.label
        assert prediction.score == pytest.approx(single.score, abs=1e-5)
    summary = result['summary']
    assert summary['bad_frames'] == 1
    assert 'truncated image' in summary['bad_frame_reasons']['/front/image_raw']


def test_labels_are_the_latest_at_or_before_each_frame(tmp_path, checkpoint):
    bag_path = write_scene_bag(tmp_path / 'scenes')
    result = evaluate_bags([str(bag_path)], engine_for(checkpoint), label_topic='/scene_label',
                           topics=['/front/image_raw'], progress=False)
    truths = [p.truth for p in result['predictions']]
    assert truths == [None, None] + ['corridor'] * 4 + ['doorway_left'] * 6
    assert result['summary']['scored_frames'] == 10


def test_sidecar_csv_labels_match_header_stamps(tmp_path, checkpoint):
    bag_path = write_scene_bag(tmp_path / 'scenes', bad_frame=False)
    csv_path = tmp_path / 'labels.csv'
    csv_path.write_text('stamp,label\n10.0,doorway_right\n10.55,corridor\n')
    result = evaluate_bags([str(bag_path)], engine_for(checkpoint), labels_csv=str(csv_path),
                           topics=['/front/image_raw'], progress=False)
    assert [p.truth for p in result['predictions']] == ['doorway_right'] * 6 + ['corridor'] * 6


def test_labels_are_the_latest_label_stamped_at_or_before_a_moment():
    assert Labels([5, 1], ['late', 'early']).at(3) == 'early'


def run(*args):
    return subprocess.run([COMMAND, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''})


@pytest.mark.slow
def test_evaluate_command_writes_predictions_plot_summary_and_gates_on_accuracy(
        tmp_path, checkpoint):
    bag_path = write_scene_bag(tmp_path / 'scenes.mcap-dir', 'mcap')
    mcap_file = next(bag_path.glob('*.mcap'))
    outputs = {name: tmp_path / name for name in ('p.csv', 's.json', 'c.png', 'p.jsonl')}
    result = run('evaluate', str(mcap_file), '--checkpoint', str(checkpoint), '--label-topic',
                 '/scene_label', '--output', str(outputs['p.csv']), '--summary',
                 str(outputs['s.json']), '--confusion-png', str(outputs['c.png']),
                 '--min-accuracy', '0.0', '--no-progress')
    assert result.returncode == 0, result.stderr
    assert 'accuracy' in result.stdout and 'truth \\ predicted' in result.stdout
    assert '1 bad frames skipped' in result.stdout
    rows = outputs['p.csv'].read_text().splitlines()
    assert rows[0].startswith('bag,topic,stamp,frame_id,label,score') and len(rows) == 19
    summary = json.loads(outputs['s.json'].read_text())
    assert summary['frames'] == 18 and summary['scored_frames'] == 15
    assert outputs['c.png'].read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    gated = run('evaluate', str(mcap_file), '--checkpoint', str(checkpoint), '--label-topic',
                '/scene_label', '--min-accuracy', '1.01', '--no-progress')
    assert gated.returncode == 1 and 'is below --min-accuracy 1.01' in gated.stderr


@pytest.mark.slow
def test_user_mistakes_with_bags_are_one_line_errors(tmp_path, checkpoint):
    bag_path = write_scene_bag(tmp_path / 'scenes')
    cases = [
        ([str(tmp_path / 'missing_bag')], 'bag not found'),
        ([str(bag_path), '--topics', '/scene_label'],
         "topic '/scene_label' is std_msgs/msg/String, not sensor_msgs/msg/Image"),
        ([str(bag_path), '--topics', '/nope'], "no topic '/nope'; image topics here"),
        ([str(bag_path), '--label-topic', '/front/image_raw'],
         "label topic '/front/image_raw' is sensor_msgs/msg/Image"),
    ]
    truncated = tmp_path / 'truncated.db3'
    database = next(bag_path.glob('*.db3')).read_bytes()
    truncated.write_bytes(database[:len(database) // 3])
    cases.append(([str(truncated)], str(truncated)))
    for arguments, message in cases:
        result = run('evaluate', *arguments, '--checkpoint', str(checkpoint), '--no-progress')
        assert result.returncode == 2, (arguments, result.stdout, result.stderr)
        assert message in result.stderr and 'Traceback' not in result.stderr, result.stderr
    no_model = run('evaluate', str(bag_path))
    assert no_model.returncode == 2 and 'evaluate needs --checkpoint' in no_model.stderr


# -- evaluate: the failure modes a user ran into -------------------------------------------------

def scene_line(topic: str, stamp_ns: int, label) -> str:
    return json.dumps({'topic': topic, 'stamp': {'sec': stamp_ns // SECOND,
                                                 'nanosec': stamp_ns % SECOND},
                       'frame_id': 'front', 'label': label, 'score': 0.9 if label else None,
                       'top_k': [{'label': label, 'score': 0.9}] if label else []})


def test_scene_scoring_counts_below_threshold_frames_as_misses_and_follows_remaps(tmp_path):
    bag = write_scene_bag(tmp_path / 'bag', bad_frame=False)
    stamps = [10 * SECOND + index * 100_000_000 for index in (6, 7, 8)]  # doorway_left
    scenes = tmp_path / 'scenes.jsonl'
    scenes.write_text('\n'.join([scene_line('/robot/front', stamps[0], 'doorway_left'),
                                 scene_line('/robot/front', stamps[1], None),
                                 scene_line('/robot/front', stamps[2], 'corridor')]) + '\n')
    with pytest.raises(BagError, match='give the same --remap'):
        score_scene_recording(scenes, str(bag), label_topic='/scene_label')
    summary = score_scene_recording(scenes, str(bag), label_topic='/scene_label',
                                    remap={'/front/image_raw': '/robot/front'})['summary']
    assert summary['scored_frames'] == 3 and summary['accuracy'] == pytest.approx(1 / 3)
    assert NO_LABEL in summary['labels']


class FailingEngine(TorchEngine):
    """A real engine whose second batch fails, as a device error would."""

    def infer(self, frames, **kwargs):
        self.batches = getattr(self, 'batches', 0) + 1
        if self.batches > 1:
            raise RuntimeError('device lost')
        return super().infer(frames, **kwargs)


def test_an_inference_error_ends_evaluation_without_leaving_the_reader_blocked(
        tmp_path, checkpoint):
    bag = write_scene_bag(tmp_path / 'bag')
    engine = FailingEngine.from_checkpoint(
        checkpoint, EngineSettings(device='cpu', compile_trunk=False, max_batch=1,
                                   warmup_iterations=0))
    engine.batches = -10  # warm-up batches pass
    with pytest.raises(RuntimeError, match='device lost'):
        evaluate_bags([str(bag)], engine, batch_size=1, progress=False)
    time.sleep(0.5)
    assert not [t for t in threading.enumerate() if t.name == 'bag-reader']


class ShapeRecordingEngine(TorchEngine):
    def warmup(self, frame_shape=None, batch_sizes=(1,), color_order='bgr'):
        self.warmed = getattr(self, 'warmed', []) + [frame_shape]
        return super().warmup(frame_shape, batch_sizes, color_order)


def test_evaluate_warms_up_at_the_frame_shape_of_the_bag(tmp_path, checkpoint):
    bag = write_scene_bag(tmp_path / 'bag', bad_frame=False)
    engine = ShapeRecordingEngine.from_checkpoint(
        checkpoint, EngineSettings(device='cpu', compile_trunk=False, max_batch=4))
    evaluate_bags([str(bag)], engine, topics=['/front/image_raw'], batch_size=4,
                  progress=False)
    assert engine.warmed[-1][:2] == (120, 160)


def test_evaluate_runs_a_temporal_model_along_each_topic_as_the_node_would(tmp_path):
    torch.manual_seed(0)
    model = CnnRnnClassifier(ModelConfig(input_size=(64, 64), hidden_size=16, num_classes=3,
                                         temporal='gru', temporal_hidden_size=8)).eval()
    path = tmp_path / 'temporal.pt'
    save_checkpoint(path, model, labels=LABELS)
    bag = write_scene_bag(tmp_path / 'bag', bad_frame=False)
    settings = EngineSettings(device='cpu', compile_trunk=False, max_batch=4)
    with TorchEngine.from_checkpoint(path, settings) as engine:
        result = evaluate_bags([str(bag)], engine, label_topic='/scene_label', batch_size=4,
                               progress=False)
        status = engine.stream_status()
    # Each topic is one stream from its first frame to its last, whatever the batches were.
    assert {stream[1]: s.frames for stream, s in status.items()} == {
        '/front/image_raw': 12, '/rear/image_raw/compressed': 6}
    expected = []
    with BagSource(bag) as source, TorchEngine.from_checkpoint(path, settings) as engine:
        for item in source.frames(['/front/image_raw']):
            frame, order = message_to_frame(item.message)
            expected.append(engine.infer([frame], color_order=order, streams=['front'],
                                         stamps=[item.stamp_ns * 1e-9])[0].top_k[0])
    got = [(p.label, p.score) for p in result['predictions'] if p.topic == '/front/image_raw']
    assert [label for label, _ in got] == [label for label, _ in expected]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-5)
    assert result['summary']['flicker_per_min'] is not None


def rounded(value):
    """Floats to 6 places, through dicts and lists: batches of other sizes round apart."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {key: rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [rounded(item) for item in value]
    return value


@pytest.mark.slow
def test_evaluate_under_torchrun_shares_the_bags_out_and_merges_what_one_process_writes(
        tmp_path):
    from cnn_rnn_perception.tools.synthetic.scenes import CAMERA_MOTIONS
    from cnn_rnn_perception.tools.synthetic.synth import write_texture_motion_drive
    bags = [str(write_texture_motion_drive(tmp_path / f'bag_{seed}', segments=2 + seed,
                                           seed=seed, size=32, progress=False))
            for seed in range(3)]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CnnRnnClassifier(ModelConfig(input_size=(32, 32), hidden_size=8, num_classes=4,
                                             temporal='gru', temporal_hidden_size=8))
    save_checkpoint(tmp_path / 'model.pt', model, labels=sorted(CAMERA_MOTIONS))
    common = ['evaluate', *bags, '--checkpoint', str(tmp_path / 'model.pt'), '--label-topic',
              '/scene_label', '--device', 'cpu', '--batch-size', '4', '--no-progress']
    single = run(*common, '--summary', str(tmp_path / 'one.json'), '--output',
                 str(tmp_path / 'one.csv'))
    assert single.returncode == 0, single.stderr
    loopback = {'MASTER_ADDR': '127.0.0.1', 'GLOO_SOCKET_IFNAME': 'lo', 'OMP_NUM_THREADS': '1',
                'CUDA_VISIBLE_DEVICES': ''}
    double = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr',
         '127.0.0.1', '--master_port', str(29500 + (os.getpid() + 13) % 1000), COMMAND, *common,
         '--summary', str(tmp_path / 'two.json'), '--output', str(tmp_path / 'two.csv')],
        capture_output=True, text=True, timeout=300, env={**os.environ, **loopback})
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.count('accuracy') == single.stdout.count('accuracy')  # process 0 only
    one = json.loads((tmp_path / 'one.json').read_text())
    two = json.loads((tmp_path / 'two.json').read_text())
    timing = {'frames_per_s', 'engine_frames_per_s', 'throughput_vs_engine', 'processes'}
    assert two['processes'] == 2 and two['frames'] == one['frames'] > 0
    assert rounded({key: value for key, value in one.items() if key not in timing}) == \
        rounded({key: value for key, value in two.items() if key not in timing})
    rows = [list(csv.reader((tmp_path / name).open())) for name in ('one.csv', 'two.csv')]
    assert len(rows[0]) == len(rows[1]) == one['frames'] + 1
    for a, b in zip(*rows):  # the same frames in the same order, the same labels and decisions
        assert a[:5] + a[7:] == b[:5] + b[7:]
