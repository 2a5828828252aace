"""The engine slot: background builds, one swap, failures that change nothing."""

import threading
import time

from cnn_rnn_perception.core.engine import EngineSettings, TorchEngine
from cnn_rnn_perception.core.model_config import ModelConfig
from cnn_rnn_perception.ros.engine_slot import EngineSlot, LoadedModel
import numpy as np

CONFIG = ModelConfig(input_size=(64, 64), hidden_size=8, num_classes=3)
FRAME = np.full((48, 64, 3), 90, np.uint8)


def factory(events, fail_on=(), delay_s=0.0):
    def build(values, compiled):
        events.append(('build', values['name'], compiled))
        time.sleep(delay_s)
        if values['name'] in fail_on:
            raise RuntimeError(f'cannot build {values["name"]}')
        engine = TorchEngine.from_config(
            CONFIG, labels=[f'{values["name"]}_{i}' for i in range(3)],
            settings=EngineSettings(device='cpu', compile_trunk=False, warmup_iterations=1))
        return LoadedModel(engine, engine.labels, values, compiled)
    return build


def ready_slot(events, **kwargs):
    ready = threading.Event()
    failures = []
    slot = EngineSlot(factory(events, **kwargs), on_ready=lambda model: ready.set(),
                      on_failed=lambda values, error: failures.append(str(error)))
    return slot, ready, failures


def test_the_old_engine_serves_until_the_new_one_is_ready_then_one_swap():
    events = []
    slot, ready, _ = ready_slot(events, delay_s=0.5)
    slot.build({'name': 'a'}, compiled=False)
    assert ready.wait(10) and slot.current.labels[0] == 'a_0'
    first = slot.current
    ready.clear()
    slot.build({'name': 'b'}, compiled=False)
    served = []
    while not ready.is_set():  # the old engine answers throughout the build
        with slot.borrow() as model:
            served.append(model.engine.infer([FRAME])[0].label.split('_')[0])
    # Old until the swap, then new: never a gap, never back.
    switched = served.index('b') if 'b' in served else len(served)
    assert switched > 0 and set(served[:switched]) == {'a'} and set(served[switched:]) <= {'b'}
    assert slot.current.labels[0] == 'b_0' and slot.status == 'ready'
    assert not hasattr(first.engine, '_model'), 'the replaced engine was not released'


def test_a_failed_build_leaves_the_running_engine_and_reports_why():
    events = []
    slot, ready, failures = ready_slot(events, fail_on=('broken',))
    slot.build({'name': 'a'}, compiled=False)
    assert ready.wait(10)
    slot.build({'name': 'broken'}, compiled=False)
    assert slot.wait_idle(10)
    assert failures == ['cannot build broken']
    assert slot.status == 'failed: cannot build broken'
    with slot.borrow() as model:
        assert model.labels[0] == 'a_0' and model.engine.infer([FRAME])[0].label


def test_a_compiled_build_serves_eager_first_and_a_newer_request_wins():
    events = []
    slot, ready, _ = ready_slot(events, delay_s=0.3)
    slot.build({'name': 'a'}, compiled=True)
    slot.build({'name': 'b'}, compiled=True)  # overtakes a before it is swapped in
    assert slot.wait_idle(20)
    assert slot.current.values['name'] == 'b' and slot.current.compiled
    assert ('build', 'b', False) in events and ('build', 'b', True) in events
    assert ('build', 'a', True) not in events


def test_release_drops_the_engine_and_abandons_a_build_under_way():
    events = []
    slot, ready, _ = ready_slot(events, delay_s=0.5)
    slot.build({'name': 'a'}, compiled=False)
    slot.release()
    assert slot.wait_idle(10)
    assert slot.current is None and slot.status == 'empty'


def test_a_timing_task_runs_in_the_worker_thread_or_here_when_no_worker_serves():
    slot = EngineSlot(factory([]))
    assert slot.on_worker(threading.get_ident) == threading.get_ident()  # no worker yet
    stop = threading.Event()
    worker_ids = []

    def worker():
        worker_ids.append(threading.get_ident())
        slot.worker_serves = True
        while not stop.is_set():
            slot.serve_tasks()
            time.sleep(0.01)
        slot.worker_serves = False

    thread = threading.Thread(target=worker)
    thread.start()
    while not slot.worker_serves:
        time.sleep(0.01)
    assert slot.on_worker(threading.get_ident) == worker_ids[0]
    stop.set()
    thread.join()
    assert slot.on_worker(lambda: 'served here') == 'served here'


def test_release_does_not_wait_for_a_stuck_batch_and_the_batch_closes_the_engine():
    events = []
    slot, ready, _ = ready_slot(events)
    slot.build({'name': 'a'}, compiled=False)
    assert ready.wait(10)
    stuck, entered = threading.Event(), threading.Event()

    def batch():
        with slot.borrow():
            entered.set()
            stuck.wait(30)  # a batch that hangs, past the node's 5 s join

    worker = threading.Thread(target=batch, daemon=True)
    worker.start()
    assert entered.wait(5)
    model = slot.current
    released = threading.Thread(target=slot.release, kwargs={'timeout_s': 0.5}, daemon=True)
    started = time.monotonic()
    released.start()
    released.join(5)
    assert not released.is_alive() and time.monotonic() - started < 3, 'release hung'
    assert slot.current is None and hasattr(model.engine, '_model')  # still in use
    stuck.set()
    worker.join(5)
    assert not hasattr(model.engine, '_model'), 'the abandoned engine was never closed'


def test_the_compiled_engine_of_the_same_build_keeps_each_cameras_temporal_state():
    temporal = ModelConfig(input_size=(64, 64), hidden_size=8, num_classes=3, temporal='gru',
                           temporal_hidden_size=8)
    proceed = threading.Event()

    def build(values, compiled):
        if compiled:  # the compiled stage starts once the eager engine has seen frames
            proceed.wait(30)
        engine = TorchEngine.from_config(
            temporal, settings=EngineSettings(device='cpu', compile_trunk=False,
                                              warmup_iterations=1))
        return LoadedModel(engine, engine.labels, values, compiled)

    swapped = threading.Event()
    slot = EngineSlot(build, on_ready=lambda model: model.compiled and swapped.set())
    slot.build({'name': 'a'}, compiled=True)
    wait = time.monotonic() + 30
    while slot.current is None and time.monotonic() < wait:
        time.sleep(0.01)
    frames = [np.full((48, 64, 3), 40 * index, np.uint8) for index in range(4)]
    got = []
    for index, frame in enumerate(frames):
        if index == 2:  # the compiled engine takes over between the camera's frames
            proceed.set()
            assert swapped.wait(30)
        with slot.borrow() as model:
            got.append(model.engine.infer([frame], streams=['cam'], stamps=[0.1 * index])[0])
    reference = TorchEngine.from_config(temporal, settings=EngineSettings(
        device='cpu', compile_trunk=False, warmup_iterations=1))
    want = [reference.infer([frame], streams=['cam'], stamps=[0.1 * index])[0]
            for index, frame in enumerate(frames)]
    np.testing.assert_allclose([r.probabilities for r in got],
                               [r.probabilities for r in want], atol=1e-5)
    with slot.borrow() as model:
        assert model.compiled and model.engine.stream_status()['cam'].frames == 4


def test_a_task_for_the_worker_waits_for_it_however_long_the_worker_takes():
    # The node's worker serves tasks between batches; a batch takes longer than the builder's
    # 0.1 s poll. On Python 3.10 that poll raises concurrent.futures.TimeoutError, which is
    # not the builtin TimeoutError there, and backend auto failed to load on Humble.
    slot = EngineSlot(lambda values, compiled: None)
    stop = threading.Event()

    def worker():
        slot.worker_serves = True
        while not stop.wait(0.35):  # a batch of 0.35 s, then the queued tasks
            slot.serve_tasks()
        slot.worker_serves = False

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    while not slot.worker_serves:
        time.sleep(0.01)
    ran_in = []
    assert slot.on_worker(lambda: ran_in.append(threading.current_thread()) or 42) == 42
    assert ran_in == [thread]
    stop.set()
    thread.join(5)
