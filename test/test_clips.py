"""Runs and clips from labelled bags: reset gaps, time-block validation, streaming lanes."""

from cnn_rnn_perception.tools.evaluation.bags import BagWriter
from cnn_rnn_perception.tools.training.clips import (
    ClipBatches, index_runs, lanes_for, plan_lanes, prefetched, Run, split_by_time_blocks,
    steps_for)
import numpy as np
import pytest

START = 1_700_000_000.0


def write_bag(path, stamps, labels, topic='/camera/image_raw'):
    """
    Frame k is uniformly grey level k, so a clip's frames say where they came from.

    Recording time always moves on (10 ms a frame), whatever the header stamps do.
    """
    with BagWriter(path) as bag:
        written = None
        for index, (stamp, label) in enumerate(zip(stamps, labels)):
            log_ns = int(START * 1e9) + index * 10_000_000
            if label != written:
                bag.write_label('/scene_label', label, log_ns)
                written = label
            frame = np.full((24, 32, 3), index % 256, np.uint8)
            bag.write_image(topic, frame, 'rgb8', int(round((START + stamp) * 1e9)), 'cam',
                            log_time_ns=log_ns)
    return path


def test_runs_end_at_a_gap_and_where_stamps_go_backwards_and_clips_never_span_two(tmp_path):
    # 30 frames at 10 Hz, a 3 s gap, 20 frames, then the stamps jump back (a loop): 3 runs.
    stamps = ([0.1 * i for i in range(30)] + [6.0 + 0.1 * i for i in range(20)]
              + [0.1 * i for i in range(12)])
    labels = ['a'] * 15 + ['b'] * 35 + ['a'] * 12
    bag = write_bag(tmp_path / 'bag', stamps, labels)
    classes, runs, skipped = index_runs([str(bag)], '/scene_label', reset_after_s=1.0,
                                        progress=False)
    assert classes == ['a', 'b'] and not skipped
    assert [len(run) for run in runs] == [30, 20, 12]
    assert runs[0].targets[14:16] == (0, 1)  # labels change inside a run; runs follow time
    plan = plan_lanes(runs, lanes=2, clip_length=8, seed=0)
    batches = ClipBatches(runs, plan, clip_length=8, input_size=(32, 32))
    lane_frames = [[] for _ in plan]
    for batch in prefetched(batches):
        for lane in range(len(plan)):
            valid = batch.valid[lane].numpy()
            levels = batch.frames[lane, :, 0, 0, 0].numpy()[valid].astype(int)
            if not len(levels):
                continue
            if batch.fresh[lane]:
                lane_frames[lane].append([])
            lane_frames[lane][-1] += list(levels)
            # One clip holds consecutive frames of one run only.
            assert (np.diff(levels) == 1).all(), levels
    seen = sorted(tuple(run) for lane in lane_frames for run in lane)
    assert seen == sorted([tuple(range(0, 30)), tuple(range(30, 50)), tuple(range(50, 62))])
    assert len(batches) == max(sum(-(-len(runs[i]) // 8) for i in lane) for lane in plan)


def test_validation_holds_out_whole_time_blocks_spread_over_the_recording():
    runs = [Run('bag', '/cam', tuple(range(600)), tuple(0.1 * i for i in range(600)),
                tuple([0] * 600))]
    split = split_by_time_blocks(runs, val_fraction=0.2, block_s=10.0)
    assert [len(run) for run in split.val] == [100] and len(split.train) == 5
    blocks = sorted(split.train + split.val, key=lambda run: run.log_ns[0])
    assert [b.log_ns[0] for b in blocks] == [0, 100, 200, 300, 400, 500]  # nothing lost
    assert split.val[0].log_ns[0] == 300  # the middle, not the end
    assert 'time blocks of 10 s' in split.description
    short = [runs[0].part(0, 50)]
    with pytest.raises(ValueError, match='shorter --val-block-s'):
        split_by_time_blocks(short, val_fraction=0.2, block_s=10.0)


def test_validation_holds_out_the_same_seconds_for_every_topic_of_a_recording():
    # One recording: a camera's raw topic, its compressed copy (the same frames), and a second
    # camera whose stamps lie 30 ms later. 60 s at 10 Hz, 10 s blocks, 1 in 10 held out.
    topics = {'/cam/image_raw': 0.0, '/cam/image_raw/compressed': 0.0, '/cam2/image_raw': 0.03}
    runs = [Run('bag', topic, tuple(range(600)), tuple(offset + 0.1 * i for i in range(600)),
                (0,) * 600) for topic, offset in topics.items()]
    split = split_by_time_blocks(runs, val_fraction=0.1, block_s=10.0)
    held_seconds = {int(stamp // 10) for run in split.val for stamp in run.stamps_s}
    trained_seconds = {int(stamp // 10) for run in split.train for stamp in run.stamps_s}
    assert held_seconds and not held_seconds & trained_seconds, (held_seconds, trained_seconds)
    # Every topic is held out over the same seconds, and nothing is lost.
    assert sorted(run.topic for run in split.val) == sorted(topics)
    assert sum(map(len, split.train + split.val)) == 3 * 600
    assert 'the same seconds for every topic' in split.description


def test_training_lanes_always_carry_real_frames_and_every_process_takes_as_many_steps(
        tmp_path):
    # Five runs of 30, 3, 12, 20 and 6 frames (gaps of 3 s between them) on four lanes, two
    # processes with two lanes each: their own lanes need different numbers of steps.
    lengths = [30, 3, 12, 20, 6]
    stamps, offset = [], 0.0
    for length in lengths:
        stamps += [offset + 0.1 * i for i in range(length)]
        offset += 0.1 * length + 3.0
    bag = write_bag(tmp_path / 'bag', stamps, ['a'] * len(stamps))
    _, runs, _ = index_runs([str(bag)], '/scene_label', progress=False)
    assert sorted(map(len, runs)) == sorted(lengths)
    plan = plan_lanes(runs, lanes=4, clip_length=4, seed=0)
    steps = steps_for(runs, plan, 4)
    own = [steps_for(runs, plan[rank::2], 4) for rank in range(2)]
    assert own[0] != own[1]  # what deadlocked distributed training
    for rank in range(2):
        batches = ClipBatches(runs, plan[rank::2], 4, (32, 32), repeat=True, steps=steps)
        seen = 0
        for batch in batches:
            seen += 1
            for lane in range(2):
                valid = batch.valid[lane].numpy()
                assert valid.any(), f'step {seen}: lane {lane} holds no real frame'
                levels = batch.frames[lane, :, 0, 0, 0].numpy()[valid].astype(int)
                assert (np.diff(levels) == 1).all(), levels
        assert seen == steps
    # Validation reads every frame once: no repeats.
    once = ClipBatches(runs, plan, 4, (32, 32))
    assert sum(int(batch.valid.sum()) for batch in once) == sum(lengths)


def test_fewer_runs_than_the_batch_train_fewer_lanes_and_say_so():
    runs = [Run('bag', '/cam', (0, 1), (0.0, 0.1), (0, 0))] * 3
    assert lanes_for(runs, 2) == (2, '')
    lanes, why = lanes_for(runs, 32)
    assert lanes == 3 and '3 training runs for a batch of 32' in why
    assert lanes_for(runs, 32, processes=2)[0] == 2
    with pytest.raises(ValueError, match='fewer processes'):
        lanes_for(runs[:1], 32, processes=2)


def test_lanes_get_about_the_same_number_of_clips():
    runs = [Run('bag', '/cam', tuple(range(n)), tuple(0.1 * i for i in range(n)), (0,) * n)
            for n in (100, 10, 40, 40, 30, 70, 20, 5)]
    plan = plan_lanes(runs, lanes=3, clip_length=10, seed=1)
    assert sorted(i for lane in plan for i in lane) == list(range(len(runs)))
    clips = [sum(-(-len(runs[i]) // 10) for i in lane) for lane in plan]
    assert max(clips) - min(clips) <= 10  # the longest run alone is 10 clips
    assert plan == plan_lanes(runs, lanes=3, clip_length=10, seed=1)
