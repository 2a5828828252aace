"""The temporal demo's drive cache: drawn once, grown by --held-out, never half-written."""

from unittest import mock

from cnn_rnn_perception.tools.synthetic import synth
from cnn_rnn_perception.tools.temporal_demo import prepare_drives


def test_drives_are_drawn_once_a_larger_held_out_set_adds_only_the_new_ones(tmp_path):
    drawn = []

    def draw(path, **_):
        assert not path.exists(), f'{path} was not cleared before drawing'
        path.mkdir(parents=True)
        drawn.append(path.name)

    # A bag left by an interrupted run (or an older cache) has no marker: drawn again.
    (tmp_path / 'drives' / 'ego-motion' / 'train_0' / 'half.db3').parent.mkdir(parents=True)
    with mock.patch.object(synth, 'write_ego_motion_drive', draw), \
            mock.patch.object(synth, 'write_recording', draw):
        first = prepare_drives(tmp_path, {'ego-motion': 1, 'occluded scenes': 1})
        assert len(drawn) == 8 + 1 + 16 + 1 and 'train_0' in drawn
        drawn.clear()
        grown = prepare_drives(tmp_path, {'ego-motion': 1, 'occluded scenes': 3})
    assert drawn == ['held_out_101', 'held_out_102']
    assert grown['ego-motion'] == first['ego-motion']
    assert grown['occluded scenes']['held_out'][:1] == first['occluded scenes']['held_out']
