"""
The node's inference thread: one supervised worker that turns the newest frames into batches.

The image callbacks only store frames (``LatestFrames``); this worker takes the newest frame of
every camera, hands them to the node's ``classify`` as one batch, and serves the engine slot's
tasks between batches (backend ``auto``'s timing rounds and CUDA graph captures run where the
batches run). Nothing a batch raises stops it or loses a frame (``run_supervised``); a thread
that died anyway is restarted by ``supervise``; ``stop`` gives a stuck batch 5 s and then
abandons it. Each thread owns its stop event, so a thread given up on can never be woken
back into a second worker by a later ``start``, and ``publishing`` refuses it once its stuck
batch returns: the results of a worker given up on are never published.

No ROS here: the node drives it, and the tests drive it directly.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Callable, Iterable, Iterator

from cnn_rnn_perception.ros.cameras import LatestFrames
from cnn_rnn_perception.ros.engine_slot import EngineSlot

_LOG = logging.getLogger(__name__)

Slots = dict[str, tuple[Any, float]]
# classify(slots, handled): publish or reject each topic of the batch, adding it to handled.
Classify = Callable[[Slots, set], None]
Reject = Callable[[str, str], None]


def run_supervised(classify: Callable[[set], None], topics: Iterable[str],
                   reject: Reject) -> Exception | None:
    """
    Run one batch so that nothing it raises stops the worker or loses a frame.

    ``classify(handled)`` adds each topic it published or rejected to ``handled``; when it
    raises, every other topic of the batch is rejected with the error, and the error returned.
    """
    handled: set[str] = set()
    try:
        classify(handled)
    except Exception as error:  # noqa: B902 - one bad batch must not stop the cameras
        reason = f'internal error: {type(error).__name__}: {error}'
        for topic in set(topics) - handled:
            reject(topic, reason)
        return error
    return None


def stuck_after_s(silent_after_s: float) -> float:
    """Return how long one batch may run before the worker counts as stuck."""
    # Batches take milliseconds to a second; compiling never happens in the worker.
    return max(10.0, 3.0 * silent_after_s)


class InferenceWorker:
    """
    Runs batches of the newest frames in one thread, supervised.

    ``before_batch()`` runs in the worker's thread before each batch, and at least every 0.2 s
    while none comes (the node applies live parameter changes and retires removed cameras
    there); ``min_interval_s()`` is the least time from one batch's start to the next
    (``max_rate_hz``).
    """

    def __init__(self, frames: LatestFrames, slot: EngineSlot, classify: Classify,
                 reject: Reject, *, before_batch: Callable[[], None] = lambda: None,
                 min_interval_s: Callable[[], float] = lambda: 0.0,
                 join_timeout_s: float = 5.0) -> None:
        self._frames = frames
        self._slot = slot
        self._classify = classify
        self._reject = reject
        self._before_batch = before_batch
        self._min_interval_s = min_interval_s
        self._join_timeout_s = join_timeout_s
        self._thread: threading.Thread | None = None
        self._stop: threading.Event | None = None
        # Held while results are published, and by ``stop`` as it retires a thread: once
        # ``stop`` has returned, that thread publishes nothing more.
        self._publish_lock = threading.Lock()
        self._busy_since: float | None = None
        self.errors = 0      # batches that raised; their frames were rejected
        self.restarts = 0    # threads found dead while they should run, and started again

    @property
    def running(self) -> bool:
        """Return True between ``start`` and ``stop``: a worker thread should be alive."""
        return self._stop is not None

    def busy_for(self, now: float | None = None) -> float | None:
        """Return how long the batch in progress has run, or None between batches."""
        busy_since = self._busy_since
        if busy_since is None:
            return None
        return (time.monotonic() if now is None else now) - busy_since

    def start(self) -> None:
        """Start a worker thread with a stop event of its own."""
        self._frames.reopen()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._stop,),
                                        name='inference', daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def publishing(self) -> Iterator[bool]:
        """
        Yield whether the calling thread may publish its batch's results now.

        Only the running worker's thread may; one that ``stop`` retired (a stuck batch that
        returned after it was abandoned) may not. ``stop`` waits for a publish under way.
        """
        with self._publish_lock:
            stop = self._stop
            yield (stop is not None and not stop.is_set()
                   and threading.current_thread() is self._thread)

    def stop(self) -> bool:
        """Stop the thread; return False when a stuck batch made it be abandoned."""
        with self._publish_lock:
            stop, thread = self._stop, self._thread
            self._stop = self._thread = None
            self._busy_since = None
            if stop is None:
                return True
            stop.set()
        self._frames.close()
        thread.join(timeout=self._join_timeout_s)
        if thread.is_alive():
            _LOG.error(f'the inference worker did not stop within {self._join_timeout_s:g} s '
                       '(a batch is stuck); it is abandoned')
            return False
        return True

    def supervise(self) -> bool:
        """Restart a thread that died while it should run; return True when it did."""
        if self._stop is None or (self._thread is not None and self._thread.is_alive()):
            return False
        self.restarts += 1
        _LOG.error(f'the inference worker had stopped; restarted it (restart {self.restarts})')
        self.start()
        return True

    def _run(self, stop: threading.Event) -> None:
        self._slot.worker_serves = True
        try:
            self._serve_frames(stop)
        finally:
            self._slot.worker_serves = False
            self._slot.serve_tasks()  # a builder waiting on this thread must not hang

    def _serve_frames(self, stop: threading.Event) -> None:
        next_batch_at = 0.0
        while not stop.is_set():
            self._slot.serve_tasks()
            wait = next_batch_at - time.monotonic()
            if wait > 0 and stop.wait(wait):
                break
            if self._slot.current is None:
                # The engine is still being built: frames wait in their slots (a newer
                # frame replaces an older one, counted as stale).
                stop.wait(0.05)
                continue
            self._before_batch()
            slots = self._frames.take_all(timeout_s=0.2)
            if not slots:
                continue
            self._before_batch()
            next_batch_at = time.monotonic() + self._min_interval_s()
            current = stop is self._stop  # an abandoned thread must not reset the new one's
            if current:
                self._busy_since = time.monotonic()
            try:
                error = run_supervised(lambda handled: self._classify(slots, handled), slots,
                                       self._reject)
            finally:
                if current and stop is self._stop:
                    self._busy_since = None
            if error is not None:
                self.errors += 1
                _LOG.error(f'inference batch failed ({type(error).__name__}: {error}); the '
                           'worker goes on with the next frames')
