"""The machine a measurement ran on, in one line: cores, memory, GPU, CPU model; torch-free.

The bench (`lsd_edge.bench.machine`, which adds the memory bandwidth) and the export's speed check
(`lsd_edge.export.onnx.speed`) describe the machine with the same words.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import psutil


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float:
    return psutil.virtual_memory().total / 2**30


def machine_label(gpu: str | None) -> str:
    """`2 cores, 8 GiB, no GPU (AMD EPYC 7B13, x86_64)`; `gpu` is the device's name, None without one."""
    cores = os.cpu_count() or 1
    return f"{cores} cores, {memory_gib():.0f} GiB, {gpu or 'no GPU'} ({cpu_name()}, {platform.machine()})"
