"""Measuring and reporting for the benchmark tools: memory peaks, the machine, tables, JSON."""

from __future__ import annotations

import json
import os
import platform
import threading
from typing import Sequence

from cnn_rnn_perception.core.engine.base import cpu_flags
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
