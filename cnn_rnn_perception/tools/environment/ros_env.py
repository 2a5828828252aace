"""
DDS on loopback, for every test, benchmark and demo that starts ROS processes.

Set before rclpy is imported, and inherited by every process started afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path
import random
import signal
import subprocess
import sys
import threading

from cnn_rnn_perception.ros.dds import profile_variables


def dds_profile() -> str | None:
    """Return config/fastdds_shm.xml from a source checkout, a pip or a colcon install."""
    checkout = str(Path(__file__).resolve().parents[3])
    candidates = [os.path.join(checkout, 'config', 'fastdds_shm.xml'),
                  os.path.join(sys.prefix, 'share', 'cnn_rnn_perception', 'config',
                               'fastdds_shm.xml')]
    try:
        from ament_index_python.packages import get_package_share_directory
        candidates.append(os.path.join(get_package_share_directory('cnn_rnn_perception'),
                                       'config', 'fastdds_shm.xml'))
    except Exception:  # not in an ament index (a source checkout): the other places remain
        pass
    return next((path for path in candidates if os.path.isfile(path)), None)


def use_loopback_dds(domain_id: int | None = None) -> int:
    """Keep discovery on this machine, in a domain of this run's own; return the domain id."""
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    os.environ['ROS_STATIC_PEERS'] = ''
    if domain_id is None:
        domain_id = int(os.environ.get('ROS_DOMAIN_ID') or
                        random.SystemRandom().randint(1, 101))
    os.environ['ROS_DOMAIN_ID'] = str(domain_id)
    # Large camera frames need the 16 MB shared-memory segment (see config/fastdds_shm.xml).
    profile = dds_profile()
    if profile:
        for name in profile_variables():
            os.environ.setdefault(name, profile)
    return domain_id


class BackgroundNode:
    """An rclpy node in a context of its own, spun by a background thread (tools and tests)."""

    def __init__(self, name: str) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self._rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop spinning, then tear down; a thread left spinning at exit aborts the process."""
        self.executor.shutdown()
        self._thread.join(timeout=5)
        self.node.destroy_node()
        self._rclpy.shutdown(context=self.context)


def stop_process(process: subprocess.Popen, timeout_s: float = 20.0) -> int:
    """Stop a node process as Ctrl-C would (SIGINT), killing it if it does not exit in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
