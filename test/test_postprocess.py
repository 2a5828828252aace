"""Top-k selection and per-camera probability smoothing."""

from cnn_rnn_perception.core.postprocess import ProbabilitySmoother, top_k
import numpy as np
import pytest

LABELS = ['a', 'b', 'c', 'd']


def test_top_k_is_sorted_thresholded_and_capped():
    probabilities = np.array([0.1, 0.5, 0.15, 0.25])
    assert top_k(probabilities, 2, LABELS) == [('b', 0.5), ('d', 0.25)]
    assert [label for label, _ in top_k(probabilities, 10, LABELS)] == ['b', 'd', 'c', 'a']
    assert top_k(probabilities, 4, LABELS, score_threshold=0.2) == [('b', 0.5), ('d', 0.25)]
    with pytest.raises(ValueError, match='top_k must be >= 1'):
        top_k(probabilities, 0, LABELS)
    with pytest.raises(ValueError, match='3 labels for 4 classes'):
        top_k(probabilities, 1, LABELS[:3])


def test_smoothing_off_passes_probabilities_through():
    smoother = ProbabilitySmoother(0.0)
    first = np.array([1.0, 0.0])
    smoother.update('cam', 0.0, first)
    second = np.array([0.0, 1.0])
    np.testing.assert_array_equal(smoother.update('cam', 0.1, second), second)


def test_smoothing_is_an_exponential_moving_average_per_camera():
    smoother = ProbabilitySmoother(0.75, reset_after_s=1.0)
    smoother.update('front', 0.0, np.array([1.0, 0.0]))
    smoother.update('rear', 0.0, np.array([0.0, 1.0]))
    np.testing.assert_allclose(smoother.update('front', 0.1, np.array([0.0, 1.0])), [0.75, 0.25])
    np.testing.assert_allclose(smoother.update('rear', 0.1, np.array([0.0, 1.0])), [0.0, 1.0])


def test_history_resets_after_a_gap_or_when_time_goes_backwards():
    smoother = ProbabilitySmoother(0.9, reset_after_s=0.5)
    smoother.update('cam', 10.0, np.array([1.0, 0.0]))
    after_gap = smoother.update('cam', 11.0, np.array([0.0, 1.0]))
    np.testing.assert_array_equal(after_gap, [0.0, 1.0])
    looped_bag = smoother.update('cam', 2.0, np.array([1.0, 0.0]))
    np.testing.assert_array_equal(looped_bag, [1.0, 0.0])


def test_invalid_smoothing_settings_raise():
    with pytest.raises(ValueError, match=r'smoothing must be in \[0, 1\)'):
        ProbabilitySmoother(1.0)
    with pytest.raises(ValueError, match='smoothing_reset_s must be > 0'):
        ProbabilitySmoother(0.5, reset_after_s=0.0)
