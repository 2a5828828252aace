"""The CNN-RNN model: shapes, sequencing, pooling, presets, weights and checkpoints."""

import itertools

from cnn_rnn_perception.core.checkpoint import load_checkpoint, save_checkpoint
from cnn_rnn_perception.core.model import CnnRnnClassifier
from cnn_rnn_perception.core.model_config import (
    ModelConfig, POOLINGS, Preprocessing, preset, RNNS, SEQUENCES)
import pytest
import torch
import torchvision

# 64x96 input gives resnet18 a 2x3 feature map: rows and columns differ, models stay small.
SMALL = {'backbone': 'resnet18', 'input_size': (64, 96), 'hidden_size': 8, 'num_classes': 4}


def small_model(**overrides) -> CnnRnnClassifier:
    torch.manual_seed(0)
    return CnnRnnClassifier(ModelConfig(**{**SMALL, **overrides})).eval()


def known_feature_map(batch=2, channels=3, height=4, width=6) -> torch.Tensor:
    """Value = b * 1e6 + c * 1e4 + h * 100 + w, so every element names its own position."""
    b, c, h, w = torch.meshgrid(*(torch.arange(n) for n in (batch, channels, height, width)),
                                indexing='ij')
    return (b * 1_000_000 + c * 10_000 + h * 100 + w).double()


def sequencer(sequence: str, strip: int = 1) -> CnnRnnClassifier:
    """Return a model whose to_sequence reads any feature map its strip divides."""
    # 128x128 gives resnet18 a 4x4 map, so a config with strip 2 is valid.
    return small_model(sequence=sequence, strip=strip, input_size=(128, 128))


@pytest.mark.parametrize('sequence,rnn,pooling,bidirectional',
                         list(itertools.product(SEQUENCES, RNNS, POOLINGS, (False, True))))
def test_output_shape_for_every_combination(sequence, rnn, pooling, bidirectional):
    model = small_model(sequence=sequence, rnn=rnn, pooling=pooling,
                        bidirectional=bidirectional)
    with torch.no_grad():
        logits = model(torch.randn(3, 3, 64, 96))
    assert logits.shape == (3, 4)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize('sequence,strip,length,step', [
    ('spatial', 1, 2 * 3, 512),
    ('rows', 1, 2, 512 * 1 * 3),
    ('columns', 1, 3, 512 * 2 * 1),
])
def test_sequence_length_and_step_size(sequence, strip, length, step):
    model = small_model(sequence=sequence, strip=strip)
    assert (model.config.sequence_length, model.config.step_size) == (length, step)
    with torch.no_grad():
        sequence_tensor = model.to_sequence(model.features(torch.randn(2, 3, 64, 96)))
    assert sequence_tensor.shape == (2, length, step)


def test_spatial_timesteps_are_locations_in_raster_order():
    feature_map = known_feature_map()
    sequence = sequencer('spatial').to_sequence(feature_map)
    assert sequence.shape == (2, 4 * 6, 3)
    for t in range(4 * 6):
        assert torch.equal(sequence[:, t], feature_map[:, :, t // 6, t % 6])


@pytest.mark.parametrize('strip', [1, 2])
def test_row_timesteps_hold_exactly_their_strip(strip):
    feature_map = known_feature_map()
    sequence = sequencer('rows', strip).to_sequence(feature_map)
    assert sequence.shape == (2, 4 // strip, 3 * strip * 6)
    for t in range(4 // strip):
        expected = feature_map[:, :, t * strip:(t + 1) * strip, :].reshape(2, -1)
        assert torch.equal(sequence[:, t], expected)


@pytest.mark.parametrize('strip', [1, 2])
def test_column_timesteps_hold_exactly_their_strip(strip):
    feature_map = known_feature_map()
    sequence = sequencer('columns', strip).to_sequence(feature_map)
    assert sequence.shape == (2, 6 // strip, 3 * 4 * strip)
    for t in range(6 // strip):
        expected = feature_map[:, :, :, t * strip:(t + 1) * strip].reshape(2, -1)
        assert torch.equal(sequence[:, t], expected)


def test_the_seeds_strip_reshape_would_fail_the_strip_check():
    """The check above catches the seed's bug: its timesteps cut across channels and rows."""
    feature_map = known_feature_map()
    strip = 2
    seed_steps = torch.cat([
        feature_map[:, :, i * strip:(i + 1) * strip, :].reshape(2, -1, 3 * strip)
        for i in range(4 // strip)], dim=1)
    first_step = seed_steps[0, 0]
    channels_in_first_step = {int(v) // 10_000 % 100 for v in first_step.tolist()}
    assert seed_steps.shape[1:] == (4 // strip * 6, 3 * strip)  # a step per column, not strip
    assert channels_in_first_step == {0}  # a real strip step holds all 3 channels
    assert set(first_step.tolist()) != set(feature_map[0, :, 0:strip, :].flatten().tolist())


def test_recurrent_head_sees_strip_order_where_global_average_pooling_does_not():
    model = small_model(sequence='columns')
    torch.manual_seed(1)
    feature_map = torch.randn(1, 512, 2, 3)
    reversed_columns = feature_map.flip(dims=[3])

    def recurrent_logits(fmap):
        outputs, final_state = model.encode(model.to_sequence(fmap))
        return model.head(model.pool(outputs, final_state))

    gap_head = torch.nn.Linear(512, 4)
    with torch.no_grad():
        assert not torch.allclose(recurrent_logits(feature_map),
                                  recurrent_logits(reversed_columns), atol=1e-6)
        assert torch.allclose(gap_head(feature_map.mean(dim=(2, 3))),
                              gap_head(reversed_columns.mean(dim=(2, 3))), atol=1e-6)


@pytest.mark.parametrize('rnn,num_layers', [('lstm', 1), ('gru', 1), ('lstm', 2)])
def test_last_pooling_of_bidirectional_uses_each_directions_final_state(rnn, num_layers):
    model = small_model(rnn=rnn, num_layers=num_layers, bidirectional=True, pooling='last')
    hidden = model.config.hidden_size
    sequence = torch.randn(2, 6, model.config.step_size)
    with torch.no_grad():
        outputs, final_state = model.encode(sequence)
        pooled = model.pool(outputs, final_state)
    forward_final = outputs[:, -1, :hidden]   # forward direction after reading everything
    backward_final = outputs[:, 0, hidden:]   # backward direction after reading everything
    assert torch.allclose(pooled, torch.cat([forward_final, backward_final], dim=1))
    # The seed's outputs[:, -1] holds the backward direction after one element only.
    assert not torch.allclose(pooled, outputs[:, -1])


def test_gradients_reach_the_trunk():
    model = small_model(sequence='rows', pooling='attention').train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 96)),
                                             torch.tensor([0, 3]))
    loss.backward()
    first_conv = model.trunk[0].weight.grad
    assert first_conv is not None and first_conv.abs().sum() > 0


@pytest.mark.parametrize('temporal,motion', [('gru', 'frame_difference'),
                                             ('lstm', 'frame_difference'), ('gru', 'none')])
def test_a_clip_equals_its_frames_stepped_one_at_a_time_with_the_state_carried(temporal, motion):
    model = small_model(temporal=temporal, temporal_hidden_size=8, motion=motion).eval()
    clips = torch.randn(2, 4, 3, 64, 96)
    with torch.no_grad():
        whole, final = model.forward_clips(clips)
        state = model.zero_state(2)
        for step in range(4):
            frame = clips[:, step]
            vectors = model.frame_vectors(model.trunk_input(frame, state))
            logits, state = model.temporal_step(vectors, state, frame)
            torch.testing.assert_close(logits, whole[:, step], atol=1e-5, rtol=1e-5)
        # Two halves with the state handed over: truncated back-propagation reads the same.
        _, half = model.forward_clips(clips[:, :2])
        second, _ = model.forward_clips(clips[:, 2:], half)
    torch.testing.assert_close(state, final)
    torch.testing.assert_close(second, whole[:, 2:], atol=1e-5, rtol=1e-5)
    # The first frame of a fresh stream is what plain forward gives; later ones differ.
    torch.testing.assert_close(model(clips[:, 0]), whole[:, 0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(whole[:, 1], model(clips[:, 1]), atol=1e-4)


def test_only_real_frames_of_a_clip_reach_the_trunk_and_its_batchnorm():
    model = small_model(temporal='gru', temporal_hidden_size=8).train()
    clips = torch.randn(3, 4, 3, 64, 96)
    valid = torch.tensor([[True] * 4, [True, True, False, False], [False] * 4])
    seen = []
    hook = model.trunk.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0]))
    try:
        logits, _ = model.forward_clips(clips, valid=valid)
    finally:
        hook.remove()
    assert len(seen) == 1 and len(seen[0]) == int(valid.sum())
    # The frames that reached it are the real ones, with their change from the frame before.
    torch.testing.assert_close(seen[0][:, :3], clips[valid])
    torch.testing.assert_close(seen[0][5, 3:], clips[1, 1] - clips[1, 0])
    assert logits.shape == (3, 4, model.config.num_classes) and torch.isfinite(logits).all()


def test_the_trunk_sees_motion_only_in_a_temporal_model_and_costs_a_per_frame_one_nothing():
    per_frame = small_model()
    temporal = small_model(temporal='gru', temporal_hidden_size=8)
    assert per_frame.trunk[0].in_channels == 3 and temporal.trunk[0].in_channels == 6
    assert small_model(temporal='gru', motion='none').trunk[0].in_channels == 3
    # A fresh stream has no previous frame: its change reads zero, so the first frame is
    # classified from the image alone, whatever was kept before.
    images = torch.randn(2, 3, 64, 96)
    fresh = temporal.trunk_input(images, temporal.zero_state(2))
    assert (fresh[:, 3:] == 0).all()
    # Temporal checkpoints written before the trunk saw motion keep reading vectors only.
    old = {k: v for k, v in temporal.config.to_dict().items() if k != 'motion'}
    assert ModelConfig.from_dict(old).motion == 'none'


def test_the_temporal_stage_is_off_by_default_and_recorded_in_the_checkpoint(tmp_path):
    assert ModelConfig().temporal == '' and small_model().temporal is None
    old_style = {k: v for k, v in small_model().config.to_dict().items()
                 if not k.startswith('temporal')}
    assert ModelConfig.from_dict(old_style).temporal == ''  # checkpoints from before load
    model = small_model(temporal='lstm', temporal_hidden_size=8)
    save_checkpoint(tmp_path / 'temporal.pt', model)
    loaded = load_checkpoint(tmp_path / 'temporal.pt')
    assert loaded.config.temporal == 'lstm' and loaded.model.temporal is not None
    with pytest.raises(ValueError, match='temporal must be one of'):
        ModelConfig(temporal='transformer')


@pytest.mark.parametrize('name,sequence,bidirectional', [
    ('seed-spatial', 'spatial', False),
    ('seed-rows', 'rows', False),
    ('seed-bidirectional', 'spatial', True),
])
def test_presets_reproduce_the_seed_examples(name, sequence, bidirectional):
    config = preset(name)
    assert (config.backbone, config.sequence, config.bidirectional) == \
        ('resnet18', sequence, bidirectional)
    assert (config.num_classes, config.hidden_size) == (10, 256)
    assert config.sequence_length == 49 if sequence == 'spatial' else 7
    model = CnnRnnClassifier(preset(name, input_size=(64, 64), hidden_size=8))
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize('overrides,message', [
    ({'num_classes': 0}, 'num_classes must be >= 1'),
    ({'backbone': 'resnet9000'}, "backbone 'resnet9000' is not supported; choose one of"),
    ({'sequence': 'diagonal'}, 'sequence must be one of spatial, rows, columns'),
    ({'rnn': 'transformer'}, 'rnn must be one of lstm, gru'),
    ({'pooling': 'sum'}, 'pooling must be one of last, mean, max, attention'),
    ({'hidden_size': 0}, 'hidden_size must be >= 1'),
    ({'num_layers': 0}, 'num_layers must be >= 1'),
    ({'dropout': 1.0}, 'dropout must be in [0, 1)'),
    ({'input_size': (16, 16)}, 'input_size must be (height, width), each at least 32'),
    ({'input_size': (64, 64, 3)}, 'input_size must be (height, width)'),
    ({'strip': 0, 'sequence': 'rows'}, 'strip must be >= 1'),
    ({'strip': 2}, 'set strip=1 for sequence spatial'),
    ({'strip': 4, 'sequence': 'rows'},
     'strip=4 does not divide the feature map height 7 (resnet18 at input_size (224, 224)); '
     'use a strip in [1, 7]'),
    ({'strip': 2, 'sequence': 'columns', 'input_size': (224, 96)},
     'strip=2 does not divide the feature map width 3'),
])
def test_invalid_configs_raise_naming_the_field_and_fix(overrides, message):
    with pytest.raises(ValueError) as error:
        ModelConfig(**overrides)
    assert message in str(error.value)


def test_unknown_preset_and_unknown_config_keys_raise():
    with pytest.raises(ValueError, match='unknown preset'):
        preset('seed-transformer')
    with pytest.raises(ValueError, match=r"unknown model config fields \['colour'\]"):
        ModelConfig.from_dict({'colour': 'red'})


def test_every_listed_backbone_builds_and_classifies():
    for backbone in ('resnet18', 'resnet34', 'resnet50', 'mobilenet_v3_small',
                     'mobilenet_v3_large', 'efficientnet_b0', 'vgg16'):
        model = small_model(backbone=backbone, input_size=(64, 64))
        with torch.no_grad():
            assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4), backbone


def test_pretrained_trunk_loads_a_local_torchvision_file(tmp_path):
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / 'resnet18.pth'
    torch.save(reference.state_dict(), path)
    model = small_model(trunk_weights=str(path))
    assert torch.equal(model.trunk[0].weight, reference.conv1.weight)
    assert torch.equal(model.trunk[7][1].conv2.weight, reference.layer4[1].conv2.weight)


def test_missing_or_mismatched_pretrained_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='download https://.*resnet18.*pass its path'):
        small_model(trunk_weights=str(tmp_path / 'nope.pth'))
    wrong = tmp_path / 'mobilenet.pth'
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), wrong)
    with pytest.raises(ValueError, match='does not fit backbone resnet18: .* missing: '):
        small_model(trunk_weights=str(wrong))


def test_checkpoint_round_trip_rebuilds_the_model_from_the_file_alone(tmp_path):
    model = small_model(sequence='columns', rnn='gru', bidirectional=True, pooling='attention')
    labels = ['corridor', 'open_space', 'doorway_left', 'doorway_right']
    preprocessing = Preprocessing(input_size=(64, 96), color_order='bgr')
    path = tmp_path / 'model.pt'
    save_checkpoint(path, model, labels=labels, preprocessing=preprocessing,
                    extra={'epoch': 3})
    # Everything in the file must be readable with weights_only=True.
    assert torch.load(path, weights_only=True)['labels'] == labels
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    assert loaded.labels == labels
    assert loaded.preprocessing == preprocessing
    assert loaded.extra == {'epoch': 3}
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(loaded.model(images), model(images))


def test_checkpoint_whose_weights_do_not_match_its_config_is_rejected(tmp_path):
    path = tmp_path / 'model.pt'
    save_checkpoint(path, small_model())
    payload = torch.load(path, weights_only=True)
    payload['config']['hidden_size'] = 16
    torch.save(payload, path)
    with pytest.raises(ValueError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert 'weights do not match its config' in message
    assert 'rnn.weight_hh_l0' in message and 'head.weight' in message


def test_missing_unreadable_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='checkpoint not found'):
        load_checkpoint(tmp_path / 'missing.pt')
    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='cannot read checkpoint'):
        load_checkpoint(garbage)
    foreign = tmp_path / 'foreign.pt'
    torch.save({'state_dict': {}}, foreign)
    with pytest.raises(ValueError, match='is not a cnn_rnn_perception checkpoint'):
        load_checkpoint(foreign)


def test_save_rejects_labels_that_do_not_match_the_classes(tmp_path):
    with pytest.raises(ValueError, match='3 labels for a model with 4 classes'):
        save_checkpoint(tmp_path / 'model.pt', small_model(), labels=['a', 'b', 'c'])


def test_small_inputs_with_a_one_by_one_feature_map_are_valid():
    config = ModelConfig(input_size=(32, 32), hidden_size=8)
    assert config.feature_map == (1, 1)
    model = CnnRnnClassifier(config).train()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 6)
