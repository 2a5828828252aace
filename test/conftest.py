"""Test-wide environment: DDS stays on loopback, in a domain of this run's own."""

import os
import sys

from cnn_rnn_perception.tools.environment.ros_env import use_loopback_dds

use_loopback_dds()
# ament_index_python finds the pip-installed ROS packages under the venv prefix.
os.environ.setdefault('AMENT_PREFIX_PATH', sys.prefix)
