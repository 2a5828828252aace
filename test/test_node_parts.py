"""The node's parameters and bookkeeping, tested without rclpy.init."""

import importlib.util
import threading
import time

from bad_files import bad_model_files, bad_policy_files, common_bad_files
from cnn_rnn_perception.core.engine import StageTimes
from cnn_rnn_perception.ros.cameras import (
    CameraStats, LatestFrames, RateLimitedLog)
from cnn_rnn_perception.ros.outputs import class_hypotheses, scene_record, stamp_now
from cnn_rnn_perception.ros.parameters import (
    choose_labels, model_config, needs_reload, PARAMETERS, policy_problem, validate,
    validate_startup)
import pytest
from ros_harness import ROOT
import yaml

CURRENT = {spec.name: spec.default for spec in PARAMETERS}


@pytest.mark.parametrize('changes,reason', [
    ({'top_k': 0}, 'top_k must be in [1, 1000]; got 0'),
    ({'smoothing': 1.0}, 'smoothing must be in [0.0, 0.99]'),
    ({'qos.reliability': 'sometimes'}, 'qos.reliability must be one of best_effort, reliable'),
    ({'image_topics': []}, 'image_topics must be a non-empty list'),
    ({'image_topics': ['/a', '/a']}, 'image_topics has duplicates'),
    ({'labels': ['a', 'a']}, 'labels must be a non-empty list of distinct names'),
    ({'model.input_size': [16, 16]}, 'model.input_size must be [height, width], each >= 32'),
    ({'device': 'gpu0'}, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ({'model.sequence': 'rows', 'model.strip': 2}, 'strip=2 does not divide the feature map'),
    ({'model.checkpoint': '/nonexistent.pt'}, "model.checkpoint '/nonexistent.pt': file not"),
    ({'autostart': False}, 'autostart is read-only'),
])
def test_invalid_parameter_changes_are_refused_with_a_reason(changes, reason):
    assert reason in validate(changes, CURRENT)


def test_valid_changes_pass_and_reload_ones_are_named():
    changes = {'top_k': 3, 'model.sequence': 'rows', 'model.strip': 7, 'smoothing': 0.5}
    assert validate(changes, CURRENT) is None
    assert needs_reload(changes) == ['model.sequence', 'model.strip']
    config = model_config({**CURRENT, **changes})
    assert (config.sequence, config.strip, config.num_classes) == ('rows', 7, 6)


def test_params_file_documents_every_parameter_with_its_default():
    document = yaml.safe_load((ROOT / 'config' / 'perception.yaml').read_text())
    values = document['/**']['ros__parameters']

    def lookup(name):
        node = values
        for part in name.split('.'):
            node = node[part]
        return node

    for spec in PARAMETERS:
        assert lookup(spec.name) == spec.default, spec.name
    comments = ' '.join((ROOT / 'config' / 'perception.yaml').read_text()
                        .replace('#', ' ').split())
    for spec in PARAMETERS:
        assert ' '.join(spec.description.split()) in comments, spec.name


def test_camera_stats_account_for_every_frame_and_report_levels():
    stats = CameraStats('/cam')
    assert stats.snapshot(2.0)['message'] == 'no frames received yet'
    for _ in range(5):
        stats.on_received()
    stats.on_dropped_stale()
    stats.on_rejected('truncated image')
    stats.on_classified(12.0)
    stats.on_classified(20.0)
    snap = stats.snapshot(2.0)
    assert (snap['received'], snap['classified'], snap['dropped_stale'], snap['rejected'],
            snap['pending']) == (5, 2, 1, 1, 1)
    assert snap['latency_p50_ms'] == pytest.approx(16.0) and snap['level'] == 0
    stats.on_rejected('unsupported encoding')
    snap = stats.snapshot(2.0)
    assert snap['level'] == 2 and 'every frame rejected: unsupported encoding' in snap['message']
    assert stats.snapshot(0.0)['level'] == 1  # silent longer than 0 s


def test_latest_frames_keep_only_the_newest_per_camera():
    frames = LatestFrames()
    assert frames.put('a', 1) is False
    assert frames.put('a', 2) is True   # 1 was never taken: a stale drop
    assert frames.put('b', 3) is False
    assert frames.take_all(0.0) == {'a': 2, 'b': 3}
    assert frames.take_all(0.0) == {}
    woke = []
    waiter = threading.Thread(target=lambda: woke.append(frames.take_all(5.0)))
    waiter.start()
    frames.put('c', 4)
    waiter.join(2.0)
    assert woke == [{'c': 4}]
    frames.put('d', 5)
    assert frames.close() == {'d': 5}


@pytest.mark.skipif(importlib.util.find_spec('launch_ros') is None,
                    reason='launch_ros is an apt package of a ROS install; no PyPI wheel')
def test_launch_file_declares_documented_arguments():
    spec = importlib.util.spec_from_file_location(
        'perception_launch', ROOT / 'launch' / 'perception.launch.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from launch.actions import DeclareLaunchArgument
    arguments = {action.name: action for action in module.generate_launch_description().entities
                 if isinstance(action, DeclareLaunchArgument)}
    assert {'params_file', 'namespace', 'image_topics', 'device', 'checkpoint',
            'log_level'} <= set(arguments)
    assert all(argument.description for argument in arguments.values())


def test_labels_parameter_names_only_a_checkpoints_placeholder_classes():
    assert choose_labels(['class_0', 'class_1'], ['door', 'wall']) == ['door', 'wall']
    assert choose_labels(['class_0', 'class_1'], ['door']) == ['class_0', 'class_1']
    assert choose_labels(['hall', 'room'], ['door', 'wall']) == ['hall', 'room']


def test_scene_record_carries_the_source_header_results_and_stage_times():
    times = StageTimes(preprocess_ms=1.0, forward_ms=2.0, postprocess_ms=0.5, batch_size=3)
    record = scene_record('/cam', (12, 34), 'front', [('hall', 0.7), ('room', 0.2)], times, 4.0)
    assert record == {
        'topic': '/cam', 'stamp': {'sec': 12, 'nanosec': 34}, 'frame_id': 'front',
        'label': 'hall', 'score': 0.7,
        'top_k': [{'label': 'hall', 'score': 0.7}, {'label': 'room', 'score': 0.2}],
        'latency_ms': {'preprocess': 1.0, 'forward': 2.0, 'postprocess': 0.5,
                       'receive_to_publish': 4.0},
        'batch_size': 3}
    assert scene_record('/cam', (0, 0), '', [], times, 1.0)['label'] is None


# -- start-up validation, reloads, ids, stamps, logs, supervision (issue: never go dark) --------

def test_startup_values_pass_the_same_validation_as_live_ones():
    assert validate_startup(dict(CURRENT)) is None
    reason = validate_startup({**CURRENT, 'qos.reliability': 'Reliable'})
    assert 'qos.reliability must be one of best_effort, reliable' in reason
    assert 'image_topics has duplicates' in validate_startup(
        {**CURRENT, 'image_topics': ['/cam', '/cam']})
    assert 'read-only' not in (validate_startup({**CURRENT, 'autostart': False}) or '')


def test_a_truncated_or_foreign_checkpoint_is_refused_before_anything_is_torn_down(tmp_path):
    import torch
    from cnn_rnn_perception.core.checkpoint import save_checkpoint
    from cnn_rnn_perception.core.model import CnnRnnClassifier
    from cnn_rnn_perception.core.model_config import ModelConfig
    good = tmp_path / 'good.pt'
    save_checkpoint(good, CnnRnnClassifier(ModelConfig(input_size=(64, 64), hidden_size=4)))
    truncated = tmp_path / 'truncated.pt'
    truncated.write_bytes(good.read_bytes()[:-200])
    foreign = tmp_path / 'foreign.pt'
    torch.save({'weights': torch.zeros(2)}, foreign)
    assert validate({'model.checkpoint': str(good)}, CURRENT) is None
    reason = validate({'model.checkpoint': str(truncated)}, CURRENT)
    assert 'truncated, or not a torch file' in reason
    assert 'is not a cnn_rnn_perception checkpoint' in validate(
        {'model.checkpoint': str(foreign)}, CURRENT)


def test_a_gpu_the_machine_does_not_have_is_refused_with_the_count():
    import torch
    reason = validate({'device': f'cuda:{torch.cuda.device_count() + 2}'}, CURRENT)
    assert reason is not None and 'CUDA' in reason


def test_only_values_that_differ_from_the_running_engine_need_a_reload():
    running = dict(CURRENT)
    assert needs_reload({'model.pooling': 'mean'}, running) == ['model.pooling']
    # Setting a value back to what runs (a failed reload's revert) needs nothing.
    assert needs_reload({'model.pooling': running['model.pooling']}, running) == []
    assert needs_reload({'top_k': 3}, running) == []


def test_class_ids_are_the_label_map_indices_as_text():
    labels = ['corridor', 'door', 'blocked']
    assert class_hypotheses([('blocked', 0.7), ('corridor', 0.2)], labels) == [
        ('2', 0.7), ('0', 0.2)]


def test_messages_the_node_originates_never_carry_a_zero_stamp():
    assert stamp_now(ros_now_ns=5_000, wall_ns=9_000) == 5_000
    assert stamp_now(ros_now_ns=0, wall_ns=9_000) == 9_000  # sim time, no /clock yet


def test_the_rejection_log_limiter_stays_bounded_whatever_the_reasons():
    log = RateLimitedLog(period_s=5.0, max_entries=16)
    for size in range(10_000):  # reasons that carry a number are all different
        assert log.should_log('/cam', f'truncated image: {size} bytes', now=1.0)
    assert len(log) == 16
    assert not log.should_log('/cam', 'truncated image: 9999 bytes', now=2.0)
    assert log.should_log('/cam', 'truncated image: 9999 bytes', now=6.5)


def test_frames_arriving_with_none_classified_is_an_error_naming_the_cause():
    stats = CameraStats('/cam')
    stats.on_received()
    stats.on_classified(5.0)
    assert stats.snapshot(silent_after_s=0.05)['level'] == 0
    time.sleep(0.12)
    stats.on_received()
    stats.on_received()
    snap = stats.snapshot(silent_after_s=0.05, stalled_after_s=0.1, cause='model loading')
    assert snap['level'] == 2
    assert 'none classified for' in snap['message'] and 'model loading' in snap['message']
    stats.on_classified(5.0)
    assert stats.snapshot(silent_after_s=1.0)['level'] == 0


def test_every_bad_file_a_parameter_names_is_refused_with_its_reason(tmp_path):
    # Each of these once escaped the checks as IsADirectoryError, PermissionError, KeyError
    # or AttributeError (and a FIFO blocked the callback): the node died or hung.
    for name, (path, words) in bad_policy_files(tmp_path / 'policy').items():
        reason = policy_problem(str(path), list(CURRENT['labels']))
        assert reason and reason.startswith('navigation.policy_file') and words in reason, (
            name, reason)
    onnx_backend = {**CURRENT, 'backend': 'onnxruntime'}
    for name, (path, words) in bad_model_files(tmp_path / 'models').items():
        reason = validate({'model.checkpoint': str(path)}, onnx_backend)
        assert reason and reason.startswith('model.checkpoint') and words in reason, (
            name, reason)
    for name, (path, words) in common_bad_files(tmp_path / 'weights').items():
        reason = validate({'model.trunk_weights': str(path)}, CURRENT)
        assert reason and words in reason, (name, reason)


@pytest.mark.parametrize('topic,words', [
    ('/front/1cam/image_raw', 'token must not start with a number'),
    ('/front//image_raw', "must not contain repeated '/'"),
    ('/front/image_raw/', 'must not end with a forward slash'),
    ('/front camera/image_raw', 'must not contain characters other than'),
    ('{robot}/image_raw', 'unknown substitution'),
    ('', 'must not be empty'),
])
def test_topic_names_are_checked_by_rclpy_when_set(topic, words):
    reason = validate({'image_topics': ['/ok/image_raw', topic]}, CURRENT)
    assert reason.startswith(f'image_topics: {topic!r} is not a valid topic name') \
        and words in reason, reason


def test_relative_private_and_substituted_topic_names_are_accepted():
    assert validate({'image_topics': ['camera/image_raw', '~/image', '/{node}/image',
                                      '/rear/image_raw/compressed']}, CURRENT) is None
