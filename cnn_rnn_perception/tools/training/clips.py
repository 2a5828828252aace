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
two runs: a run's last clip is padded (marked not valid), and the next run starts its lane
afresh. In training a lane that has used up its runs starts them again, so every step of an
epoch has a real frame in every lane (BatchNorm never sees padding) and every process of a
distributed run takes the same number of steps.
"""

from __future__ import annotations

from dataclasses import dataclass
import queue
import threading
from typing import Iterable, Iterator, Sequence

from cnn_rnn_perception.core.image_conversion import ImageRejected, message_to_frame
from cnn_rnn_perception.core.preprocess import resize_frame, to_model_colors
from cnn_rnn_perception.tools.evaluation.bags import BadMessage, BagSource
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
    Cut each recording into blocks of ``block_s`` seconds and hold out ``val_fraction`` of them.

    A block is a window of the recording's time (stamps, counted from its first frame on any
    topic), the same for every topic of that recording: the seconds a validation block holds
    out of one camera, or of a raw topic, are held out of its other cameras and of its
    compressed copy too, which show the same moments. The held-out blocks are spread evenly
    over the recordings (every k-th block), so validation sees every part of every drive
    rather than its end only. Deterministic.
    """
    if block_s <= 0:
        raise ValueError(f'val block length must be > 0 s; got {block_s}')
    origins: dict[str, float] = {}
    for run in runs:
        origins[run.bag] = min(origins.get(run.bag, run.stamps_s[0]), run.stamps_s[0])
    pieces: list[tuple[tuple[int, int], Run]] = []
    recordings = list(origins)
    for run in runs:
        def block_of(index: int) -> tuple[int, int]:
            return (recordings.index(run.bag),
                    int((run.stamps_s[index] - origins[run.bag]) // block_s))
        start = 0
        for index in range(1, len(run) + 1):
            if index == len(run) or block_of(index) != block_of(start):
                pieces.append((block_of(start), run.part(start, index)))
                start = index
    blocks = sorted({block for block, _ in pieces})
    if len(blocks) < 2:
        raise ValueError(f'the labelled frames make {len(blocks)} time block(s) of {block_s:g} '
                         's; validation needs one held out and one to train on: record longer '
                         'or give a shorter --val-block-s')
    held = max(1, min(len(blocks) - 1, int(round(len(blocks) * val_fraction))))
    chosen = {blocks[int((index + 0.5) * len(blocks) / held)] for index in range(held)}
    train = [piece for block, piece in pieces if block not in chosen]
    val = [piece for block, piece in pieces if block in chosen]
    frames = sum(len(piece) for piece in val)
    return Split(train, val, f'validation: {len(chosen)} of {len(blocks)} time blocks of '
                             f'{block_s:g} s ({frames} frames) held out, the same seconds for '
                             'every topic of a recording, spread over the recordings; never '
                             'random frames, which leak between neighbours')


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


def lanes_for(runs: Sequence[Run], batch_size: int, processes: int = 1) -> tuple[int, str]:
    """
    Return how many lanes to train with, and a sentence when it is fewer than ``batch_size``.

    A lane with no run of its own would only repeat other lanes' runs, so there are at most as
    many lanes as runs, and a multiple of ``processes``.
    """
    if len(runs) >= batch_size:
        return batch_size, ''
    lanes = len(runs) // processes * processes
    if lanes == 0:
        raise ValueError(f'{len(runs)} training runs cannot fill {processes} processes: record '
                         'more, give a shorter --val-block-s (each time block is a run of its '
                         'own), or start fewer processes')
    return lanes, (f'{len(runs)} training runs for a batch of {batch_size} clips: training '
                   f'{lanes} lanes side by side. For more, record more or give a shorter '
                   '--val-block-s (each time block is a run); or lower --batch-size to say so')


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


def steps_for(runs: Sequence[Run], plan: Sequence[Sequence[int]], clip_length: int) -> int:
    """Return the steps the longest lane of ``plan`` needs: its clips."""
    return max((sum(-(-len(runs[i]) // clip_length) for i in lane) for lane in plan),
               default=0)


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
    of a run, so the motion between frames is what the recording had. With ``repeat`` (for
    training) a lane that has used up its runs starts them again until the last step; without
    it (validation: every frame once) the lane gives padding only. ``steps`` is the number of
    steps, by default what the longest lane of ``plan`` needs: a distributed run passes the
    longest of all processes' lanes (``steps_for``), so every process takes as many.
    """

    def __init__(self, runs: Sequence[Run], plan: Sequence[Sequence[int]], clip_length: int,
                 input_size: tuple[int, int], augment=None, *, repeat: bool = False,
                 steps: int | None = None) -> None:
        self.runs = runs
        self.plan = [list(lane) for lane in plan]
        self.clip_length = clip_length
        self.input_size = input_size
        self.augment = augment
        self.repeat = repeat
        self.steps = steps_for(runs, self.plan, clip_length) if steps is None else steps

    def __len__(self) -> int:
        return self.steps

    def _lane_clips(self, lane: list[int]) -> Iterator[tuple[list, list[int], bool]]:
        while True:
            given = 0
            for clip in self._lane_pass(lane):
                given += 1
                yield clip
            # A lane none of whose frames decode would otherwise go round for ever.
            if not self.repeat or not given:
                return

    def _lane_pass(self, lane: list[int]) -> Iterator[tuple[list, list[int], bool]]:
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
                    fresh[row] = True  # a finished lane: padding only, never valid
                    continue
                clip_frames, clip_targets, fresh[row] = clip
                count = len(clip_frames)
                frames[row, :count] = np.stack(clip_frames)
                # Padding repeats the last frame, which the model keeps as the one before
                # the next (no next: a run's last clip is followed by a fresh run).
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
