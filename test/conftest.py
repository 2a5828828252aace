"""Test-wide environment: DDS stays on loopback, in a domain of this run's own."""

import os
import random
import sys

# Set before anything imports rclpy, and inherited by every process a test starts.
os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
os.environ['ROS_STATIC_PEERS'] = ''
os.environ.setdefault('ROS_DOMAIN_ID', str(random.SystemRandom().randint(1, 101)))
# ament_index_python finds the pip-installed ROS packages under the venv prefix.
os.environ.setdefault('AMENT_PREFIX_PATH', sys.prefix)
# The large shared-memory profile the launch file loads: best-effort camera frames arrive.
os.environ.setdefault('FASTDDS_DEFAULT_PROFILES_FILE',
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   'config', 'fastdds_shm.xml'))
