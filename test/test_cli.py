"""The cnn_rnn_perception command, run as a user runs it."""

import json
import os
from pathlib import Path
import subprocess
import sys

import pytest

COMMAND = str(Path(sys.executable).with_name('cnn_rnn_perception'))


def run(*args, timeout=300):
    return subprocess.run([COMMAND, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''})


def test_help_explains_every_subcommand():
    result = run('--help')
    assert result.returncode == 0
    for command in ('demo', 'classify', 'bench', 'bench-node', 'evaluate', 'replay', 'train',
                    'synth'):
        assert command in result.stdout
    bench = run('bench', '--help')
    assert '--batch-sizes' in bench.stdout and 'seed' in bench.stdout


@pytest.mark.slow
def test_classify_prints_a_label_and_timings_per_frame():
    result = run('classify', '--frames', '3', '--input-size', '96x128', '--hidden-size', '32')
    assert result.returncode == 0, result.stderr
    frame_lines = [line for line in result.stdout.splitlines() if line.startswith('frame ')]
    assert len(frame_lines) == 3
    labels = {'corridor', 'open_space', 'doorway_left', 'doorway_right', 'junction', 'blocked'}
    assert all(line.split()[2] in labels and 'forward' in line for line in frame_lines)
    assert 'latency per frame: p50' in result.stdout


@pytest.mark.slow
def test_bench_prints_seed_and_engine_rows_and_writes_json(tmp_path):
    report_path = tmp_path / 'bench.json'
    result = run('bench', '--input-size', '96x128', '--hidden-size', '32', '--iterations', '3',
                 '--batch-sizes', '1,2', '--no-compile', '--no-progress', '--json',
                 str(report_path))
    assert result.returncode == 0, result.stderr
    assert 'seed style' in result.stdout and 'engine' in result.stdout
    report = json.loads(report_path.read_text())
    assert [row['batch_size'] for row in report['rows']] == [1, 1, 2]
    assert all(row['p50_ms'] > 0 and row['peak_rss_mb'] > 0 for row in report['rows'])
    assert report['machine']['cpu_cores'] >= 1


def test_user_mistakes_are_one_line_errors_not_tracebacks():
    missing = run('classify', '--checkpoint', '/nonexistent/model.pt')
    assert missing.returncode == 2
    assert 'checkpoint not found' in missing.stderr and 'Traceback' not in missing.stderr
    bad_size = run('bench', '--input-size', 'big')
    assert bad_size.returncode == 2 and 'expected a size like 224x224' in bad_size.stderr
