"""
CNN-RNN scene classification for ROS 2 navigation stacks.

The core (``model``, ``preprocess``, ``engine``) has no ROS imports; ``node`` is the rclpy
adapter over it.
"""

__version__ = '0.1.0'
