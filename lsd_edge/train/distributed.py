"""The processes of one run: which one is rank 0, how a global batch is split, how results are summed.

A run started by `accelerate launch` (or `torchrun`) has WORLD_SIZE > 1 in its environment; the
process group is set up through Accelerate (NCCL on GPUs, gloo on CPUs). Without it a run is one
process and every method here is a no-op, so the single-process path is the plain one.

How a step is shared: a step is `grad_accum` micro-batches of `batch_size` samples taken from one
global sample stream; process r runs micro-batches r, r + W, r + 2W, ... (W processes). Loss terms
are divided by counts summed over all processes and gradients are summed, so a step computes the
same gradient with any W, and a resume state (step, stream position) is valid for any W.
The student is replicated; the frozen teacher is replicated, or its decoder layers are sharded with
FSDP2 when the launch config asks for FSDP.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
from accelerate import PartialState
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.fsdp import fully_shard

from lsd_edge.errors import LsdEdgeError
from lsd_edge.models.load import resolve_device

# Gradients are summed in flat buckets of about this many bytes: one collective per bucket, and never
# a second copy of all gradients at once.
BUCKET_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    shard_teacher: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

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

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over processes. A gradient missing on some processes counts
        as zeros there; one missing on all stays missing, so the optimizer skips it as with one process."""
        if not self.active:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
        torch.distributed.all_reduce(has)
        used = [p for p, n in zip(params, has.tolist(), strict=True) if n > 0]
        for p in used:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.Tensor] = []
        size = 0
        for p in used:
            bucket.append(p.grad)
            size += p.grad.numel() * p.grad.element_size()
            if size >= BUCKET_BYTES:
                _all_reduce_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            _all_reduce_bucket(bucket)

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


def _all_reduce_bucket(grads: list[torch.Tensor]) -> None:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        flat = _flatten_dense_tensors(group)
        torch.distributed.all_reduce(flat)
        for g, reduced in zip(group, _unflatten_dense_tensors(flat, group), strict=True):
            g.copy_(reduced)


SINGLE = Dist()


def launched_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device_choice: str) -> tuple[Dist, torch.device]:
    """The run's processes and this process's device, from the launcher's environment."""
    if launched_world() <= 1:
        return SINGLE, resolve_device(device_choice)
    resolve_device(device_choice)  # refuses 'cuda' without CUDA, in every process

    cpu = device_choice == "cpu" or not torch.cuda.is_available()
    # Rank 0 evaluates and writes checkpoints while the others wait at a barrier.
    state = PartialState(cpu=cpu, timeout=timedelta(minutes=60))
    device = torch.device("cpu") if cpu else state.device
    shard = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return Dist(state.process_index, state.num_processes, shard), device


def shard_decoder_layers(model) -> int:
    """FSDP2-shard each decoder layer of a frozen model over all processes; returns how many.

    Each layer's weights are all-gathered for its forward and freed after it, so a process holds
    1/W of the LLM's layers plus one layer at a time. Embeddings, head, projector and vision tower
    stay whole: the vision tower runs only on batches with images, and a collective must be entered
    by every process.
    """
    layers = model.model.language_model.layers
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True)
    return len(layers)
