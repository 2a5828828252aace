"""
The ROS 2 adapter: ``perception_node`` (the lifecycle node and its ``main``) over the core.

The node only translates; its parts, each with its own tests:

- ``parameters``: every parameter, its descriptor and checks, and the engine they describe;
- ``subscriptions``: one subscription per camera, each storing only the newest frame;
- ``worker``: the supervised inference thread that turns those frames into batches;
- ``cameras``: per-camera counters and the newest-frame slots (no ROS);
- ``engine_slot``: engines built in the background and swapped in whole (no ROS);
- ``navigation_link``: the robot's decision and what it sends Nav2;
- ``outputs``: the messages and ``/diagnostics`` statuses, built by pure functions;
- ``publishers``: the lifecycle publishers and their QoS; ``runtime``: logs and signals.

Imports the core, never ``tools``. Start reading at ``perception_node``.
"""

__all__ = ['cameras', 'engine_slot', 'navigation_link', 'outputs', 'parameters',
           'perception_node', 'publishers', 'runtime', 'subscriptions', 'worker']
