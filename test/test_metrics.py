"""The scores of predictions: accuracy and confusion, flicker, switch delay, the decision's."""

from cnn_rnn_perception.core.navigation import UNKNOWN
from cnn_rnn_perception.tools.evaluation.metrics import (
    ChangeCount, decision_changes, flicker, Prediction, score)
import pytest


def test_scores_count_precision_recall_and_confusion():
    scores = score(['a', 'a', 'b', 'b'], ['a', 'b', 'b', 'b'], ['a', 'b', 'c'])
    assert scores['accuracy'] == 0.75
    assert scores['confusion'] == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    assert scores['per_class']['b'] == {'precision': 2 / 3, 'recall': 1.0, 'support': 2}
    assert scores['per_class']['c']['precision'] is None


def _prediction(topic: str, stamp: float, label: str, truth: str) -> Prediction:
    return Prediction(bag='b', topic=topic, stamp=stamp, frame_id='', label=label, score=1.0,
                      top_k=[(label, 1.0)], truth=truth)


def test_flicker_counts_label_changes_per_minute_of_each_stream_against_the_truth():
    # Two streams of 30 s each (1 minute in all). cam_a: the truth changes once, the
    # prediction 5 times (a brief flip and back, twice, plus the real change); cam_b steady.
    truth = ['x'] * 15 + ['y'] * 15
    guess = ['x', 'x', 'y', 'x'] + ['x'] * 5 + ['y', 'x'] + ['x'] * 4 + ['y'] * 15
    predictions = [_prediction('/a', 30 / 29 * i, g, t) for i, (g, t) in
                   enumerate(zip(guess, truth))]
    predictions += [_prediction('/b', 100 + 30 / 29 * i, 'x', 'x') for i in range(30)][::-1]
    result = flicker(predictions)
    assert result['flicker_per_min'] == pytest.approx(5.0)
    assert result['truth_changes_per_min'] == pytest.approx(1.0)
    assert result['flicker_ratio'] == pytest.approx(5.0)
    assert result['excess_flicker_per_min'] == pytest.approx(4.0)
    # The two brief flips are far from the real change; the real change is not spurious.
    assert result['spurious_changes_per_min'] == pytest.approx(4.0)
    # A flip right beside the real change (a transition) is not spurious.
    near = [_prediction('/c', i / 10, g, t) for i, (g, t) in enumerate(
        zip(['x'] * 9 + ['z', 'y'] + ['y'] * 9, ['x'] * 10 + ['y'] * 10))]
    assert flicker(near)['spurious_changes_per_min'] == 0.0
    assert flicker(near)['excess_flicker_per_min'] > 0


def test_change_count_counts_spurious_changes_and_measures_the_switch_delay():
    stamps = [index / 10 for index in range(60)]
    truths = ['a'] * 30 + ['b'] * 30
    said = ['a'] * 10 + ['c'] * 2 + ['a'] * 18 + ['a'] * 4 + ['b'] * 26
    count = ChangeCount()
    count.add(stamps, said, truths, transition_s=0.5)
    # a->c and c->a are spurious (far from the change at 3.0 s); a->b at 3.4 s is the switch.
    assert (count.changes, count.spurious, count.true_changes) == (3, 2, 1)
    assert count.switch_delays_s == [pytest.approx(0.4)]
    late = ChangeCount()
    late.add(stamps, ['a'] * 38 + ['b'] * 22, truths, transition_s=0.5)
    # A switch later than 0.5 s is both late (its delay) and a change far from the truth's.
    assert late.switch_delays_s == [pytest.approx(0.8)] and late.spurious == 1
    missed = ChangeCount()
    missed.add(stamps, ['a'] * 60, truths, transition_s=0.5)
    assert missed.missed_switches == 1 and missed.spurious == 0


def test_decision_counts_fuse_a_bags_cameras_into_one_stream():
    predictions = []
    for camera in ('/front', '/rear'):
        for index in range(30):
            truth = 'a' if index < 15 else 'b'
            predictions.append(Prediction(bag='drive', topic=camera, stamp=index / 10 + 0.01 * (
                camera == '/rear'), frame_id='', label=truth, score=1.0, top_k=[], truth=truth,
                decision=UNKNOWN if index < 4 else ('a' if index < 19 else 'b')))
    counts = decision_changes(predictions)
    assert counts['decision_switch_delay_p50_s'] == pytest.approx(0.4)
    assert counts['decision_spurious_changes_per_min'] == 0.0
    assert counts['decision_accuracy'] == pytest.approx((60 - 2 * 8) / 60)


def test_predictions_without_any_truth_score_nothing_rather_than_zero():
    from cnn_rnn_perception.tools.evaluation.metrics import scores_of
    unlabelled = [Prediction(bag='b', topic='/a', stamp=i / 10, frame_id='', label='x',
                             score=1.0, top_k=[]) for i in range(5)]
    assert scores_of(unlabelled, ['x']) == {'accuracy': None, 'scored_frames': 0}
    labelled = [Prediction(bag='b', topic='/a', stamp=i / 10, frame_id='', label='x',
                           score=1.0, top_k=[], truth='x' if i < 3 else 'y') for i in range(6)]
    scores = scores_of(labelled, ['x', 'y'])
    assert scores['accuracy'] == 0.5 and scores['truth_changes_per_min'] > 0
