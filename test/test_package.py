"""The install tree a robot uses: colcon build of the ament_python package."""

import os
from pathlib import Path
import shutil
import subprocess
import sys

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = 'cnn_rnn_perception'


@pytest.fixture(scope='module')
def install_tree(tmp_path_factory) -> Path:
    colcon = shutil.which('colcon') or str(Path(sys.executable).with_name('colcon'))
    work = tmp_path_factory.mktemp('colcon')
    # Build from a copy: colcon and setuptools write egg-info and build dirs into the source.
    source = work / 'src' / PACKAGE
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        '.venv', '.git', 'build', 'install', 'log', '*.egg-info', '__pycache__'))
    result = subprocess.run(
        [colcon, '--log-base', str(work / 'log'), 'build', '--base-paths', str(work / 'src'),
         '--build-base', str(work / 'build'), '--install-base', str(work / 'install'),
         '--event-handlers', 'console_direct-'],
        cwd=work, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return work / 'install' / PACKAGE


@pytest.mark.slow
def test_colcon_install_tree_has_what_ros2_run_and_launch_look_for(install_tree):
    assert (install_tree / 'share/ament_index/resource_index/packages' / PACKAGE).is_file()
    share = install_tree / 'share' / PACKAGE
    assert (share / 'package.xml').is_file()
    for folder in ('launch', 'config'):
        shipped = sorted(p.name for p in (ROOT / folder).iterdir() if p.is_file())
        assert shipped, f'{folder}/ is empty in the source tree'
        assert sorted(p.name for p in (share / folder).iterdir()) == shipped
    for script in ('cnn_rnn_perception', 'perception_node'):
        assert os.access(install_tree / 'lib' / PACKAGE / script, os.X_OK), script


@pytest.mark.slow
def test_installed_console_script_runs_from_the_install_tree(install_tree):
    site = next((install_tree / 'lib').glob('python3*/site-packages'))
    env = {**os.environ, 'PYTHONPATH': str(site)}
    result = subprocess.run([str(install_tree / 'lib' / PACKAGE / 'cnn_rnn_perception'),
                             'bench', '--help'], capture_output=True, text=True, env=env,
                            cwd=install_tree, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "time the engine against the seed's way" in result.stdout or 'seed' in result.stdout
