"""
The engine a node runs, and the background builds that replace it without a gap.

A model change must never leave a robot blind: the new engine is built off the caller's
thread while the old one keeps classifying, and the switch is one assignment under the lock the
inference worker holds for each batch. A build that fails leaves the old engine running. A
build is staged: an eager engine first (ready in about a second), then, when asked, a compiled
one, which replaces the eager one when its warm-up is done; frames are served all the while.

No ROS here: the node drives it, and the tests drive it directly.
"""

from __future__ import annotations

from concurrent.futures import Future
# Not the builtin TimeoutError before Python 3.11 (Humble's Python is 3.10).
from concurrent.futures import TimeoutError as FutureTimeout
import contextlib
from dataclasses import dataclass, field
import logging
import queue
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from cnn_rnn_perception.core.engine import EngineBase

_LOG = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """An engine with the labels it publishes and the settings it was built from."""

    engine: EngineBase
    labels: list[str]
    values: dict[str, Any] = field(default_factory=dict)
    compiled: bool = False

    def close(self) -> None:
        self.engine.close()


# factory(values, compiled) -> LoadedModel; raises on any failure.
Factory = Callable[[dict[str, Any], bool], LoadedModel]


class EngineSlot:
    """
    Holds the current ``LoadedModel`` and builds its replacements in a background thread.

    ``on_ready(model)`` is called (from the builder thread) after each swap; ``on_failed(values,
    error)`` when a build fails. Builds run one at a time; a build overtaken by a newer request
    or by ``release`` is thrown away instead of swapped in.
    """

    def __init__(self, factory: Factory, *,
                 on_ready: Callable[[LoadedModel], None] = lambda model: None,
                 on_failed: Callable[[dict[str, Any], BaseException], None] = (
                     lambda values, error: None)) -> None:
        self._factory = factory
        self._on_ready = on_ready
        self._on_failed = on_failed
        self._use_lock = threading.Lock()     # held by the worker for a batch, and by a swap
        self._state_lock = threading.Lock()   # guards generation, status and the builders
        self._build_lock = threading.Lock()   # one build at a time
        self._current: LoadedModel | None = None
        self._generation = 0
        self._status = 'empty'
        self._builders: list[threading.Thread] = []
        self._tasks: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._abandoned: list[LoadedModel] = []  # released while a stuck batch still used them
        self._worker_thread: threading.Thread | None = None  # the one that calls serve_tasks

    # -- for the inference worker --------------------------------------------------------------

    @contextlib.contextmanager
    def borrow(self) -> Iterator[LoadedModel | None]:
        """Yield the current model (or None) and keep it from being swapped out meanwhile."""
        with self._use_lock:
            model = self._current
            try:
                yield model
            finally:
                # Released while this batch was stuck in it: the batch closes what it used.
                self._close_abandoned()

    @property
    def worker_serves(self) -> bool:
        """Return whether a worker thread serves tasks (set True from that thread)."""
        return self._worker_thread is not None

    @worker_serves.setter
    def worker_serves(self, serving: bool) -> None:
        self._worker_thread = threading.current_thread() if serving else None

    def serve_tasks(self) -> None:
        """Run what builders asked the worker thread to run (called between batches)."""
        while True:
            try:
                task, future = self._tasks.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(task())
            except BaseException as error:  # handed back to the builder that asked
                future.set_exception(error)

    def on_worker(self, task: Callable[[], Any]) -> Any:
        """
        Run ``task`` in the inference worker's thread, between two batches, and return its result.

        Timing a backend means timing it where it will run: on two cores an engine measured
        in another thread than the worker's ran up to a third faster or slower there. With no
        worker serving (the command-line tools), ``task`` runs here.
        """
        worker = self._worker_thread
        if worker is None or worker is threading.current_thread():  # here is where it runs
            return task()
        future: Future = Future()
        self._tasks.put((task, future))
        while not future.done():
            if not self.worker_serves:  # the worker stopped meanwhile: serve it here
                self.serve_tasks()
            try:
                return future.result(timeout=0.1)
            except FutureTimeout:
                continue
        return future.result()

    @property
    def current(self) -> LoadedModel | None:
        """Return the current model; use ``borrow`` to run it."""
        return self._current

    @property
    def status(self) -> str:
        """Return 'empty', 'loading', 'ready', 'compiling' or 'failed: <reason>'."""
        return self._status

    # -- for the node's lifecycle -----------------------------------------------------------------

    def build(self, values: dict[str, Any], *, compiled: bool) -> None:
        """Start building an engine for ``values``; the current one serves until it is ready."""
        with self._state_lock:
            self._generation += 1
            generation = self._generation
            self._status = 'loading'
            thread = threading.Thread(target=self._build,
                                      args=(generation, dict(values), compiled),
                                      name=f'engine-build-{generation}', daemon=True)
            self._builders = [t for t in self._builders if t.is_alive()] + [thread]
        thread.start()

    def release(self, timeout_s: float | None = None) -> None:
        """
        Drop the current engine (freeing its device memory) and abandon builds under way.

        A batch stuck in the engine for longer than ``timeout_s`` does not hold this up (a
        deactivate must answer): the engine is dropped at once and closed by that batch
        when it returns.
        """
        with self._state_lock:
            self._generation += 1
            self._status = 'empty'
        if not self._use_lock.acquire(timeout=-1 if timeout_s is None else timeout_s):
            with self._state_lock:
                old, self._current = self._current, None
                if old is not None:
                    self._abandoned.append(old)
            _LOG.error('an inference batch is stuck in the engine; it is released without '
                       'waiting and closed when that batch returns')
            # The batch may have returned meanwhile, before the engine was on the list.
            if self._use_lock.acquire(blocking=False):
                try:
                    self._close_abandoned()
                finally:
                    self._use_lock.release()
            return
        try:
            old, self._current = self._current, None
        finally:
            self._use_lock.release()
        if old is not None:
            old.close()

    def _close_abandoned(self) -> None:
        """Close released engines; called with the use lock held, so no batch is in one."""
        with self._state_lock:
            abandoned, self._abandoned = self._abandoned, []
        for model in abandoned:
            model.close()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait for builds under way to end (tests, shutdown); return False on time-out."""
        deadline = time.monotonic() + timeout_s
        for thread in list(self._builders):
            thread.join(max(deadline - time.monotonic(), 0.0))
        return not any(thread.is_alive() for thread in self._builders)

    # -- the builder thread ---------------------------------------------------------------------

    def _stale(self, generation: int) -> bool:
        return generation != self._generation

    def _build(self, generation: int, values: dict[str, Any], compiled: bool) -> None:
        with self._build_lock:
            stages: Sequence[bool] = (False, True) if compiled else (False,)
            serving = False  # an engine of this build is in service
            for stage_compiled in stages:
                if self._stale(generation):
                    return
                with self._state_lock:
                    if not self._stale(generation):
                        self._status = 'compiling' if stage_compiled else 'loading'
                try:
                    model = self._factory(values, stage_compiled)
                except Exception as error:  # any build failure leaves the old engine running
                    if serving:  # the eager engine of these values stays; only speed is lost
                        _LOG.warning('building the compiled engine failed (%s); the eager '
                                     'engine keeps serving', error)
                        with self._state_lock:
                            if not self._stale(generation):
                                self._status = 'ready'
                        return
                    with self._state_lock:
                        stale = self._stale(generation)
                        if not stale:
                            self._status = f'failed: {error}'
                    if not stale:
                        self._on_failed(values, error)
                    return
                if not self._swap(generation, model):
                    return
                serving = True
                self._on_ready(model)

    def _swap(self, generation: int, model: LoadedModel) -> bool:
        with self._use_lock:  # waits for the batch in flight, if any
            with self._state_lock:
                if self._stale(generation):
                    stale = True
                else:
                    stale = False
                    old, self._current = self._current, model
                    self._status = 'ready'
                    # The compiled engine of the same build replaces the eager one: the
                    # cameras keep their temporal memory (no batch runs while we hold the lock).
                    if old is not None and model.compiled and old.values == model.values:
                        model.engine.carry_state_from(old.engine)
        if stale:
            model.close()
            return False
        if old is not None:
            old.close()
        return True
