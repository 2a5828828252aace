"""The inference worker: batches of the newest frames, supervised, stopped cleanly."""

import threading
import time

from cnn_rnn_perception.core.engine import EngineSettings, TorchEngine
from cnn_rnn_perception.core.model_config import ModelConfig
from cnn_rnn_perception.ros.cameras import CameraRoster, LatestFrames
from cnn_rnn_perception.ros.engine_slot import EngineSlot, LoadedModel
from cnn_rnn_perception.ros.worker import InferenceWorker, run_supervised, stuck_after_s
import numpy as np
import pytest

CONFIG = ModelConfig(input_size=(64, 64), hidden_size=8, num_classes=3)
FRAME = np.full((48, 64, 3), 90, np.uint8)


def serving_slot() -> EngineSlot:
    def build(values, compiled):
        engine = TorchEngine.from_config(
            CONFIG, labels=['a', 'b', 'c'],
            settings=EngineSettings(device='cpu', compile_trunk=False, warmup_iterations=1))
        return LoadedModel(engine, engine.labels, values, compiled)
    ready = threading.Event()
    slot = EngineSlot(build, on_ready=lambda model: ready.set())
    slot.build({}, compiled=False)
    assert ready.wait(30)
    return slot


class Recorder:
    """What a node does with a batch: classify every frame with the engine, or reject it."""

    def __init__(self, slot: EngineSlot, fail_on: str = '') -> None:
        self.slot, self.fail_on = slot, fail_on
        self.published, self.rejected = [], []
        self.done = threading.Event()

    def classify(self, slots, handled) -> None:
        for topic in slots:
            if topic == self.fail_on:
                raise KeyError(topic)
            with self.slot.borrow() as model:
                result = model.engine.infer([slots[topic][0]])[0]
            self.published.append((topic, result.label))
            handled.add(topic)
        self.done.set()

    def reject(self, topic, reason) -> None:
        self.rejected.append((topic, reason))
        self.done.set()


def test_a_batch_that_raises_rejects_its_other_frames_and_the_worker_goes_on():
    rejected = []

    def classify(handled):
        handled.add('/a')  # published before the failure
        raise KeyError('boom')
    error = run_supervised(classify, ['/a', '/b', '/c'], lambda t, r: rejected.append((t, r)))
    assert isinstance(error, KeyError)
    assert sorted(topic for topic, _ in rejected) == ['/b', '/c']
    assert all(reason.startswith('internal error: KeyError') for _, reason in rejected)
    assert run_supervised(lambda handled: None, ['/a'], lambda t, r: None) is None


def test_the_worker_classifies_the_newest_frame_of_every_camera_and_stops():
    slot, frames = serving_slot(), LatestFrames()
    recorder = Recorder(slot)
    worker = InferenceWorker(frames, slot, recorder.classify, recorder.reject)
    worker.start()
    frames.put('/front', (FRAME, time.monotonic()))
    frames.put('/rear', (FRAME, time.monotonic()))
    deadline = time.monotonic() + 10
    while len(recorder.published) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(topic for topic, _ in recorder.published) == ['/front', '/rear']
    assert all(label in ('a', 'b', 'c') for _, label in recorder.published)
    assert worker.stop() and not worker.running
    frames.put('/front', (FRAME, time.monotonic()))
    time.sleep(0.3)
    assert len(recorder.published) == 2, 'a stopped worker classified a frame'


def test_a_raising_batch_is_counted_its_frames_rejected_and_the_next_one_served():
    slot, frames = serving_slot(), LatestFrames()
    recorder = Recorder(slot, fail_on='/broken')
    worker = InferenceWorker(frames, slot, recorder.classify, recorder.reject)
    worker.start()
    frames.put('/broken', (FRAME, time.monotonic()))
    assert recorder.done.wait(10)
    recorder.done.clear()
    frames.put('/front', (FRAME, time.monotonic()))
    assert recorder.done.wait(10)
    worker.stop()
    assert worker.errors == 1 and worker.restarts == 0
    assert [topic for topic, _ in recorder.rejected] == ['/broken']
    assert 'internal error: KeyError' in recorder.rejected[0][1]
    assert [topic for topic, _ in recorder.published] == ['/front']


@pytest.mark.filterwarnings('ignore::pytest.PytestUnhandledThreadExceptionWarning')
def test_a_dead_thread_is_restarted_and_a_stopped_worker_is_not():
    slot, frames = serving_slot(), LatestFrames()
    recorder = Recorder(slot)

    def die_once():
        if not died.is_set():
            died.set()
            raise SystemExit  # what run_supervised does not catch: the thread ends
    died = threading.Event()
    worker = InferenceWorker(frames, slot, recorder.classify, recorder.reject,
                             before_batch=die_once)
    worker.start()
    frames.put('/front', (FRAME, time.monotonic()))
    assert died.wait(10)
    time.sleep(0.2)
    assert worker.supervise() and worker.restarts == 1
    frames.put('/front', (FRAME, time.monotonic()))
    assert recorder.done.wait(10)
    assert not worker.supervise(), 'a live thread was restarted'
    worker.stop()
    assert not worker.supervise() and worker.restarts == 1


def test_an_abandoned_worker_never_comes_back_nor_publishes_its_stuck_batch():
    slot, frames = serving_slot(), LatestFrames()
    release, entered, batches = threading.Event(), threading.Event(), []
    published, refused = [], []

    def classify(slots, handled):
        batches.append(threading.current_thread())
        if len(batches) == 1:
            entered.set()
            release.wait(30)  # a batch stuck past the join
        with worker.publishing() as allowed:
            (published if allowed else refused).append(threading.current_thread())
        handled.update(slots)
    worker = InferenceWorker(frames, slot, classify, lambda topic, reason: None,
                             join_timeout_s=0.2)
    worker.start()
    frames.put('/front', (FRAME, time.monotonic()))
    assert entered.wait(10)
    assert worker.busy_for() is not None
    assert not worker.stop(), 'a stuck batch was not reported'
    worker.start()
    release.set()  # the abandoned batch returns; its thread must end, not serve on
    for _ in range(5):
        frames.put('/front', (FRAME, time.monotonic()))
        time.sleep(0.1)
    worker.stop()
    assert len(set(batches[1:])) == 1 and batches[0] not in batches[1:]
    assert not batches[0].is_alive()
    assert refused == [batches[0]], 'the abandoned batch was published'
    assert published and batches[0] not in published


def test_a_batch_counts_as_stuck_after_at_least_ten_seconds():
    assert stuck_after_s(1.0) == 10.0 and stuck_after_s(5.0) == 15.0


def test_a_removed_camera_keeps_its_counters_until_the_worker_retires_it():
    frames = LatestFrames()
    roster = CameraRoster(frames)
    roster.set_topics(['/a', '/b'])
    for topic, count in (('/a', 3), ('/b', 4)):
        for _ in range(count):
            roster.get(topic).on_received()
    roster.get('/b').on_classified(5.0)
    frames.put('/b', 'the frame still waiting')
    batch_stats = roster.get('/b')  # a batch under way holds /b
    roster.set_topics(['/a'])  # image_topics changed under it
    assert roster.get('/b') is batch_stats and roster.retiring
    batch_stats.on_classified(5.0)  # the batch publishes: nothing is missing
    roster.on_rejected('/b', 'bad encoding')
    (final,) = roster.retire()  # between batches
    assert roster.get('/b') is None and not roster.retiring
    # The frame it still had waiting was never classified: a stale drop. All 4 accounted.
    assert final['topic'] == '/b' and final['received'] == 4
    assert (final['classified'], final['rejected'], final['dropped_stale']) == (2, 1, 1)
    assert frames.drain() == {}
    roster.set_topics(['/a', '/c'])
    roster.get('/c').on_received()
    frames.put('/c', 'waiting')
    roster.set_topics(['/a', '/b'])
    roster.set_topics(['/a', '/c'])  # back before the worker came round: /c is kept
    assert not [s for s in roster.retire() if s['topic'] == '/c']
    roster.set_topics(['/a'])
    (final,) = roster.retire()
    assert final['topic'] == '/c' and final['received'] == final['dropped_stale'] == 1
    assert roster.get('/b') is None  # /b was added and removed between two retirements
