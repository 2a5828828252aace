"""
The ROS 2 adapter: ``perception_node`` (the lifecycle node and its ``main``) over the core.

``parameters`` (every parameter, its descriptor and checks), ``cameras`` (per-camera
counters, the newest frame of each, supervised batches), ``outputs`` (the messages the node
publishes, built by pure functions) and ``engine_slot`` (engines built in the background and
swapped in whole). Imports the core, never ``tools``. Start reading at ``perception_node``.
"""

__all__ = ['cameras', 'engine_slot', 'outputs', 'parameters', 'perception_node']
