"""
The ROS 2 pieces that have no PyPI wheel, built from upstream sources into a venv of the wheels.

What a robot gets from apt, a machine without ROS gets here, so that tests drive the node with
the tools an engineer types: ``vision_msgs`` and ``composition_interfaces`` (interface
packages: plain CMake against the wheels, installed into the venv prefix; ``nav2_msgs`` with
what it needs, ``nav2_common`` and ``geographic_msgs``), the launch system
and the ``ros2`` command line (Python packages: ``pip install --no-deps``), and the ament index
entries of this package itself (``share/cnn_rnn_perception``, and ``lib/cnn_rnn_perception/``
launchers, where ``ros2 run`` and ``launch_ros`` look for executables). The facts this follows
were measured and are written down in ``shared/reference/ros2-on-pip.md``.

Each step is skipped when what it would install is already there from the same sources, so
``make setup`` stays fast after the first time. No upstream file is changed: the one obstacle
(the wheels' CMake exports name include dirs of the container they were built in) is handled
by a CMake file given with ``-DCMAKE_PROJECT_INCLUDE`` that corrects the imported targets.

    python -m cnn_rnn_perception.tools.environment.ros_from_source --distro kilted|jazzy
        --sources DIR
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys
import sysconfig
import time

PACKAGE = 'cnn_rnn_perception'
# Interface packages, built with CMake in this order, by their folder under the sources.
CMAKE_PACKAGES = {
    'composition_interfaces': '{distro}/rcl_interfaces/composition_interfaces',  # launch_ros
    'vision_msgs': 'vision_msgs-*/vision_msgs',
    # nav2_msgs (SpeedLimit for the scene policy) needs nav2_common's CMake macros and
    # geographic_msgs first; it is the long one (about 4 minutes on 2 cores).
    'nav2_common': 'navigation2-{distro}/nav2_common',
    'geographic_msgs': 'geographic_info-ros2/geographic_msgs',
    'nav2_msgs': 'navigation2-{distro}/nav2_msgs',
}
# Python packages, one pip call. launch_testing, launch_pytest and launch_testing_ros are left
# out: they register pytest plugins that break under the pinned pytest 9.
PYTHON_PACKAGES = (
    '{distro}/rosidl_runtime_py', '{distro}/launch/launch', '{distro}/launch/launch_xml',
    '{distro}/launch/launch_yaml', '{distro}/launch_ros/launch_ros',
    '{distro}/launch_ros/ros2launch', '{distro}/ros2cli/ros2cli', '{distro}/ros2cli/ros2node',
    '{distro}/ros2cli/ros2service', '{distro}/ros2cli/ros2param',
    '{distro}/ros2cli/ros2lifecycle', '{distro}/ros2cli/ros2topic', '{distro}/ros2cli/ros2run',
    '{distro}/ros2cli/ros2pkg', '{distro}/ros2cli/ros2interface',
)
# The executables of this package, as ros2 run and launch_ros find them on a robot.
EXECUTABLES = ('perception_node', PACKAGE)

FIX_INCLUDES = """\
# Written by cnn_rnn_perception's setup (tools/ros_from_source.py). The PyPI ROS
# wheels' CMake exports name the Python and NumPy include dirs of the container they were built in;
# CMake refuses those paths, which do not exist here. At the end of configure, replace them on
# every imported target with this interpreter's.
if(NOT COMMAND cnn_rnn_perception_fix_wheel_includes)
  function(cnn_rnn_perception_fix_wheel_includes)
    get_property(targets DIRECTORY "${{CMAKE_SOURCE_DIR}}" PROPERTY IMPORTED_TARGETS)
    foreach(target IN LISTS targets)
      get_target_property(dirs "${{target}}" INTERFACE_INCLUDE_DIRECTORIES)
      if(dirs AND "${{dirs}}" MATCHES "/opt/python/")
        list(FILTER dirs EXCLUDE REGEX "^/opt/python/")
        list(APPEND dirs "{python_include}" "{numpy_include}")
        set_target_properties("${{target}}" PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${{dirs}}")
      endif()
    endforeach()
  endfunction()
  cmake_language(DEFER DIRECTORY "${{CMAKE_SOURCE_DIR}}"
                 CALL cnn_rnn_perception_fix_wheel_includes)
endif()
"""


def _say(text: str) -> None:
    print(f'ros_from_source: {text}', flush=True)


def _one(sources: Path, pattern: str, distro: str) -> Path:
    matches = sorted(sources.glob(pattern.format(distro=distro)))
    if not matches:
        raise FileNotFoundError(f'{sources}/{pattern.format(distro=distro)} is missing')
    return matches[-1]


def _version(package_folder: Path) -> str:
    text = (package_folder / 'package.xml').read_text()
    return text.split('<version>', 1)[1].split('</version>', 1)[0].strip()


def _stamp_matches(stamp: Path, want: dict) -> bool:
    try:
        return json.loads(stamp.read_text()) == want
    except (OSError, ValueError):
        return False


def _run(command: list[str], log: Path) -> None:
    with log.open('a') as out:
        out.write(f'$ {" ".join(command)}\n')
        out.flush()
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode:
        tail = log.read_text().splitlines()[-25:]
        raise RuntimeError(f'{command[0]} failed ({result.returncode}); the end of {log}:\n'
                           + '\n'.join(tail))


def build_interfaces(sources: Path, prefix: Path, distro: str, work: Path) -> None:
    """Build and install each interface package that is not installed from these sources."""
    import numpy

    fix = work / 'fix_wheel_includes.cmake'
    fix.write_text(FIX_INCLUDES.format(python_include=sysconfig.get_paths()['include'],
                                       numpy_include=numpy.get_include()))
    for name, pattern in CMAKE_PACKAGES.items():
        folder = _one(sources, pattern, distro)
        want = {'source': str(folder.resolve()), 'version': _version(folder),
                'numpy': numpy.__version__, 'python': sys.version.split()[0]}
        stamp = work / f'{name}.stamp'
        if _stamp_matches(stamp, want) and (prefix / 'share' / name / 'package.xml').is_file():
            continue
        _say(f'building {name} {want["version"]} from {folder}')
        started = time.monotonic()
        build = work / name
        shutil.rmtree(build, ignore_errors=True)
        log = work / f'{name}.log'
        log.write_text('')
        _run(['cmake', '-S', str(folder), '-B', str(build), f'-DCMAKE_INSTALL_PREFIX={prefix}',
              f'-DCMAKE_PREFIX_PATH={prefix}', f'-DPython3_EXECUTABLE={sys.executable}',
              f'-DCMAKE_PROJECT_INCLUDE={fix}', '-DBUILD_TESTING=OFF',
              '-DCMAKE_BUILD_TYPE=Release'], log)
        _run(['cmake', '--build', str(build), '--parallel', str(os.cpu_count() or 1)], log)
        _run(['cmake', '--install', str(build)], log)
        stamp.write_text(json.dumps(want))
        _say(f'installed {name} into {prefix} in {time.monotonic() - started:.0f} s')


def install_python_packages(sources: Path, distro: str, work: Path) -> None:
    """Install the launch system and the ros2 command line from their sources, once."""
    folders = [_one(sources, pattern, distro) for pattern in PYTHON_PACKAGES]
    want = {'sources': [str(folder.resolve()) for folder in folders],
            'versions': [_version(folder) for folder in folders]}
    stamp = work / 'python-packages.stamp'
    if _stamp_matches(stamp, want) and shutil.which('ros2', path=str(Path(sys.executable)
                                                                     .parent)):
        return
    _say(f'installing the launch system and the ros2 command line ({len(folders)} packages)')
    log = work / 'python-packages.log'
    log.write_text('')
    # --no-deps: their install_requires name ROS packages that are not on PyPI; the PyPI ones
    # they need are pinned in requirements-common.txt.
    _run([sys.executable, '-m', 'pip', 'install', '--disable-pip-version-check', '--no-deps',
          '--no-build-isolation', *map(str, folders)], log)
    stamp.write_text(json.dumps(want))


def index_this_package(checkout: Path, prefix: Path) -> None:
    """
    Put this package where ament's tools look: its share folder and lib/<package> launchers.

    An editable install places no data files, so ``share/cnn_rnn_perception`` links to the
    checkout's package.xml, launch/ and config/ files (edits show at once; folders are real,
    since ``ros2 launch`` does not walk a linked folder); ``lib/cnn_rnn_perception`` gets
    launchers that exec the venv's own console scripts, found relative to themselves.
    """
    index = prefix / 'share' / 'ament_index' / 'resource_index' / 'packages' / PACKAGE
    index.parent.mkdir(parents=True, exist_ok=True)
    index.touch()
    share = prefix / 'share' / PACKAGE
    shutil.rmtree(share, ignore_errors=True)
    for folder in ('launch', 'config'):
        (share / folder).mkdir(parents=True)
        for source in sorted((checkout / folder).iterdir()):
            (share / folder / source.name).symlink_to(source)
    (share / 'package.xml').symlink_to(checkout / 'package.xml')
    lib = prefix / 'lib' / PACKAGE
    lib.mkdir(parents=True, exist_ok=True)
    for executable in EXECUTABLES:
        launcher = lib / executable
        launcher.write_text('#!/bin/sh\n# ros2 run and launch_ros look here; the console '
                            "script is in the venv's bin/.\n"
                            f'exec "$(dirname "$0")/../../bin/{executable}" "$@"\n')
        launcher.chmod(0o755)


def main(argv: list[str] | None = None) -> int:
    """Build what is missing; say so and exit 0 when the sources are absent."""
    parser = argparse.ArgumentParser(
        prog='python -m cnn_rnn_perception.tools.environment.ros_from_source',
        description='Build vision_msgs, nav2_msgs, composition_interfaces, the launch system and '
                    'the ros2 command line from upstream sources into this venv, and index '
                    'this package for ros2 launch and ros2 run.')
    parser.add_argument('--sources', required=True,
                        help='folder of upstream sources (see shared/ros-sources/README.md)')
    parser.add_argument('--distro', required=True, choices=('kilted', 'jazzy'))
    parser.add_argument('--prefix', default=sys.prefix, help='the venv (default: this one)')
    args = parser.parse_args(argv)
    prefix = Path(args.prefix).resolve()
    checkout = Path(__file__).resolve().parents[3]
    index_this_package(checkout, prefix)
    sources = Path(args.sources)
    if not sources.is_dir():
        _say(f'{sources} does not exist: vision_msgs, nav2_msgs, launch and the ros2 command line '
             'are not installed, and the tests that need them skip (make ROS_SOURCES=DIR to '
             'point elsewhere)')
        return 0
    work = prefix / 'ros-build'
    work.mkdir(exist_ok=True)
    os.environ.setdefault('AMENT_PREFIX_PATH', str(prefix))
    try:
        build_interfaces(sources, prefix, args.distro, work)
        install_python_packages(sources, args.distro, work)
    except (FileNotFoundError, RuntimeError) as error:
        print(f'ros_from_source: error: {error}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
