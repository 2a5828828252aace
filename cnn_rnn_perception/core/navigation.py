"""
From per-camera classifications to one decision a navigation stack can act on.

A navigation stack does not act on frames. Three pure pieces, shared by the node and by
``evaluate`` (so a team tunes on its bags exactly what runs on the robot):

- ``SceneFusion``: the robot's scene, from each camera's newest probabilities within a
  window, weighted by age;
- ``SceneDecision``: the decided scene, which changes only when a new scene has led for a
  dwell time and by a margin; ``unknown`` when nothing reaches the score threshold, ``stale``
  when perception has gone quiet;
- ``ScenePolicy``: what each decided state means to Nav2 (a speed limit, a controller, a
  planner), read from a YAML file and checked against the model's labels.

All times are the frames' own stamps, in seconds, except staleness, which the caller measures
on a steady clock (a dead camera stops its stamps too).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import math
from pathlib import Path
import threading
from typing import Any, Sequence

from cnn_rnn_perception.core.errors import ConfigurationError, readable_file
import numpy as np

UNKNOWN = 'unknown'
STALE = 'stale'
FUSION_WINDOW_S = 0.5


@dataclass(frozen=True)
class FusedScene:
    """The robot's scene at ``stamp_s``: fused probabilities and who contributed."""

    stamp_s: float
    probabilities: np.ndarray
    cameras: tuple[str, ...]


class SceneFusion:
    """
    Each camera's newest probabilities, combined into one scene for the robot.

    A camera counts while its newest result is at most ``window_s`` older than the newest of
    any camera, with a weight falling linearly from 1 (newest) to 0 (the window's edge): a
    camera that lags a few frames still speaks, one that stopped fades out of the scene.
    """

    def __init__(self, window_s: float = FUSION_WINDOW_S) -> None:
        self._newest: dict[str, tuple[float, np.ndarray]] = {}
        self.configure(window_s)

    def configure(self, window_s: float) -> None:
        """Change the window live; what the cameras said is kept."""
        if window_s <= 0.0:
            raise ValueError(f'the fusion window must be > 0 s; got {window_s}')
        self.window_s = window_s

    def add(self, camera: str, stamp_s: float, probabilities: np.ndarray) -> FusedScene:
        """Take a camera's newest result and return the robot's scene as of it."""
        self._newest[camera] = (stamp_s, np.asarray(probabilities, dtype=np.float64))
        newest = max(stamp for stamp, _ in self._newest.values())
        total = np.zeros_like(self._newest[camera][1])
        weights = 0.0
        cameras = []
        for name, (stamp, values) in sorted(self._newest.items()):
            age = newest - stamp
            if age > self.window_s or values.shape != total.shape:
                continue
            weight = max(1.0 - age / self.window_s, 1e-3)
            total += weight * values
            weights += weight
            cameras.append(name)
        return FusedScene(newest, total / weights, tuple(cameras))

    def forget(self, camera: str | None = None) -> None:
        """Forget one camera (or all): after a reset, or when it is no longer subscribed."""
        if camera is None:
            self._newest.clear()
        else:
            self._newest.pop(camera, None)


def _tunable(default: float, help_text: str, limits: tuple[float, float], *, parameter: str,
             flag: str) -> Any:
    """Declare a decision setting: default, help, range, the node's parameter, evaluate's flag."""
    return field(default=default, metadata={'help': help_text, 'limits': limits,
                                            'parameter': parameter, 'flag': flag})


def decision_fields() -> list[dataclasses.Field]:
    """
    Return DecisionSettings' fields: the one source of their defaults, help and ranges.

    The node's parameters and ``evaluate``'s flags are generated from these, so a team tunes
    on its bags exactly the settings it then sets on the robot.
    """
    return list(dataclasses.fields(DecisionSettings))


@dataclass(frozen=True)
class DecisionSettings:
    """How the cameras' results become the robot's decision; every field can change live."""

    # Chosen on four drawn tuning drives (not the demo's held-out ones) with the demo's
    # per-frame scene model: 0.83 spurious changes a minute against 20.0 per-frame, switch
    # delay p95 0.41 s (margin 0.1: 1.67); a dwell of 0.3 s gave 2.92 and 0.95 s, 0.4 s 5.84
    # and 1.01 s (a switch later than 0.5 s also counts as spurious).
    dwell_s: float = _tunable(
        0.2, 'A new scene must lead this long (by frame stamps) before the decision changes; '
        'also how long the score must stay below score_threshold before it becomes unknown.',
        (0.0, 60.0), parameter='navigation.dwell_s', flag='--dwell-s')
    margin: float = _tunable(
        0.2, "... and lead the decided scene's probability by this much, frame after frame.",
        (0.0, 1.0), parameter='navigation.margin', flag='--margin')
    score_threshold: float = _tunable(
        0.0, "Classes scoring below this are not published; the robot's decision becomes "
        'unknown when its best class stays below this for navigation.dwell_s.', (0.0, 1.0),
        parameter='score_threshold', flag='--score-threshold')
    window_s: float = _tunable(
        FUSION_WINDOW_S, "A camera's newest result counts in the robot's scene while it is at "
        "most this much older than the newest camera's, weighted down with age.",
        (0.01, 10.0), parameter='navigation.window_s', flag='--fusion-window-s')

    def check(self) -> None:
        """Raise ValueError naming the setting that is out of range."""
        for setting in decision_fields():
            low, high = setting.metadata['limits']
            value = getattr(self, setting.name)
            if not low <= value <= high:
                raise ValueError(f'{setting.metadata["parameter"]} must be in [{low:g}, '
                                 f'{high:g}]; got {value}')


@dataclass
class SceneDecision:
    """
    The decided scene: it changes only when a new scene has led for ``dwell_s`` and by ``margin``.

    A frame proposes its leading label, or ``unknown`` when the leader scores below the
    threshold. The proposal must lead the decided label's own probability by the margin (the
    runner-up's, when the decision is ``unknown`` or ``stale``), frame after frame, for the
    dwell time; any frame that breaks the run starts it again. ``stale`` is set from outside
    (nothing classified for too long) and takes effect at once; leaving it takes the dwell.
    """

    settings: DecisionSettings = field(default_factory=DecisionSettings)
    label: str = UNKNOWN
    since_s: float | None = None
    reason: str = 'no frame classified yet'
    _candidate: str | None = None
    _candidate_since: float = 0.0
    _last_stamp: float | None = None

    def update(self, scene: FusedScene, labels: Sequence[str]) -> bool:
        """Take the robot's scene; return True when the decision changed."""
        stamp = scene.stamp_s
        if self._last_stamp is not None and stamp < self._last_stamp:
            self._candidate = None  # time went backwards (a bag looped): no run spans it
        self._last_stamp = stamp
        proposal, lead = self._proposal(scene.probabilities, labels)
        if proposal == self.label or lead < self.settings.margin:
            self._candidate = None
            return False
        if proposal != self._candidate:
            self._candidate, self._candidate_since = proposal, stamp
        # A microsecond's grace: 6 frames at 15 Hz are 0.4 s, though not in floating point.
        if stamp - self._candidate_since < self.settings.dwell_s - 1e-6:
            return False
        score = float(np.max(scene.probabilities))
        self._set(proposal, stamp, f'{proposal} led for {stamp - self._candidate_since:.2f} s'
                  if proposal != UNKNOWN else
                  f'no class reached score_threshold {self.settings.score_threshold:.2f} '
                  f'(best {score:.2f})')
        return True

    def _proposal(self, probabilities: np.ndarray, labels: Sequence[str]) -> tuple[str, float]:
        order = np.argsort(probabilities)[::-1]
        best = float(probabilities[order[0]])
        if best < self.settings.score_threshold:
            return UNKNOWN, math.inf
        if self.label in labels:
            other = float(probabilities[list(labels).index(self.label)])
        else:
            other = float(probabilities[order[1]]) if len(order) > 1 else 0.0
        return labels[order[0]], best - other

    def mark_stale(self, stamp_s: float | None, reason: str) -> bool:
        """Make the decision ``stale`` now; return True when it was not already."""
        if self.label == STALE:
            self._candidate = None
            return False
        self._set(STALE, stamp_s, reason)
        return True

    def _set(self, label: str, stamp_s: float | None, reason: str) -> None:
        self.label, self.since_s, self.reason = label, stamp_s, reason
        self._candidate = None


class RobotDecision:
    """
    One robot's decided scene: fusion, decision and staleness together, safe across threads.

    The node's inference worker adds each batch's results; a steady-clock timer asks
    ``check_stale``; ``evaluate`` adds a bag's frames in stamp order. ``now`` is a steady
    clock's reading (``time.monotonic()``), used only for staleness.
    """

    def __init__(self, settings: DecisionSettings | None = None, stale_after_s: float = 1.0,
                 now: float = 0.0) -> None:
        self._lock = threading.Lock()
        settings = settings or DecisionSettings()
        self.fusion = SceneFusion(settings.window_s)
        self.decision = SceneDecision(settings)
        self.stale_after_s = stale_after_s
        self.last_result_at = now
        self.scene: FusedScene | None = None

    def configure(self, settings: DecisionSettings, stale_after_s: float) -> None:
        """Change the settings live; the decided scene and the cameras' results are kept."""
        settings.check()
        with self._lock:
            self.fusion.configure(settings.window_s)
            self.decision.settings = settings
            self.stale_after_s = stale_after_s

    def add(self, results: Sequence[tuple[str, float, np.ndarray]], labels: Sequence[str],
            now: float) -> bool:
        """Take (camera, stamp, probabilities) results; return True when the decision changed."""
        with self._lock:
            self.last_result_at = now
            changed = False
            for camera, stamp, probabilities in results:
                self.scene = self.fusion.add(camera, stamp, probabilities)
                changed = self.decision.update(self.scene, labels) or changed
            return changed

    def check_stale(self, now: float) -> bool:
        """Make the decision stale when nothing came for ``stale_after_s``; True if it changed."""
        with self._lock:
            quiet = now - self.last_result_at
            if quiet < self.stale_after_s:
                return False
            return self._stale(f'no camera classified for {quiet:.1f} s (stale_after_s '
                               f'{self.stale_after_s:g})')

    def force_stale(self, reason: str) -> bool:
        """Make the decision stale now (deactivate, shutdown); True if it changed."""
        with self._lock:
            return self._stale(reason)

    def _stale(self, reason: str) -> bool:
        # What the cameras said before the silence must not speak for the scene after it.
        self.fusion.forget()
        stamp = self.scene.stamp_s if self.scene is not None else None
        return self.decision.mark_stale(stamp, reason)

    def snapshot(self) -> tuple[str, str, float | None, FusedScene | None]:
        """Return (decided label, why, since when, the latest fused scene), consistently."""
        with self._lock:
            decision = self.decision
            return decision.label, decision.reason, decision.since_s, self.scene


POLICY_OUTPUTS = ('speed_limit', 'percentage', 'controller', 'planner')


@dataclass(frozen=True)
class PolicyEntry:
    """What one decided state asks of Nav2; None leaves that output alone."""

    speed_limit: float | None = None
    percentage: bool = True
    controller: str | None = None
    planner: str | None = None

    def describe(self) -> str:
        """Return the entry in a few words, for logs and diagnostics."""
        words = []
        if self.speed_limit is not None:
            words.append('no speed limit' if self.speed_limit == 0.0 else
                         f'speed {self.speed_limit:g}' + ('%' if self.percentage else ' m/s'))
        words += [f'{key} {name}' for key, name in (('controller', self.controller),
                                                    ('planner', self.planner)) if name]
        return ', '.join(words) or 'nothing'


@dataclass(frozen=True)
class ScenePolicy:
    """Each decided state (a label, ``unknown``, ``stale``) to a ``PolicyEntry``."""

    entries: dict[str, PolicyEntry]
    source: str = ''

    def entry(self, state: str) -> PolicyEntry:
        """Return what ``state`` asks for; a state the policy leaves out asks for nothing."""
        return self.entries.get(state, PolicyEntry())

    def uses(self, output: str) -> bool:
        """Return whether any entry sets ``output`` (speed_limit, controller or planner)."""
        return any(getattr(entry, output) is not None for entry in self.entries.values())


def _entry(state: str, raw: Any, where: str) -> PolicyEntry:
    if not isinstance(raw, dict):
        raise ConfigurationError(f'{where}: {state!r} must map to a table of '
                                 f'{", ".join(POLICY_OUTPUTS)}; got {raw!r}')
    unknown_keys = sorted(map(str, set(raw) - set(POLICY_OUTPUTS)))
    if unknown_keys:
        raise ConfigurationError(f'{where}: {state!r} has {", ".join(unknown_keys)}; the '
                                 f'outputs are {", ".join(POLICY_OUTPUTS)}')
    percentage = raw.get('percentage', True)
    if not isinstance(percentage, bool):
        raise ConfigurationError(f'{where}: {state}.percentage must be true or false; got '
                                 f'{percentage!r}')
    limit = raw.get('speed_limit')
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit < 0 \
                or not math.isfinite(limit):
            raise ConfigurationError(f'{where}: {state}.speed_limit must be a number >= 0 (0 '
                                     f'means no limit); got {limit!r}')
        if percentage and limit > 100:
            raise ConfigurationError(f'{where}: {state}.speed_limit is a percentage (0-100) '
                                     f'unless percentage is false; got {limit}')
        limit = float(limit)
    names = {}
    for key in ('controller', 'planner'):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigurationError(f'{where}: {state}.{key} must be a plugin name (a '
                                     f'non-empty string); got {value!r}')
        names[key] = value
    return PolicyEntry(speed_limit=limit, percentage=percentage, **names)


def parse_policy(document: Any, labels: Sequence[str], where: str = 'policy') -> ScenePolicy:
    """
    Return the policy a parsed YAML document describes, checked against the model's labels.

    The document maps states to entries, under a top-level ``scenes:`` key::

        scenes:
          corridor: {speed_limit: 60.0, controller: FollowPath}
          unknown:  {speed_limit: 30.0}
          stale:    {speed_limit: 10.0, controller: Cautious}

    A state that is neither a label nor ``unknown``/``stale`` is refused (a typo would
    otherwise never apply); a label the policy leaves out asks for nothing.
    """
    if not isinstance(document, dict) or not isinstance(document.get('scenes'), dict):
        raise ConfigurationError(f'{where}: expected a mapping with a "scenes:" table of '
                                 'state: {speed_limit, percentage, controller, planner}')
    extra = sorted(map(str, set(document) - {'scenes'}))
    if extra:
        raise ConfigurationError(f'{where}: unknown top-level keys {", ".join(extra)}; '
                                 'only "scenes" is read')
    states = set(labels) | {UNKNOWN, STALE}
    entries = {}
    for state, raw in document['scenes'].items():
        if state not in states:
            raise ConfigurationError(f'{where}: {state!r} is not a label of the model nor '
                                     f'unknown/stale; the labels are {", ".join(labels)}')
        entries[str(state)] = _entry(str(state), raw, where)
    return ScenePolicy(entries, source=where)


def load_policy(path: str | Path, labels: Sequence[str]) -> ScenePolicy:
    """Read and check a policy file; every error is a ConfigurationError naming the file."""
    import yaml

    path = readable_file(path, 'policy file')
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigurationError(f'policy file {str(path)!r} is not valid YAML: {error}'
                                 ) from None
    except UnicodeDecodeError:
        raise ConfigurationError(f'policy file {str(path)!r} is not text: name a YAML file'
                                 ) from None
    except OSError as error:
        raise ConfigurationError(f'policy file {str(path)!r}: cannot be read '
                                 f'({error.strerror or error})') from None
    return parse_policy(document, labels, where=str(path))
