"""
Offline evaluation: the engine over every frame of one or more bags, scored against labels.

Reading and decoding run in a thread of their own, feeding batches to the engine through a
bounded queue, so IO and inference overlap. Frames that fail to decode are counted per topic
and skipped. The same scoring code scores a replay run's recorded ``~/scene`` output.

Each topic of each bag is one stream, with its frames' stamps: a temporal model carries its
state along it and resets it by the engine's rules, exactly as in the node. Besides accuracy,
*flicker* counts how often the label changes per minute of each stream, against how often the
ground truth itself changes: a navigation stack acts on every change.

Under ``torchrun`` the bags are shared out among the processes (whole bags: a bag's streams
and its robot decision stay in one process), and process 0 merges the predictions into the
one summary and predictions file a single process would write.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import asdict, dataclass, field, replace
import json
from pathlib import Path
import queue
import sys
import threading
import time
from typing import Any, Iterable, Sequence

from cnn_rnn_perception.core.engine import create_engine, EngineBase
from cnn_rnn_perception.core.image_conversion import ImageRejected, message_to_frame
from cnn_rnn_perception.core.navigation import DecisionSettings, FUSION_WINDOW_S, RobotDecision
from cnn_rnn_perception.core.postprocess import ProbabilitySmoother
from cnn_rnn_perception.tools import options
from cnn_rnn_perception.tools.bags import BadMessage, BagError, BagFrame, BagSource, Labels
from cnn_rnn_perception.tools.report import write_json
import numpy as np
from tqdm import tqdm


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


@dataclass
class BadFrames:
    """Frames counted and skipped, per topic, with the last reason."""

    counts: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def add(self, topic: str, reason: str) -> None:
        self.counts[topic] = self.counts.get(topic, 0) + 1
        self.reasons[topic] = reason

    @property
    def total(self) -> int:
        return sum(self.counts.values())


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


def _streams(predictions: Iterable[Prediction], by_robot: bool
             ) -> list[list[Prediction]]:
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
    for frames in _streams(predictions, by_robot=False):
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
    for frames in _streams((p for p in predictions if p.decision is not None), by_robot=True):
        count.add([p.stamp for p in frames], [p.decision for p in frames],
                  [p.truth for p in frames], transition_s)
        right += sum(1 for p in frames if p.truth is not None and p.decision == p.truth)
        scored += sum(1 for p in frames if p.truth is not None)
    if count.minutes <= 0:
        return {}
    return {**count.summary('decision_'),
            'decision_accuracy': right / scored if scored else None}


def _seconds_text(value: float | None) -> str:
    return '-' if value is None else f'{value:.2f} s'


def change_table(scores: dict[str, Any]) -> str:
    """
    Render per-frame labels against the robot's decision: what a navigation stack would see.

    Changes and spurious changes per minute (spurious: further than 0.5 s from a change of
    the ground truth), and how long after a true change the output switched to the new scene
    (p50, p95; missed: never before the next change).
    """
    rows = [('per-frame label', scores['flicker_per_min'], scores['spurious_changes_per_min'],
             scores.get('switch_delay_p50_s'), scores.get('switch_delay_p95_s'),
             scores.get('missed_switches'))]
    if scores.get('decision_changes_per_min') is not None:
        rows.append(('robot decision', scores['decision_changes_per_min'],
                     scores['decision_spurious_changes_per_min'],
                     scores['decision_switch_delay_p50_s'],
                     scores['decision_switch_delay_p95_s'], scores['decision_missed_switches']))
    lines = [f'{"changes per minute":<16}  {"all":>6}  {"spurious":>8}  {"switch p50":>10}  '
             f'{"p95":>7}  {"missed":>6}   (ground truth '
             f'{scores["truth_changes_per_min"]:.1f} a minute)']
    for name, changes, spurious, p50, p95, missed in rows:
        lines.append(f'{name:<16}  {changes:>6.1f}  {spurious:>8.1f}  {_seconds_text(p50):>10}  '
                     f'{_seconds_text(p95):>7}  {"-" if missed is None else missed:>6}')
    if scores.get('decision_accuracy') is not None:
        lines.append(f'decision accuracy {scores["decision_accuracy"]:.4f} (unknown and stale '
                     'count as wrong)')
    return '\n'.join(lines)


def format_scores(scores: dict[str, Any]) -> str:
    """Render per-class metrics and the confusion matrix as text."""
    labels = scores['labels']
    corner = 'truth \\ predicted'
    width = max(len(label) for label in labels + [corner])
    lines = [f'accuracy {scores["accuracy"]:.4f} over {scores["scored_frames"]} labelled frames']
    if scores.get('flicker_per_min') is not None:
        lines += ['', change_table(scores)]
    lines += ['', f'{"class":<{width}}  precision  recall  support']
    for label in labels:
        metrics = scores['per_class'][label]
        precision = '-' if metrics['precision'] is None else f'{metrics["precision"]:.3f}'
        recall = '-' if metrics['recall'] is None else f'{metrics["recall"]:.3f}'
        lines.append(f'{label:<{width}}  {precision:>9}  {recall:>6}  {metrics["support"]:>7}')
    cell = max(6, max(len(label) for label in labels))
    lines += ['', f'{corner:<{width}}  ' + ' '.join(
        f'{label[:cell]:>{cell}}' for label in labels)]
    for label, row in zip(labels, scores['confusion']):
        lines.append(f'{label:<{width}}  ' + ' '.join(f'{count:>{cell}}' for count in row))
    return '\n'.join(lines)


def plot_confusion(scores: dict[str, Any], path: str | Path, title: str = '') -> None:
    """Write the confusion matrix as a PNG, counts in every cell."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot

    labels = scores['labels']
    matrix = np.array(scores['confusion'])
    figure, axes = pyplot.subplots(figsize=(1.2 * len(labels) + 2, 1.0 * len(labels) + 1.5))
    axes.imshow(matrix, cmap='Blues')
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha='right')
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel('predicted')
    axes.set_ylabel('truth')
    limit = matrix.max() / 2 if matrix.size else 0
    for row in range(len(labels)):
        for column in range(len(labels)):
            axes.text(column, row, str(matrix[row, column]), ha='center', va='center',
                      color='white' if matrix[row, column] > limit else 'black')
    accuracy = scores['accuracy']
    axes.set_title(title or (f'accuracy {accuracy:.3f}' if accuracy is not None else ''))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


class PredictionWriter:
    """Predictions to CSV or JSONL, chosen by the file's suffix."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._handle = None
        self._csv = None
        if self.path is None:
            return
        if self.path.suffix not in ('.csv', '.jsonl'):
            raise ValueError(f'predictions file must end in .csv or .jsonl; got {self.path}')
        self._handle = self.path.open('w', newline='')
        if self.path.suffix == '.csv':
            self._csv = csv.writer(self._handle)
            self._csv.writerow(['bag', 'topic', 'stamp', 'frame_id', 'label', 'score', 'top_k',
                                'truth', 'decision'])

    def write(self, prediction: Prediction) -> None:
        if self._handle is None:
            return
        if self._csv is not None:
            top = ';'.join(f'{label}:{value:.4f}' for label, value in prediction.top_k)
            self._csv.writerow([prediction.bag, prediction.topic, f'{prediction.stamp:.9f}',
                                prediction.frame_id, prediction.label,
                                f'{prediction.score:.6f}', top, prediction.truth or '',
                                prediction.decision or ''])
        else:
            self._handle.write(json.dumps(asdict(prediction)) + '\n')

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


_DONE = object()


def _put(out: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put ``item`` unless the consumer has stopped; a full queue then never blocks for ever."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _decode_bags(paths: Sequence[str], topics: Sequence[str] | None, label_topic: str | None,
                 labels_csv: str | None, out: queue.Queue, bad: BadFrames,
                 stop: threading.Event) -> None:
    """Read and decode frames into ``out`` (the producer); a fatal error goes in the queue."""
    try:
        sidecar = Labels.from_csv(labels_csv) if labels_csv else None
        for path in paths:
            with BagSource(path) as bag:
                selected = bag.image_topics(topics)
                labels = bag.labels(label_topic) if label_topic else sidecar
                for item in bag.frames(selected, labels, labels_by_stamp=sidecar is not None):
                    if stop.is_set():
                        return
                    if isinstance(item, BadMessage):
                        bad.add(item.topic, item.reason)
                        continue
                    try:
                        frame, order = message_to_frame(item.message)
                    except ImageRejected as error:
                        bad.add(item.topic, str(error))
                        continue
                    item.message = None  # the decoded frame is all that is needed now
                    if not _put(out, (item, frame, order), stop):
                        return
    except BaseException as error:  # handed to the consumer, which raises it
        _put(out, error, stop)
    finally:
        _put(out, _DONE, stop)


def evaluate_bags(paths: Sequence[str], engine: EngineBase, *,
                  topics: Sequence[str] | None = None, label_topic: str | None = None,
                  labels_csv: str | None = None, batch_size: int = 16,
                  predictions_path: str | Path | None = None, top_k: int = 5,
                  smoothing: float = 0.0, smoothing_reset_s: float = 2.0,
                  decision: DecisionSettings | None = None,
                  fusion_window_s: float = FUSION_WINDOW_S,
                  progress: bool = True) -> dict[str, Any]:
    """
    Run the engine over every frame; return predictions, counts, throughput and scores.

    ``smoothing`` averages each stream's probabilities over time as the node's ``smoothing``
    parameter does, so a per-frame model can be scored the way it would run. Each bag is one
    robot: its cameras are fused and decided on (``decision``, ``fusion_window_s``) as the
    node's ``navigation.*`` parameters do, frame by frame in stamp order.
    """
    smoother = ProbabilitySmoother(smoothing, smoothing_reset_s)
    robots: dict[str, RobotDecision] = {}
    if label_topic and labels_csv:
        raise ValueError('give either a label topic or a labels CSV, not both')
    bad = BadFrames()
    frames: queue.Queue = queue.Queue(maxsize=4 * batch_size)
    stop = threading.Event()
    producer = threading.Thread(target=_decode_bags, daemon=True, name='bag-reader', args=(
        list(paths), topics, label_topic, labels_csv, frames, bad, stop))
    writer = PredictionWriter(predictions_path)
    predictions: list[Prediction] = []
    engine_seconds = 0.0
    producer.start()
    bar = tqdm(desc='evaluating', unit='frame', disable=not progress)
    try:
        # Compile (or capture) at the shape the bag's frames really have, before the clock
        # starts: throughput is steady state, not the first compile.
        first = frames.get()
        if isinstance(first, tuple):
            # infer splits batches larger than max_batch: that is the batch the model runs.
            engine.warmup(frame_shape=first[1].shape,
                          batch_sizes=[min(batch_size, engine.settings.max_batch)],
                          color_order=first[2])
        waiting = [first]
        started = time.perf_counter()
        finished = False
        while not finished:
            batch: list[tuple[BagFrame, np.ndarray, str]] = []
            while len(batch) < batch_size:
                item = waiting.pop() if waiting else frames.get()
                if item is _DONE:
                    finished = True
                    break
                if isinstance(item, BaseException):
                    raise item
                batch.append(item)
            if not batch:
                continue
            infer_started = time.perf_counter()
            results = engine.infer([frame for _, frame, _ in batch],
                                   color_order=[order for _, _, order in batch],
                                   streams=[(record.bag, record.topic) for record, _, _ in batch],
                                   stamps=[record.stamp_ns * 1e-9 for record, _, _ in batch])
            engine_seconds += time.perf_counter() - infer_started
            for (record, _, _), result in zip(batch, results):
                estimate, ranked = smoother.rank((record.bag, record.topic),
                                                 record.stamp_ns * 1e-9, result.probabilities,
                                                 top_k, engine.labels)
                robot = robots.setdefault(record.bag, RobotDecision(decision, fusion_window_s))
                robot.add([(record.topic, record.stamp_ns * 1e-9, estimate)], engine.labels,
                          now=record.stamp_ns * 1e-9)
                prediction = Prediction(
                    bag=record.bag, topic=record.topic, stamp=record.stamp_ns * 1e-9,
                    frame_id=record.frame_id, label=ranked[0][0], score=ranked[0][1],
                    top_k=ranked, truth=record.label, decision=robot.decision.label)
                predictions.append(prediction)
                writer.write(prediction)
            bar.update(len(batch))
    finally:
        stop.set()
        producer.join(timeout=10.0)
        bar.close()
        writer.close()
    elapsed = time.perf_counter() - started
    summary: dict[str, Any] = {
        'bags': [str(path) for path in paths], 'frames': len(predictions),
        'bad_frames': bad.total, 'bad_frames_by_topic': bad.counts,
        'bad_frame_reasons': bad.reasons, 'batch_size': batch_size,
        'frames_per_s': len(predictions) / elapsed if elapsed else None,
        'engine_frames_per_s': len(predictions) / engine_seconds if engine_seconds else None,
        'engine': engine.describe(), 'smoothing': smoothing,
        'decision_settings': {**asdict(decision or DecisionSettings()),
                              'fusion_window_s': fusion_window_s},
    }
    if summary['frames_per_s'] and summary['engine_frames_per_s']:
        summary['throughput_vs_engine'] = summary['frames_per_s'] / summary['engine_frames_per_s']
    summary.update(_scores_of(predictions, engine.labels))
    return {'summary': summary, 'predictions': predictions}


def merge_results(results: Sequence[dict[str, Any]], paths: Sequence[str],
                  labels: Sequence[str]) -> dict[str, Any]:
    """
    Merge ``evaluate_bags`` results over disjoint shares of ``paths`` into one, as if one run.

    Predictions come back in the order of ``paths``; scores are computed again over all of
    them; throughput is all frames over the slowest share's time.
    """
    order = {str(path): index for index, path in enumerate(paths)}
    predictions = sorted((p for result in results for p in result['predictions']),
                         key=lambda p: order[p.bag])  # stable: each bag's own order kept
    summaries = [result['summary'] for result in results]
    bad = BadFrames()
    for summary in summaries:
        for topic, count in summary['bad_frames_by_topic'].items():
            bad.counts[topic] = bad.counts.get(topic, 0) + count
        bad.reasons.update(summary['bad_frame_reasons'])
    seconds = [s['frames'] / s['frames_per_s'] for s in summaries if s.get('frames_per_s')]
    engine_seconds = sum(s['frames'] / s['engine_frames_per_s'] for s in summaries
                         if s.get('engine_frames_per_s'))
    merged: dict[str, Any] = {
        **summaries[0], 'bags': [str(path) for path in paths], 'frames': len(predictions),
        'bad_frames': bad.total, 'bad_frames_by_topic': bad.counts,
        'bad_frame_reasons': bad.reasons, 'processes': len(results),
        'frames_per_s': len(predictions) / max(seconds) if seconds else None,
        'engine_frames_per_s': len(predictions) / engine_seconds if engine_seconds else None}
    merged.pop('throughput_vs_engine', None)
    for key in ('accuracy', 'scored_frames'):
        merged.pop(key, None)
    merged.update(_scores_of(predictions, labels))
    return {'summary': merged, 'predictions': predictions}


def _scores_of(predictions: Sequence[Prediction], labels: Sequence[str]) -> dict[str, Any]:
    labelled = [p for p in predictions if p.truth is not None]
    if not labelled:
        return {'accuracy': None, 'scored_frames': 0}
    return {**score([p.truth for p in labelled], [p.label for p in labelled], labels),
            **flicker(predictions), **decision_changes(predictions)}


def score_scene_recording(scenes_path: str | Path, bag_path: str, *, label_topic: str | None,
                          labels_csv: str | None = None,
                          remap: dict[str, str] | None = None) -> dict[str, Any]:
    """
    Score a replay run's recorded ``~/scene`` JSONL against the bag's labels.

    ``remap`` is what the replay was given (bag topic to published topic), so scenes on a
    remapped topic find their frames in the bag.
    """
    scenes_path = Path(scenes_path)
    if not scenes_path.is_file():
        raise BagError(f'scene recording not found: {str(scenes_path)!r}')
    scenes = [json.loads(line) for line in scenes_path.read_text().splitlines() if line.strip()]
    sidecar = Labels.from_csv(labels_csv) if labels_csv else None
    truths: dict[tuple[str, int], str | None] = {}
    with BagSource(bag_path) as bag:
        labels = bag.labels(label_topic) if label_topic else sidecar
        for item in bag.frames(bag.image_topics(None), labels,
                               labels_by_stamp=sidecar is not None):
            if isinstance(item, BagFrame):
                truths[(item.topic, item.stamp_ns)] = item.label
    bag_topic = {published: recorded for recorded, published in (remap or {}).items()}
    foreign = sorted({scene['topic'] for scene in scenes} - set(bag_topic)
                     - {topic for topic, _ in truths})
    if scenes and len(foreign) == len({scene['topic'] for scene in scenes}):
        raise BagError(f'no scene is on a topic of {bag_path!r} (scenes on {foreign}); if the '
                       'replay remapped topics, give the same --remap FROM:=TO here')
    predictions = []
    for scene in scenes:
        stamp_ns = scene['stamp']['sec'] * 1_000_000_000 + scene['stamp']['nanosec']
        topic = bag_topic.get(scene['topic'], scene['topic'])
        predictions.append(Prediction(
            bag=bag_path, topic=topic, stamp=stamp_ns * 1e-9,
            frame_id=scene['frame_id'],
            label=scene['label'] if scene['label'] is not None else NO_LABEL,
            score=scene['score'] if scene['score'] is not None else 0.0,
            top_k=[(entry['label'], entry['score']) for entry in scene['top_k']],
            truth=truths.get((topic, stamp_ns))))
    seen_truths = {p.truth for p in predictions if p.truth is not None}
    class_names = sorted({p.label for p in predictions} | seen_truths)
    summary = {'bags': [bag_path], 'frames': len(predictions),
               'unmatched_scenes': sum(1 for p in predictions if p.truth is None)}
    summary.update(_scores_of(predictions, class_names))
    return {'summary': summary, 'predictions': predictions}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the evaluate command's flags."""
    parser.description = (
        'Run a checkpoint over every image of one or more bags (rosbag2 directories, .db3 or '
        '.mcap files, ROS 1 .bag), write per-frame predictions, and with ground truth report '
        'accuracy, per-class precision/recall, flicker (label changes per minute against the '
        "ground truth's own) and a confusion matrix. Each topic of each bag is one stream in "
        'stamp order: a temporal model carries and resets its state as in the node. '
        '--min-accuracy makes the exit code fail below a threshold, for CI. Many bags over '
        'several processes or machines: torchrun --nproc_per_node N $(which '
        'cnn_rnn_perception) evaluate ... shares the bags out and process 0 writes the one '
        'merged summary and predictions.')
    parser.add_argument('bags', nargs='+', metavar='BAG')
    options.add(parser, '--checkpoint', help='the model to evaluate')
    options.add(parser, '--topics', '--label-topic')
    parser.add_argument('--labels-csv', help='sidecar CSV of stamp,label rows (stamps in '
                        'seconds, matched to frame header stamps)')
    options.add(parser, '--batch-size', default=16, help='frames per batch (default: 16)')
    options.add(parser, '--output', metavar='FILE.csv|FILE.jsonl',
                help='write per-frame predictions')
    parser.add_argument('--summary', metavar='FILE.json', help='write the summary as JSON')
    parser.add_argument('--confusion-png', metavar='FILE.png',
                        help='draw the confusion matrix')
    parser.add_argument('--min-accuracy', type=float,
                        help='exit with code 1 when accuracy is below this')
    parser.add_argument('--scenes', metavar='FILE.jsonl', help="score a replay run's "
                        'recorded ~/scene output instead of running a model')
    options.add(parser, '--remap', help='with --scenes: the remaps the replay was given, so '
                                        'scenes on a remapped topic find their frames in the '
                                        'bag')
    parser.add_argument('--smoothing', type=float, default=0.0,
                        help="average each stream's probabilities over time with this "
                             "weight, as the node's smoothing parameter does (default: 0)")
    defaults = DecisionSettings()
    decision = parser.add_argument_group(
        "the robot's decision (the node's navigation.* parameters; tune them here on your "
        'bags, then set them on the robot)')
    decision.add_argument('--dwell-s', type=float, default=defaults.dwell_s,
                          help='a new scene must lead this long before the decision changes, '
                               'as navigation.dwell_s (default: %(default)s)')
    decision.add_argument('--margin', type=float, default=defaults.margin,
                          help='... and by this much probability, as navigation.margin '
                               '(default: %(default)s)')
    decision.add_argument('--score-threshold', type=float, default=defaults.score_threshold,
                          help='below this the decision becomes unknown after the dwell, as '
                               'score_threshold (default: %(default)s)')
    decision.add_argument('--fusion-window-s', type=float, default=FUSION_WINDOW_S,
                          help="a camera's newest result counts in the robot's scene this long, "
                               'as navigation.window_s (default: %(default)s)')
    options.add(parser, '--reset-after-s', '--compile', '--no-progress')
    options.add_engine_arguments(parser)


def decision_settings(args: argparse.Namespace) -> DecisionSettings:
    """Return the decision settings the flags ask for, checked."""
    settings = DecisionSettings(dwell_s=args.dwell_s, margin=args.margin,
                                score_threshold=args.score_threshold)
    settings.check()
    return settings


def _evaluate_shared_out(args: argparse.Namespace) -> dict[str, Any] | None:
    """
    Evaluate ``args.bags``: all of them, or under torchrun this process's share.

    Returns the (merged) result in process 0, None in the others.
    """
    import os
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    settings = options.engine_settings(args, max_batch=args.batch_size,
                                       reset_after_s=args.reset_after_s)
    if world > 1 and settings.device in ('auto', 'cuda'):
        import torch
        if torch.cuda.is_available():  # one GPU per process, as torchrun numbers them
            local = int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()
            settings = replace(settings, device=f'cuda:{local}')
    if world > 1:
        import datetime
        import torch.distributed as dist
        # gloo carries Python objects on any machine, with or without GPUs; shares of a fleet's
        # bags can take hours longer than others, which the collective must wait for.
        dist.init_process_group('gloo', timeout=datetime.timedelta(hours=24))
    share = list(args.bags)[rank::world]
    with create_engine(args.checkpoint, settings) as engine:
        result = evaluate_bags(share, engine, topics=args.topics,
                               label_topic=args.label_topic, labels_csv=args.labels_csv,
                               batch_size=args.batch_size,
                               predictions_path=args.output if world == 1 else None,
                               smoothing=args.smoothing,
                               progress=not args.no_progress and rank == 0,
                               decision=decision_settings(args),
                               fusion_window_s=args.fusion_window_s)
        labels = list(engine.labels)
    if world == 1:
        return result
    try:
        gathered: list[Any] = [None] * world if rank == 0 else None
        dist.gather_object(result, gathered, dst=0)
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return None
    merged = merge_results(gathered, [str(path) for path in args.bags], labels)
    writer = PredictionWriter(args.output)
    for prediction in merged['predictions']:
        writer.write(prediction)
    writer.close()
    return merged


def main(args: argparse.Namespace) -> int:
    """Score a model (or a replay recording) on bags and print the scores."""
    if args.scenes:
        if len(args.bags) != 1:
            raise ValueError('--scenes scores one replay recording against one bag')
        from cnn_rnn_perception.tools.replay import parse_remaps
        result = score_scene_recording(args.scenes, args.bags[0], label_topic=args.label_topic,
                                       labels_csv=args.labels_csv,
                                       remap=parse_remaps(args.remap))
        writer = PredictionWriter(args.output)
        for prediction in result['predictions']:
            writer.write(prediction)
        writer.close()
    else:
        if not args.checkpoint:
            raise ValueError('evaluate needs --checkpoint (a trained model), or --scenes to '
                             'score a replay recording')
        result = _evaluate_shared_out(args)
        if result is None:
            return 0  # a process other than 0 under torchrun: process 0 reports
    summary = result['summary']
    print(f'{summary["frames"]} frames from {len(summary["bags"])} bag(s)'
          + (f', {summary["bad_frames"]} bad frames skipped' if summary.get('bad_frames') else '')
          + (f', {summary["frames_per_s"]:.1f} frames/s ({summary["throughput_vs_engine"]:.0%} '
             "of the engine's own throughput)" if summary.get('throughput_vs_engine') else ''))
    for topic, reason in summary.get('bad_frame_reasons', {}).items():
        print(f'  {topic}: {summary["bad_frames_by_topic"][topic]} bad, last: {reason}')
    if summary['accuracy'] is not None:
        print(format_scores(summary))
        if args.confusion_png:
            plot_confusion(summary, args.confusion_png)
            print(f'wrote {args.confusion_png}')
    elif args.label_topic or args.labels_csv:
        print('no frame had a label at or before it: nothing scored')
    if args.output:
        print(f'wrote {args.output}')
    write_json(args.summary, summary)
    if args.min_accuracy is not None:
        if summary['accuracy'] is None:
            raise ValueError('--min-accuracy needs ground truth: --label-topic or --labels-csv')
        if summary['accuracy'] < args.min_accuracy:
            print(f'FAIL: accuracy {summary["accuracy"]:.4f} is below --min-accuracy '
                  f'{args.min_accuracy}', file=sys.stderr)
            return 1
    return 0
