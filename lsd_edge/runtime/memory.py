"""How much memory a process took, torch-free: the one place peak resident memory is read.

`peak_rss_mb()` is the process's peak so far (Linux VmHWM: `ru_maxrss` keeps a parent's peak across
fork and exec, so a small worker started by a big process would report the parent's). `PeakRSS`
measures the growth of the resident set inside a block: on Linux the kernel's own peak, reset at the
start of the block through /proc/self/clear_refs; elsewhere the resident set sampled every
`every_s` seconds. GPU memory is the caller's (torch's allocator, NVML).
"""

from __future__ import annotations

import gc
import resource
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

MiB = 2**20


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MiB."""
    try:
        return _status_kb("VmHWM") / 2**10
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _reset_peak() -> bool:
    """Reset the kernel's peak resident set to the current one; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _status_kb("VmHWM")
        return True
    except OSError:
        return False


class PeakRSS:
    """`with PeakRSS() as m: ...`, then `m.grown` (bytes) or `m.mb`: the peak resident memory added
    inside the block."""

    def __init__(self, every_s: float = 0.001):
        self.every_s = every_s
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, proc.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.base = self.peak = rss_bytes()
        if not _reset_peak():
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())
        else:
            self.peak = max(self.peak, _status_kb("VmHWM") * 1024)

    @property
    def grown(self) -> int:
        return max(0, self.peak - self.base)

    @property
    def mb(self) -> float:
        return self.grown / MiB


@dataclass
class Measured:
    """A finished command: its exit status, output, and the peak resident memory it was seen at."""

    returncode: int
    stdout: str
    stderr: str
    peak_mb: float


def run_measured(cmd: list[str], env: dict[str, str] | None = None, every_s: float = 0.05) -> Measured:
    """Run `cmd` to its end, sampling its resident set every `every_s` seconds (the child's own, not
    `ru_maxrss`, which a child started by a big process inherits). Output goes to temporary files, so
    a chatty command cannot fill a pipe and stall while it is polled. OSError if it cannot start."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = psutil.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        peak = 0
        while proc.poll() is None:
            try:
                peak = max(peak, proc.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(every_s)
        out.seek(0)
        err.seek(0)
        return Measured(proc.returncode, out.read(), err.read(), peak / MiB)
