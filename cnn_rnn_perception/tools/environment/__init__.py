"""
Environment: DDS on loopback for tools and tests, ROS packages built from source, the GPU check.

Nothing here classifies: ``ros_env`` keeps every started process on loopback DDS,
``ros_from_source`` builds what has no PyPI wheel into a venv, ``gpu_check`` prepares and runs
the GPU machine's checks.
"""
