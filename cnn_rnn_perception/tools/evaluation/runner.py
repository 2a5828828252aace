"""
The engine over every frame of one or more bags, and a replay's recorded output, as predictions.

Reading and decoding run in a thread of their own, feeding batches to the engine through a
bounded queue, so IO and inference overlap. Frames that fail to decode are counted per topic
and skipped. Each topic of each bag is one stream, with its frames' stamps: a temporal model
carries its state along it and resets it by the engine's rules, exactly as in the node; each
bag is one robot, its cameras fused and decided on as the node does.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
import json
from pathlib import Path
import queue
import threading
import time
from typing import Any, Sequence

from cnn_rnn_perception.core.engine import EngineBase
from cnn_rnn_perception.core.image_conversion import ImageRejected, message_to_frame
from cnn_rnn_perception.core.navigation import DecisionSettings, RobotDecision
from cnn_rnn_perception.core.postprocess import ProbabilitySmoother
from cnn_rnn_perception.tools.evaluation.bags import (
    BadMessage, BagError, BagFrame, BagSource, Labels)
from cnn_rnn_perception.tools.evaluation.metrics import NO_LABEL, Prediction, scores_of
import numpy as np
from tqdm import tqdm


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
                  progress: bool = True) -> dict[str, Any]:
    """
    Run the engine over every frame; return predictions, counts, throughput and scores.

    ``smoothing`` averages each stream's probabilities over time as the node's ``smoothing``
    parameter does, so a per-frame model can be scored the way it would run. Each bag is one
    robot: its cameras are fused and decided on (``decision``) as the
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
                robot = robots.setdefault(record.bag, RobotDecision(decision))
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
        'decision_settings': asdict(decision or DecisionSettings()),
    }
    if summary['frames_per_s'] and summary['engine_frames_per_s']:
        summary['throughput_vs_engine'] = summary['frames_per_s'] / summary['engine_frames_per_s']
    summary.update(scores_of(predictions, engine.labels))
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
    merged.update(scores_of(predictions, labels))
    return {'summary': merged, 'predictions': predictions}


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
    summary.update(scores_of(predictions, class_names))
    return {'summary': summary, 'predictions': predictions}
