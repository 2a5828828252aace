"""
Scores of a run's predictions: accuracy and confusion, flicker, switch delay, the decision's.

Pure functions over ``Prediction`` records, so a model run by ``evaluate``, a replay's
recorded ``~/scene`` output and a test's hand-made sequence are scored by the same code.
*Flicker* counts how often the label changes per minute of each stream (one bag's topic)
against how often the ground truth itself changes: a navigation stack acts on every change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np


@dataclass
class Prediction:
    """One frame's prediction, as written to the predictions file."""

    bag: str
    topic: str
    stamp: float
    frame_id: str
    label: str
    score: float
    top_k: list[tuple[str, float]]
    truth: str | None = None
    # The robot's decided scene after this frame (its bag's cameras fused; core.navigation).
    decision: str | None = None


# What a frame's label is when no class reached the node's score_threshold.
NO_LABEL = '(none)'


def score(truths: Sequence[str], predicted: Sequence[str], labels: Sequence[str]
          ) -> dict[str, Any]:
    """Return accuracy, per-class precision/recall and the confusion matrix (rows: truth)."""
    classes = list(labels) + sorted((set(truths) | set(predicted)) - set(labels))
    index = {label: position for position, label in enumerate(classes)}
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    for truth, guess in zip(truths, predicted):
        confusion[index[truth], index[guess]] += 1
    total = int(confusion.sum())
    per_class = {}
    for position, label in enumerate(classes):
        true_positive = int(confusion[position, position])
        predicted_count = int(confusion[:, position].sum())
        support = int(confusion[position].sum())
        per_class[label] = {
            'precision': true_positive / predicted_count if predicted_count else None,
            'recall': true_positive / support if support else None,
            'support': support}
    return {'accuracy': float(np.trace(confusion) / total) if total else None,
            'scored_frames': total, 'labels': classes, 'per_class': per_class,
            'confusion': confusion.tolist()}


@dataclass
class ChangeCount:
    """How one stream of outputs changed against its ground truth."""

    minutes: float = 0.0
    changes: int = 0
    true_changes: int = 0
    spurious: int = 0
    switch_delays_s: list[float] = field(default_factory=list)
    missed_switches: int = 0

    def add(self, stamps: Sequence[float], said: Sequence[str], truths: Sequence[str | None],
            transition_s: float) -> None:
        """
        Count one stream, in stamp order: its changes, the truth's, and how each was met.

        A change is *spurious* when it is further than ``transition_s`` from every change of
        the truth (and from the stream's start, where a decision leaves ``unknown``). After
        each true change, the *switch delay* is how long until the output first equals the
        new truth (0 when it already did within ``transition_s`` before); a true change whose
        new label the output never reaches before the next one is a missed switch.
        """
        if not stamps:
            return
        self.minutes += (stamps[-1] - stamps[0]) / 60.0
        changes = [index for index in range(1, len(said)) if said[index] != said[index - 1]]
        labelled = [index for index, truth in enumerate(truths) if truth is not None]
        real = [index for previous, index in zip(labelled, labelled[1:])
                if truths[index] != truths[previous]]
        for position, index in enumerate(real):
            until = real[position + 1] if position + 1 < len(real) else len(said)
            begin = index
            while begin > 0 and stamps[begin - 1] >= stamps[index] - transition_s:
                begin -= 1
            hit = next((k for k in range(begin, until) if said[k] == truths[index]), None)
            if hit is None:
                self.missed_switches += 1
            else:
                self.switch_delays_s.append(max(stamps[hit] - stamps[index], 0.0))
        moments = np.array([stamps[0]] + [stamps[index] for index in real])
        self.changes += len(changes)
        self.true_changes += len(real)
        self.spurious += sum(1 for index in changes
                             if np.abs(moments - stamps[index]).min() > transition_s)

    def summary(self, prefix: str) -> dict[str, Any]:
        """Return the counts per minute, and the switch delay's p50 and p95, under ``prefix``."""
        delays = np.array(self.switch_delays_s)
        per_minute = (lambda count: count / self.minutes) if self.minutes > 0 else (
            lambda count: None)
        return {
            f'{prefix}changes_per_min': per_minute(self.changes),
            f'{prefix}spurious_changes_per_min': per_minute(self.spurious),
            f'{prefix}switch_delay_p50_s': float(np.percentile(delays, 50)) if len(delays)
            else None,
            f'{prefix}switch_delay_p95_s': float(np.percentile(delays, 95)) if len(delays)
            else None,
            f'{prefix}missed_switches': self.missed_switches,
        }


def streams(predictions: Iterable[Prediction], by_robot: bool) -> list[list[Prediction]]:
    """Return the predictions per stream in stamp order: per bag and topic, or per bag."""
    streams: dict[Any, list[Prediction]] = {}
    for prediction in predictions:
        key = prediction.bag if by_robot else (prediction.bag, prediction.topic)
        streams.setdefault(key, []).append(prediction)
    return [sorted(frames, key=lambda p: p.stamp) for frames in streams.values()]


def flicker(predictions: Iterable[Prediction], transition_s: float = 0.5) -> dict[str, Any]:
    """
    Return label changes per minute, predicted and true, over every stream (bag and topic).

    Each stream is read in stamp order; its minutes run from its first frame to its last.
    ``flicker_ratio`` is predicted over true changes: 1 is a model as steady as the truth, 5
    one that changes its mind five times for every real change. ``excess_flicker_per_min``
    counts the changes beyond the truth's number. ``spurious_changes_per_min`` counts the
    changes that a navigation stack should never see (``ChangeCount.add``): flips while the
    scene stays what it is, as when a figure crosses; a model passing through a third label
    while one scene fades into the next is not counted there.
    """
    count = ChangeCount()
    excess = 0
    for frames in streams(predictions, by_robot=False):
        before = count.changes - count.true_changes
        count.add([p.stamp for p in frames], [p.label for p in frames],
                  [p.truth for p in frames], transition_s)
        excess += max(count.changes - count.true_changes - before, 0)
    if count.minutes <= 0:
        return {'flicker_per_min': None, 'truth_changes_per_min': None,
                'excess_flicker_per_min': None, 'spurious_changes_per_min': None,
                'flicker_ratio': None}
    frame = count.summary('')
    return {'flicker_per_min': frame['changes_per_min'],
            'truth_changes_per_min': count.true_changes / count.minutes,
            'excess_flicker_per_min': excess / count.minutes,
            'spurious_changes_per_min': frame['spurious_changes_per_min'],
            'switch_delay_p50_s': frame['switch_delay_p50_s'],
            'switch_delay_p95_s': frame['switch_delay_p95_s'],
            'missed_switches': frame['missed_switches'],
            'flicker_ratio': count.changes / count.true_changes if count.true_changes else None}


def decision_changes(predictions: Iterable[Prediction], transition_s: float = 0.5
                     ) -> dict[str, Any]:
    """
    Return how the robot's decided scene changed: one stream per bag (its cameras fused).

    The same counts as ``flicker``'s, under ``decision_``: changes and spurious changes per
    minute, switch delay p50/p95 after each true change, missed switches, and the decision's
    accuracy (frames whose decided scene is the true one; ``unknown`` and ``stale`` count
    as wrong).
    """
    count = ChangeCount()
    right = scored = 0
    for frames in streams((p for p in predictions if p.decision is not None), by_robot=True):
        count.add([p.stamp for p in frames], [p.decision for p in frames],
                  [p.truth for p in frames], transition_s)
        right += sum(1 for p in frames if p.truth is not None and p.decision == p.truth)
        scored += sum(1 for p in frames if p.truth is not None)
    if count.minutes <= 0:
        return {}
    return {**count.summary('decision_'),
            'decision_accuracy': right / scored if scored else None}


def scores_of(predictions: Sequence[Prediction], labels: Sequence[str]) -> dict[str, Any]:
    """Return every score of the predictions that have a truth (accuracy None when none)."""
    labelled = [p for p in predictions if p.truth is not None]
    if not labelled:
        return {'accuracy': None, 'scored_frames': 0}
    return {**score([p.truth for p in labelled], [p.label for p in labelled], labels),
            **flicker(predictions), **decision_changes(predictions)}
