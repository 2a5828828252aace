"""
What the node's process needs around rclpy: its log records and its stop signals.

The core modules log with Python's ``logging``; ``forward_core_logs`` sends those records to
the node's ROS logger, so ``ros2 launch`` and ``/rosout`` show them with the node's name.
``stop_on_signals`` replaces rclpy's signal handlers with an event the spin loop watches.
"""

from __future__ import annotations

import logging
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RosLogHandler(logging.Handler):
    """Send Python log records to a ROS logger at the matching severity."""

    def __init__(self, ros_logger) -> None:
        super().__init__()
        self._ros_logger = ros_logger

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self._ros_logger.error(record.getMessage())
        elif record.levelno >= logging.WARNING:
            self._ros_logger.warning(record.getMessage())
        else:
            self._ros_logger.info(record.getMessage())


def forward_core_logs(ros_logger) -> None:
    """Route the package's log records (INFO and up) to ``ros_logger`` only."""
    core_logger = logging.getLogger('cnn_rnn_perception')
    core_logger.setLevel(logging.INFO)
    core_logger.propagate = False
    core_logger.handlers = [RosLogHandler(ros_logger)]


def stop_on_signals() -> threading.Event:
    """
    Return an event that SIGINT and SIGTERM set, however often they come.

    rclpy's own handlers shut the context down at the first signal, before the node could
    publish its last diagnostics, and a second Ctrl-C (the terminal's and the one ``ros2
    launch`` forwards arrive together) raised KeyboardInterrupt in the middle of
    ``destroy_node``. Here a signal only asks the spin loop to stop.
    """
    stop = threading.Event()
    for number in STOP_SIGNALS:
        signal.signal(number, lambda *_: stop.set())
    return stop


def ignore_stop_signals() -> None:
    """
    Ignore SIGINT and SIGTERM from here on.

    Once shutdown starts a signal could only cut it short; and while the interpreter exits,
    Python puts back the default (fatal) handlers of those it caught.
    """
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
