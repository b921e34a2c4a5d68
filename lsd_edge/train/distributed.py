"""The processes of one run: which one is rank 0, how a global batch is split, how results are summed.

A run started by `accelerate launch` (or `torchrun`) has WORLD_SIZE > 1 in its environment; the
process group is set up through Accelerate (NCCL on GPUs, gloo on CPUs). Without it a run is one
process and every method here is a no-op, so the single-process path is the plain one.

How a step is shared: a step is `grad_accum` micro-batches of `batch_size` samples taken from one
global sample stream; process r runs micro-batches r, r + W, r + 2W, ... (W processes). Loss terms
are divided by counts summed over all processes and gradients are summed (by the run's training
backend, `lsd_edge.train.backends`), so a step computes the same gradient with any W, and a resume
state (step, stream position) is valid for any W.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lsd_edge.errors import LsdEdgeError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def local_world(self) -> int:
        """Processes on this machine."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", self.world))

    def micro_batches(self, grad_accum: int) -> list[int | None]:
        """This process's micro-batch indices within a step, padded with None so every process runs
        the same number of slots (a sharded teacher needs every process in each of its forwards)."""
        mine: list[int | None] = list(range(self.rank, grad_accum, self.world))
        slots = -(-grad_accum // self.world)
        return mine + [None] * (slots - len(mine))

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def sum_floats(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over processes (fp64, so sums of counts stay exact)."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def raise_together(self, error: LsdEdgeError | None) -> None:
        """Raise `error` (one process's, or the first of several) on every process, so that no process
        is left waiting in a collective for one that stopped."""
        if not self.active:
            if error is not None:
                raise error
            return
        # Messages travel, not exception objects (some do not survive pickling).
        messages = self.gather(None if error is None else str(error))
        if error is not None:
            raise error
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if failed:
            rank, message = failed[0]
            raise LsdEdgeError(f"process {rank} stopped: {message}")

    def on_main(self, fn):
        """Run `fn` on rank 0 only (file writes, data generation); its error stops every process."""
        error = None
        if self.main:
            try:
                fn()
            except LsdEdgeError as e:
                error = e
        self.raise_together(error)

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order (on every process)."""
        if not self.active:
            return [obj]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


SINGLE = Dist()


def launched_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def threads_per_process(num_threads: int, local_processes: int) -> int:
    """Threads for each of this machine's processes: `run.num_threads` (0 = one per core) shared out,
    so that W processes on one machine do not start W times as many threads as there are cores."""
    total = num_threads or os.cpu_count() or 1
    return max(1, total // max(1, local_processes))
