"""Measuring and reporting for the tools: memory peaks, the machine, tables, JSON, plots, CSV."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
import platform
import threading
from typing import Any, Sequence

from cnn_rnn_perception.core.engine.base import cpu_flags
import numpy as np
import psutil
import torch


class PeakRss:
    """Sample the process's resident memory every few milliseconds; keep the peak."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self._process = psutil.Process()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.peak_bytes = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)


def reset_gpu_peak(device: torch.device) -> None:
    """Start counting peak GPU memory afresh (nothing on the CPU)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_mb(device: torch.device) -> float | None:
    """Return the peak GPU memory since the last reset, in MB; None on the CPU."""
    if device.type != 'cuda':
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


# The CPU features that decide how fast each precision runs: fp32 (AVX2, AVX-512), int8 (VNNI,
# AMX-INT8), bf16 (AVX512_BF16, AMX-BF16).
INFERENCE_FLAGS = ('avx2', 'avx512f', 'avx_vnni', 'avx512_vnni', 'avx512_bf16', 'amx_int8',
                   'amx_bf16')


def inference_cpu_flags() -> list[str]:
    """Return which of ``INFERENCE_FLAGS`` this CPU has (empty where /proc/cpuinfo is not)."""
    flags = cpu_flags()
    return [flag for flag in INFERENCE_FLAGS if flag in flags]


def machine_description(device: torch.device) -> dict[str, object]:
    """Describe what ran the benchmark, for the README and the JSON output."""
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            cpu = next(line.split(':', 1)[1].strip() for line in cpuinfo
                       if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    description = {'cpu': cpu, 'cpu_flags': ' '.join(inference_cpu_flags()),
                   'cpu_cores': len(os.sched_getaffinity(0)),
                   'torch_threads': torch.get_num_threads(), 'torch': torch.__version__,
                   'python': platform.python_version()}
    if device.type == 'cuda':
        description['gpu'] = torch.cuda.get_device_name(device)
    return description


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Align cells into columns separated by ' | ', with a rule under the header."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = [' | '.join(cell.ljust(width) for cell, width in zip(line, widths))
             for line in (header, *rows)]
    lines.insert(1, '-+-'.join('-' * width for width in widths))
    return lines


def write_json(path: str | None, report: dict) -> None:
    """Write a report where ``--json`` (or ``--summary``) asked for it, and say so."""
    if path:
        with open(path, 'w') as out:
            json.dump(report, out, indent=2)
        print(f'wrote {path}')


def plot_history(history: list[dict[str, float]], path: str | Path) -> None:
    """Draw loss and accuracy per epoch, train and validation, to a PNG."""
    # A Figure of its own, not pyplot's: no backend or global figure state changes.
    from matplotlib.figure import Figure
    epochs = [row['epoch'] for row in history]
    figure = Figure(figsize=(10, 4))
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for split in ('train', 'val'):
        loss_axes.plot(epochs, [row[f'{split}_loss'] for row in history], 'o-', label=split)
        accuracy_axes.plot(epochs, [row[f'{split}_accuracy'] for row in history], 'o-',
                           label=split)
    loss_axes.set(xlabel='epoch', ylabel='loss', title='loss')
    accuracy_axes.set(xlabel='epoch', ylabel='accuracy', title='accuracy', ylim=(0, 1.02))
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def write_metrics(path: str | Path, history: list[dict[str, float]]) -> None:
    """Write one CSV row per epoch (the history's keys as the header)."""
    with Path(path).open('w', newline='') as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def _seconds_text(value: float | None) -> str:
    return '-' if value is None else f'{value:.2f} s'


def change_table(scores: dict[str, Any]) -> str:
    """
    Render per-frame labels against the robot's decision: what a navigation stack would see.

    Changes and spurious changes per minute (spurious: further than 0.5 s from a change of
    the ground truth), and how long after a true change the output switched to the new scene
    (p50, p95; missed: never before the next change).
    """
    rows = [('per-frame label', scores['flicker_per_min'], scores['spurious_changes_per_min'],
             scores.get('switch_delay_p50_s'), scores.get('switch_delay_p95_s'),
             scores.get('missed_switches'))]
    if scores.get('decision_changes_per_min') is not None:
        rows.append(('robot decision', scores['decision_changes_per_min'],
                     scores['decision_spurious_changes_per_min'],
                     scores['decision_switch_delay_p50_s'],
                     scores['decision_switch_delay_p95_s'], scores['decision_missed_switches']))
    lines = [f'{"changes per minute":<16}  {"all":>6}  {"spurious":>8}  {"switch p50":>10}  '
             f'{"p95":>7}  {"missed":>6}   (ground truth '
             f'{scores["truth_changes_per_min"]:.1f} a minute)']
    for name, changes, spurious, p50, p95, missed in rows:
        lines.append(f'{name:<16}  {changes:>6.1f}  {spurious:>8.1f}  {_seconds_text(p50):>10}  '
                     f'{_seconds_text(p95):>7}  {"-" if missed is None else missed:>6}')
    if scores.get('decision_accuracy') is not None:
        lines.append(f'decision accuracy {scores["decision_accuracy"]:.4f} (unknown and stale '
                     'count as wrong)')
    return '\n'.join(lines)


def format_scores(scores: dict[str, Any]) -> str:
    """Render per-class metrics and the confusion matrix as text."""
    labels = scores['labels']
    corner = 'truth \\ predicted'
    width = max(len(label) for label in labels + [corner])
    lines = [f'accuracy {scores["accuracy"]:.4f} over {scores["scored_frames"]} labelled frames']
    if scores.get('flicker_per_min') is not None:
        lines += ['', change_table(scores)]
    lines += ['', f'{"class":<{width}}  precision  recall  support']
    for label in labels:
        metrics = scores['per_class'][label]
        precision = '-' if metrics['precision'] is None else f'{metrics["precision"]:.3f}'
        recall = '-' if metrics['recall'] is None else f'{metrics["recall"]:.3f}'
        lines.append(f'{label:<{width}}  {precision:>9}  {recall:>6}  {metrics["support"]:>7}')
    cell = max(6, max(len(label) for label in labels))
    lines += ['', f'{corner:<{width}}  ' + ' '.join(
        f'{label[:cell]:>{cell}}' for label in labels)]
    for label, row in zip(labels, scores['confusion']):
        lines.append(f'{label:<{width}}  ' + ' '.join(f'{count:>{cell}}' for count in row))
    return '\n'.join(lines)


def plot_confusion(scores: dict[str, Any], path: str | Path, title: str = '') -> None:
    """Write the confusion matrix as a PNG, counts in every cell."""
    from matplotlib.figure import Figure
    labels = scores['labels']
    matrix = np.array(scores['confusion'])
    figure = Figure(figsize=(1.2 * len(labels) + 2, 1.0 * len(labels) + 1.5))
    axes = figure.subplots()
    axes.imshow(matrix, cmap='Blues')
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha='right')
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel('predicted')
    axes.set_ylabel('truth')
    limit = matrix.max() / 2 if matrix.size else 0
    for row in range(len(labels)):
        for column in range(len(labels)):
            axes.text(column, row, str(matrix[row, column]), ha='center', va='center',
                      color='white' if matrix[row, column] > limit else 'black')
    accuracy = scores['accuracy']
    axes.set_title(title or (f'accuracy {accuracy:.3f}' if accuracy is not None else ''))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
