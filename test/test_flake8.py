"""ament_flake8 over the package, at 99 columns."""

from pathlib import Path

from ament_flake8.main import main_with_errors
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.flake8
@pytest.mark.linter
def test_flake8():
    rc, errors = main_with_errors(argv=[
        '--config', str(ROOT / 'test' / 'flake8.ini'),
        str(ROOT / 'cnn_rnn_perception'), str(ROOT / 'test'), str(ROOT / 'launch'),
        str(ROOT / 'setup.py')])
    assert rc == 0, f'Found {len(errors)} code style errors / warnings:\n' + '\n'.join(errors)
