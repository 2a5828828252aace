"""Class probabilities to what consumers read: top-k with labels, and temporal smoothing."""

from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np


def top_k(probabilities: np.ndarray, k: int, labels: Sequence[str],
          score_threshold: float = 0.0) -> list[tuple[str, float]]:
    """Return up to ``k`` (label, score) pairs, best first, each scoring >= the threshold."""
    if k < 1:
        raise ValueError('top_k must be >= 1')
    if len(labels) != len(probabilities):
        raise ValueError(f'{len(labels)} labels for {len(probabilities)} classes')
    k = min(k, len(probabilities))
    best = np.argpartition(-probabilities, k - 1)[:k]
    best = best[np.argsort(-probabilities[best], kind='stable')]
    return [(labels[i], float(probabilities[i])) for i in best
            if probabilities[i] >= score_threshold]


class ProbabilitySmoother:
    """
    Exponential moving average of class probabilities, one history per camera.

    ``smoothing`` is the weight of the history: 0 turns smoothing off, 0.8 keeps 80% of the
    previous estimate. A camera whose frames stop for longer than ``reset_after_s`` (by the
    frames' own stamps) starts afresh, so a scene seen minutes ago does not bleed into now.
    """

    def __init__(self, smoothing: float = 0.0, reset_after_s: float = 2.0) -> None:
        self._history: dict[Hashable, tuple[float, np.ndarray]] = {}
        self.configure(smoothing, reset_after_s)

    def configure(self, smoothing: float, reset_after_s: float) -> None:
        """Change the settings live; histories are kept."""
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f'smoothing must be in [0, 1); got {smoothing}')
        if reset_after_s <= 0.0:
            raise ValueError(f'smoothing_reset_s must be > 0; got {reset_after_s}')
        self.smoothing = smoothing
        self.reset_after_s = reset_after_s

    def update(self, camera: Hashable, stamp_s: float, probabilities: np.ndarray) -> np.ndarray:
        """Fold a frame's probabilities into its camera's history and return the estimate."""
        previous = self._history.get(camera)
        fresh = (previous is None or self.smoothing == 0.0
                 or not 0.0 <= stamp_s - previous[0] <= self.reset_after_s
                 or previous[1].shape != probabilities.shape)
        estimate = probabilities if fresh else (
            self.smoothing * previous[1] + (1.0 - self.smoothing) * probabilities)
        self._history[camera] = (stamp_s, estimate)
        return estimate

    def rank(self, camera: Hashable, stamp_s: float, probabilities: np.ndarray, k: int,
             labels: Sequence[str], score_threshold: float = 0.0
             ) -> tuple[np.ndarray, list[tuple[str, float]]]:
        """
        Fold a frame into its camera's history; return the estimate and its ranking.

        The one place where a frame's reported classes are decided, for the node and for
        ``evaluate`` alike; with smoothing 0 it is the frame's own ranking. The estimate is
        what the robot's scene fuses (``core.navigation``).
        """
        estimate = self.update(camera, stamp_s, probabilities)
        return estimate, top_k(estimate, k, labels, score_threshold)

    def reset(self) -> None:
        """Forget every camera's history."""
        self._history.clear()
