"""The machine a bench ran on: memory bandwidth (the roofline's denominator), cores, memory, GPU,
versions; the one-line description is `lsd_edge.runtime.machine`'s, which the export shares."""

from __future__ import annotations

import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import onnxruntime
import torch
import transformers

import lsd_edge
from lsd_edge.runtime.machine import cpu_name, machine_label, memory_gib


def memory_bandwidth(mb: int = 1024, threads: int | None = None, repeats: int = 5) -> float:
    """Bytes/s of the best of `repeats` copies of `mb` MiB with `threads` threads (numpy releases the
    GIL in a copy), counted as STREAM's copy counts: bytes read + bytes written."""
    threads = threads or os.cpu_count() or 1
    n = mb * 2**20 // 8
    src = np.ones(n)
    dst = np.zeros(n)  # touched, so page faults are not timed
    bounds = np.linspace(0, n, threads + 1, dtype=np.int64)
    parts = [(src[a:b], dst[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(lambda p: np.copyto(p[1], p[0]), parts))
            best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def cuda_bandwidth(mb: int = 1024, repeats: int = 5) -> float:
    """Bytes/s of the best device-to-device copy of `mb` MiB (read + write)."""
    src = torch.ones(mb * 2**18, device="cuda")
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy warms the allocator up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    return 2 * src.numel() * 4 / best


def machine_info(device: str, threads: int, bandwidth: float) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    return {
        "label": machine_label(gpu),
        "cpu": cpu_name(),
        "cores": os.cpu_count() or 1,
        "memory_gib": round(memory_gib(), 1),
        "gpu": gpu,
        "device": device,
        "threads_per_worker": threads,
        "bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "bandwidth_method": (
            "best device-to-device torch copy, read + write bytes"
            if device == "cuda"
            else f"best of 5 numpy copies on {threads} thread(s), read + write bytes"
        ),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "lsd_edge": lsd_edge.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }
