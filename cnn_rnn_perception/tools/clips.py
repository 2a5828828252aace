"""
Labelled bags as runs of consecutive frames: for temporal training, and for honest validation.

A *run* is what a temporal model sees as one stream: frames of one topic of one bag, in
recording order, with no gap longer than ``reset_after_s`` and no stamp going backwards (the
engine's reset rules, ``engine.streams``). Runs are indexed without decoding pixels, then read
back frame by frame, so training streams from the bags instead of holding them in memory.

Validation holds out contiguous *time blocks*, never random frames: neighbouring frames of a
drive are near copies, so a random split scores memory, not generalisation.

Training walks ``lanes`` streams side by side, ``clip_length`` frames at a time, carrying each
lane's state from clip to clip (truncated back-propagation through time). A clip never spans
two runs: a run's last clip is padded, and the next run starts its lane afresh.
"""

from __future__ import annotations

from dataclasses import dataclass
import queue
import threading
from typing import Iterable, Iterator, Sequence

from cnn_rnn_perception.core.image_conversion import ImageRejected, message_to_frame
from cnn_rnn_perception.core.preprocess import resize_frame, to_model_colors
from cnn_rnn_perception.tools.bags import BadMessage, BagSource
import numpy as np
import torch
from tqdm import tqdm


@dataclass(frozen=True)
class Run:
    """Consecutive labelled frames of one topic of one bag, with no reset gap inside."""

    bag: str
    topic: str
    log_ns: tuple[int, ...]      # recording times: how the frames are found again
    stamps_s: tuple[float, ...]
    targets: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.log_ns)

    @property
    def duration_s(self) -> float:
        """Return the time from the first frame to the last, by stamps."""
        return self.stamps_s[-1] - self.stamps_s[0]

    def part(self, start: int, stop: int) -> Run:
        """Return frames ``start`` to ``stop`` as a run of their own."""
        return Run(self.bag, self.topic, self.log_ns[start:stop], self.stamps_s[start:stop],
                   self.targets[start:stop])


def index_runs(paths: Sequence[str], label_topic: str, topics: Sequence[str] | None = None,
               reset_after_s: float = 1.0, progress: bool = True
               ) -> tuple[list[str], list[Run], list[str]]:
    """
    Return (classes, runs, skipped reasons) of labelled bags, reading no pixels.

    Frames before the first label, and messages that cannot be read, are skipped and end the
    run they interrupt.
    """
    found: list[tuple[str, str, list[tuple[int, float, str]]]] = []
    skipped: list[str] = []
    for path in paths:
        with BagSource(path) as bag:
            truth = bag.labels(label_topic)
            selected = bag.image_topics(topics)
            pieces: dict[str, list[tuple[int, float, str]]] = {topic: [] for topic in selected}
            frames = tqdm(bag.frames(selected, truth), total=bag.message_count(selected),
                          desc=f'indexing {path}', unit='frame', leave=False,
                          disable=not progress)
            for item in frames:
                if isinstance(item, BadMessage):
                    skipped.append(item.reason)
                    _close(found, str(path), item.topic, pieces)
                    continue
                if item.label is None:
                    skipped.append(f'{path} {item.topic}: frame before the first label')
                    continue
                current = pieces[item.topic]
                stamp = item.stamp_ns * 1e-9
                if current and not 0.0 <= stamp - current[-1][1] <= reset_after_s:
                    _close(found, str(path), item.topic, pieces)
                    current = pieces[item.topic]
                current.append((item.log_time_ns, stamp, item.label))
            for topic in selected:
                _close(found, str(path), topic, pieces)
    if not found:
        raise ValueError(f'no labelled frames in {", ".join(map(str, paths))} (label topic '
                         f'{label_topic})')
    classes = sorted({label for _, _, frames in found for _, _, label in frames})
    runs = [Run(bag, topic, tuple(f[0] for f in frames), tuple(f[1] for f in frames),
                tuple(classes.index(f[2]) for f in frames)) for bag, topic, frames in found]
    return classes, runs, skipped


def _close(found: list, bag: str, topic: str, pieces: dict[str, list]) -> None:
    if pieces.get(topic):
        found.append((bag, topic, pieces[topic]))
    pieces[topic] = []


@dataclass(frozen=True)
class Split:
    """Runs for training and for validation, and a sentence saying how they were split."""

    train: list[Run]
    val: list[Run]
    description: str


def split_by_time_blocks(runs: Sequence[Run], val_fraction: float, block_s: float) -> Split:
    """
    Cut runs into blocks of ``block_s`` seconds and hold out ``val_fraction`` of the blocks.

    The held-out blocks are spread evenly over the recordings (every k-th block), so that
    validation sees every part of every drive rather than its end only. Deterministic.
    """
    if block_s <= 0:
        raise ValueError(f'val block length must be > 0 s; got {block_s}')
    blocks: list[Run] = []
    for run in runs:
        start = 0
        for index in range(1, len(run) + 1):
            if index == len(run) or run.stamps_s[index] - run.stamps_s[start] >= block_s:
                blocks.append(run.part(start, index))
                start = index
    if len(blocks) < 2:
        raise ValueError(f'the labelled frames make {len(blocks)} time block(s) of {block_s:g} '
                         's; validation needs one held out and one to train on: record longer '
                         'or give a shorter --val-block-s')
    held = max(1, min(len(blocks) - 1, int(round(len(blocks) * val_fraction))))
    chosen = {int((index + 0.5) * len(blocks) / held) for index in range(held)}
    train = [block for index, block in enumerate(blocks) if index not in chosen]
    val = [block for index, block in enumerate(blocks) if index in chosen]
    frames = sum(len(block) for block in val)
    return Split(train, val, f'validation: {len(val)} of {len(blocks)} time blocks of '
                             f'{block_s:g} s ({frames} frames) held out, spread over the '
                             'recordings; never random frames, which leak between neighbours')


def read_run(run: Run, input_size: tuple[int, int]) -> Iterator[np.ndarray | None]:
    """
    Yield a run's frames as RGB uint8 at ``input_size``, in order, read from its bag.

    A frame that no longer decodes yields None, so frames and targets stay aligned.
    """
    wanted = set(run.log_ns)
    with BagSource(run.bag) as bag:
        for item in bag.frames([run.topic], start_ns=run.log_ns[0], stop_ns=run.log_ns[-1] + 1):
            if isinstance(item, BadMessage):
                continue
            if item.log_time_ns not in wanted:
                continue
            try:
                frame, order = message_to_frame(item.message)
            except ImageRejected:
                yield None
                continue
            yield to_model_colors(resize_frame(frame, input_size), order, 'rgb')


def plan_lanes(runs: Sequence[Run], lanes: int, clip_length: int, seed: int
               ) -> list[list[int]]:
    """
    Deal runs (shuffled by ``seed``) to lanes so that every lane has about as many clips.

    Every process of a distributed run computes the same plan and takes its own lanes, so all
    take the same number of steps.
    """
    order = np.random.default_rng(seed).permutation(len(runs))
    plan: list[list[int]] = [[] for _ in range(lanes)]
    clips = [0] * lanes
    for index in order:
        lane = int(np.argmin(clips))
        plan[lane].append(int(index))
        clips[lane] += -(-len(runs[index]) // clip_length)
    return plan


@dataclass
class ClipBatch:
    """One step: ``frames`` [L, N, H, W, 3] uint8 RGB, ``targets`` and ``valid`` [L, N]."""

    frames: torch.Tensor
    targets: torch.Tensor
    valid: torch.Tensor
    fresh: torch.Tensor   # [L]: the lane starts a new run here, so its state starts at zero


class ClipBatches:
    """
    The clips of one epoch, lane by lane, in step order.

    ``augment(frame, run_index)`` (optional) is applied with the same parameters to every frame
    of a run, so the motion between frames is what the recording had.
    """

    def __init__(self, runs: Sequence[Run], plan: Sequence[Sequence[int]], clip_length: int,
                 input_size: tuple[int, int], augment=None) -> None:
        self.runs = runs
        self.plan = [list(lane) for lane in plan]
        self.clip_length = clip_length
        self.input_size = input_size
        self.augment = augment
        self.steps = max((sum(-(-len(runs[i]) // clip_length) for i in lane)
                          for lane in self.plan), default=0)

    def __len__(self) -> int:
        return self.steps

    def _lane_clips(self, lane: list[int]) -> Iterator[tuple[list, list[int], bool]]:
        for run_index in lane:
            run = self.runs[run_index]
            frames, targets = [], []
            first = True
            for frame, target in zip(read_run(run, self.input_size), run.targets):
                if frame is None:
                    continue  # an undecodable frame: the stream simply skips it
                if self.augment is not None:
                    frame = self.augment(frame, run_index)
                frames.append(frame)
                targets.append(target)
                if len(frames) == self.clip_length:
                    yield frames, targets, first
                    frames, targets, first = [], [], False
            if frames:
                yield frames, targets, first

    def __iter__(self) -> Iterator[ClipBatch]:
        lanes = [self._lane_clips(lane) for lane in self.plan]
        height, width = self.input_size
        length = self.clip_length
        for _ in range(self.steps):
            frames = np.zeros((len(lanes), length, height, width, 3), np.uint8)
            targets = np.zeros((len(lanes), length), np.int64)
            valid = np.zeros((len(lanes), length), bool)
            fresh = np.zeros(len(lanes), bool)
            for row, lane in enumerate(lanes):
                clip = next(lane, None)
                if clip is None:
                    fresh[row] = True  # a finished lane: padding only
                    continue
                clip_frames, clip_targets, fresh[row] = clip
                count = len(clip_frames)
                frames[row, :count] = np.stack(clip_frames)
                # Padding repeats the last frame: BatchNorm statistics see no black frames.
                frames[row, count:] = clip_frames[-1]
                targets[row, :count] = clip_targets
                valid[row, :count] = True
            yield ClipBatch(torch.from_numpy(frames), torch.from_numpy(targets),
                            torch.from_numpy(valid), torch.from_numpy(fresh))


def prefetched(batches: Iterable, depth: int = 2) -> Iterator:
    """Iterate ``batches`` in a thread of its own, ``depth`` ahead: decoding overlaps training."""
    done = object()
    ahead: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        ahead.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as error:  # handed to the consumer, which raises it
            ahead.put(error)
            return
        ahead.put(done)

    thread = threading.Thread(target=produce, daemon=True, name='clip-reader')
    thread.start()
    try:
        while True:
            item = ahead.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                ahead.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.1)
