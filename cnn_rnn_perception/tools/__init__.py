"""
The ``cnn_rnn_perception`` command and its subcommands, one module each.

``cli`` is the table of commands; ``options`` the flags several commands share; each command
module (``train``, ``evaluate``, ``replay``, ``export``, ``bench``, ``bench_node``,
``bench_order``, ``selftest``, ``classify``, ``synth``, ``demo``) has ``add_arguments`` and
``main`` beside the code they drive. ``bags``, ``clips``, ``report``, ``ros_env`` and
``temporal_demo`` serve them; ``gpu_check`` and ``ros_from_source`` prepare environments (the
GPU machine; the ROS tools built from source). Imports the core and ``ros``; nothing imports
``tools``.
"""

__all__ = ['bags', 'bench', 'bench_node', 'bench_order', 'classify', 'cli', 'clips', 'demo',
           'evaluate', 'export', 'gpu_check', 'options', 'replay', 'report', 'ros_env',
           'ros_from_source', 'selftest', 'synth', 'temporal_demo', 'train']
