"""
The ``cnn_rnn_perception`` command and its subcommands, grouped by the job a user comes for.

``cli`` is the table of commands and ``options`` the flags several commands share; ``report``
draws plots and tables and ``distributed`` is what torchrun processes share. The groups:
``training`` (train, export), ``evaluation`` (evaluate, replay, bags), ``benchmarks`` (bench,
bench-node, bench-order, selftest, classify), ``synthetic`` (synth) and ``environment``
(loopback DDS, ROS from source, the GPU check); ``demo`` runs the whole product. Each command
module has ``add_arguments`` and ``main`` beside the code they drive. Imports the core and
``ros``; nothing imports ``tools``.
"""
