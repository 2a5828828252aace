"""
GPU verification in one command, on a GPU machine that has no package registry.

Two halves, one per machine (``make wheelhouse`` and ``make gpu-check`` call them):

- ``wheelhouse`` (on a machine with PyPI): download, for CPython 3.12 on x86-64 Linux, the
  wheels the GPU machine lacks: the ROS 2 wheels this environment runs, rosbags and
  rosbags-image, and their dependencies, resolved from each wheel's metadata at the versions
  installed here. What the GPU image already has (torch, numpy, OpenCV, pytest...) and what
  only builds messages (empy) are left out, so the folder travels (under 60 MB).
- ``run`` (on the GPU machine, inside the environment ``make gpu-check`` made): the GPU tests,
  ``selftest`` and ``bench`` on cuda (fp32 and bf16, batch 1, 8 and 256) and ``bench-node``
  with 1 and 4 cameras at 30 Hz, each report written into one folder with a summary.

Never run against a registry on the GPU machine: everything there installs from the folder.
"""

from __future__ import annotations

import argparse
from importlib import metadata
import json
import os
from pathlib import Path
import re
import subprocess
import sys
import time
import zipfile

# Already on the GPU image (its package list): never carried. Lower-case, '-' for '_'.
ON_GPU_IMAGE = frozenset({
    'numpy', 'opencv-python-headless', 'pytest', 'pyyaml', 'psutil', 'tqdm', 'matplotlib',
    'scikit-learn', 'scipy', 'packaging', 'setuptools', 'typing-extensions', 'pillow', 'torch',
    'torchvision', 'pluggy', 'iniconfig', 'pygments', 'jinja2', 'markupsafe', 'filelock',
    'fsspec', 'sympy', 'mpmath', 'networkx', 'cycler', 'kiwisolver', 'fonttools', 'contourpy',
    'pyparsing', 'python-dateutil', 'six', 'joblib', 'threadpoolctl', 'wheel'})
# Needed to build ROS messages, never to run them; they publish no wheels either.
BUILD_ONLY = frozenset({'empy'})
# What the GPU machine needs that its image lacks (with their dependencies).
ROOTS = ('ros-rclpy', 'ros-rmw-fastrtps-cpp', 'ros-sensor-msgs', 'ros-std-msgs',
         'ros-diagnostic-msgs', 'ros-lifecycle-msgs', 'ros-rcl-lifecycle',
         'ros-ament-index-python', 'rosbags', 'rosbags-image')
PLATFORMS = ('manylinux_2_17_x86_64', 'manylinux2014_x86_64', 'manylinux_2_27_x86_64',
             'manylinux_2_28_x86_64', 'manylinux_2_31_x86_64', 'manylinux_2_34_x86_64',
             'manylinux_2_35_x86_64', 'manylinux1_x86_64', 'any')
TARGET = {'python_version': '3.12', 'python_full_version': '3.12.3', 'sys_platform': 'linux',
          'platform_system': 'Linux', 'platform_machine': 'x86_64', 'os_name': 'posix',
          'implementation_name': 'cpython', 'platform_python_implementation': 'CPython',
          'extra': ''}


def _canonical(name: str) -> str:
    return re.sub(r'[-_.]+', '-', name).lower()


def _requirements_of(wheel: Path) -> list[str]:
    """Return the names a wheel needs on the target, from its METADATA."""
    from packaging.requirements import Requirement
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith('.dist-info/METADATA'))
        text = archive.read(name).decode()
    names = []
    for line in text.splitlines():
        if not line.startswith('Requires-Dist:'):
            continue
        requirement = Requirement(line.split(':', 1)[1].strip())
        if requirement.marker is None or requirement.marker.evaluate(TARGET):
            names.append(_canonical(requirement.name))
    return names


def _pinned(name: str) -> str:
    try:
        return f'{name}=={metadata.version(name)}'
    except metadata.PackageNotFoundError:  # not installed here: the newest that fits
        return name


def build_wheelhouse(folder: Path, *, limit_mb: float = 60.0) -> list[Path]:
    """Download the closure of ROOTS for the GPU machine into ``folder``; return the wheels."""
    folder.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    pending = [_canonical(root) for root in ROOTS]
    while pending:
        batch = sorted(set(pending) - seen)
        pending = []
        if not batch:
            break
        seen.update(batch)
        command = [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps',
                   '--disable-pip-version-check', '--only-binary=:all:', '--python-version',
                   '3.12', '--implementation', 'cp', '-d', str(folder)]
        for platform_tag in PLATFORMS:
            command += ['--platform', platform_tag]
        result = subprocess.run(command + [_pinned(name) for name in batch],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f'pip download failed for {batch}:\n{result.stderr[-2000:]}')
        for wheel in folder.glob('*.whl'):
            if _canonical(wheel.name.split('-')[0]) in batch:
                pending += [name for name in _requirements_of(wheel)
                            if name not in seen and name not in ON_GPU_IMAGE
                            and name not in BUILD_ONLY]
    wheels = sorted(folder.glob('*.whl'))
    size_mb = sum(wheel.stat().st_size for wheel in wheels) / 2**20
    print(f'{len(wheels)} wheels, {size_mb:.1f} MB in {folder}')
    if size_mb > limit_mb:
        raise RuntimeError(f'the wheelhouse is {size_mb:.1f} MB, over {limit_mb} MB: it would '
                           'not travel to the GPU machine')
    return wheels


# -- on the GPU machine ------------------------------------------------------------------------

def _step(name: str, command: list[str], out: Path, timeout_s: float, summary: list) -> None:
    started = time.monotonic()
    print(f'== {name}: {" ".join(command)}', flush=True)
    log = out / f'{name}.log'
    with log.open('w') as handle:
        try:
            code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT,
                                  timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = 'timeout'
    seconds = time.monotonic() - started
    tail = log.read_text().splitlines()[-3:]
    print(f'   {"ok" if code == 0 else "FAILED"} ({code}) in {seconds:.0f} s: '
          f'{tail[-1] if tail else ""}', flush=True)
    summary.append({'step': name, 'returncode': code, 'seconds': round(seconds, 1),
                    'log': log.name})


def run_checks(out: Path) -> int:
    """Run every GPU check, each report into ``out``; return 0 when all passed."""
    out.mkdir(parents=True, exist_ok=True)
    tool = [sys.executable, '-m', 'cnn_rnn_perception.tools.cli']
    summary: list[dict] = []
    _step('pytest-gpu', [sys.executable, '-m', 'pytest', '-m', 'gpu', '-ra', 'test/'], out,
          120, summary)
    # Batch 1 and 8: every path compiles per batch size, and the 6-minute budget is the
    # limit; inductor's cache shares identical graphs between the paths.
    _step('selftest', tool + ['selftest', '--device', 'cuda', '--batch-sizes', '1,8',
                              '--no-progress', '--json', str(out / 'selftest.json')],
          out, 150, summary)
    # A temporal model: its state through CUDA graphs, and three cameras on two state rows.
    _step('selftest-temporal', tool + [
        'selftest', '--device', 'cuda', '--batch-sizes', '1,3', '--no-compile', '--temporal',
        'gru', '--no-progress', '--json', str(out / 'selftest-temporal.json')],
        out, 90, summary)
    for precision in ('fp32', 'bf16'):
        _step(f'bench-{precision}', tool + [
            'bench', '--device', 'cuda', '--precision', precision, '--batch-sizes', '1,8,256',
            '--iterations', '30', '--no-progress',
            '--json', str(out / f'bench-{precision}.json')], out, 150, summary)
    for cameras in (1, 4):
        # Eager trunk, CUDA graphs still on: this row measures the node's overhead and
        # whether 4 x 30 Hz is all classified, not the trunk's compiled speed (bench's rows).
        _step(f'bench-node-{cameras}cam', tool + [
            'bench-node', '--device', 'cuda', '--cameras', str(cameras), '--rates', '30',
            '--duration', '15', '--warmup', '5', '--no-compile', '--no-progress',
            '--json', str(out / f'bench-node-{cameras}cam.json')], out, 60, summary)
    passed = all(step['returncode'] == 0 for step in summary)
    (out / 'summary.json').write_text(json.dumps({'passed': passed, 'steps': summary},
                                                 indent=2))
    print(f'gpu-check {"PASSED" if passed else "FAILED"}; reports in {out}')
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    """Prepare the wheelhouse, or run the checks."""
    parser = argparse.ArgumentParser(
        prog='python -m cnn_rnn_perception.tools.environment.gpu_check',
        description=__doc__.split('\n\n')[0])
    commands = parser.add_subparsers(dest='command', required=True)
    wheelhouse = commands.add_parser('wheelhouse', help='download the wheels (needs PyPI)')
    wheelhouse.add_argument('folder', type=Path)
    run = commands.add_parser('run', help='run every GPU check (on the GPU machine)')
    run.add_argument('--out', type=Path, default=Path(os.environ.get('OUT') or 'gpu-report'))
    args = parser.parse_args(argv)
    if args.command == 'wheelhouse':
        build_wheelhouse(args.folder)
        return 0
    return run_checks(args.out)


if __name__ == '__main__':
    sys.exit(main())
