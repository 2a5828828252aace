"""
Which environment variable loads a Fast DDS profile on this machine.

Fast DDS 3 (Kilted and later) reads ``FASTDDS_DEFAULT_PROFILES_FILE`` and warns that
``FASTRTPS_DEFAULT_PROFILES_FILE`` is deprecated; Fast DDS 2 (Humble, Jazzy) reads only the
latter (with the first alone, Jazzy in CI lost 307 KB best-effort frames). No rclpy import, so
the launch file and the tools can ask before any node starts.
"""

from __future__ import annotations

from importlib import metadata
import os

FAST_DDS_2_DISTROS = ('humble', 'iron', 'jazzy')
VARIABLES = ('FASTDDS_DEFAULT_PROFILES_FILE', 'FASTRTPS_DEFAULT_PROFILES_FILE')


def profile_variables() -> tuple[str, ...]:
    """Return the variable names this machine's Fast DDS reads a profile from."""
    distro = os.environ.get('ROS_DISTRO', '')  # set by a sourced ROS install
    if distro:
        return VARIABLES[1:] if distro in FAST_DDS_2_DISTROS else VARIABLES[:1]
    for package, variables in (('ros-fastdds', VARIABLES[:1]), ('ros-fastrtps', VARIABLES[1:])):
        try:  # the PyPI wheels: ros-fastdds is Fast DDS 3, ros-fastrtps Fast DDS 2
            metadata.version(package)
            return variables
        except metadata.PackageNotFoundError:
            continue
    return VARIABLES
