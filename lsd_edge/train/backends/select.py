"""The run's training backend, chosen from the launcher's environment: one process, DDP, FSDP2 or
DeepSpeed ZeRO-2/3, with the Accelerator (one per process) made from the launch config."""

from __future__ import annotations

from pathlib import Path

import torch

from lsd_edge.models.load import resolve_device
from lsd_edge.recipe.schema import RunConfig
from lsd_edge.train.backends.base import Backend
from lsd_edge.train.backends.ddp import Ddp
from lsd_edge.train.backends.fsdp import Fsdp2
from lsd_edge.train.backends.zero import Zero
from lsd_edge.train.distributed import Dist, launched_world
from lsd_edge.train.launch import make_accelerator


def setup(run: RunConfig, logging_dir: Path) -> tuple[Backend, torch.device]:
    """The run's backend and this process's device; the Accelerator also holds the trackers."""
    device = resolve_device(run.device)  # refuses 'cuda' without CUDA, in every process
    world = launched_world()
    acc = make_accelerator(device.type == "cpu", world, list(run.report_to), logging_dir)
    plugin = acc.state.deepspeed_plugin
    zero = 0 if plugin is None else int(plugin.zero_stage)
    if world <= 1:
        return (Zero(Dist(), acc, zero) if zero else Backend(Dist(), acc)), device
    if device.type == "cuda":
        device = acc.device
    dist = Dist(acc.process_index, acc.num_processes)
    if zero:
        return Zero(dist, acc, zero), device
    if getattr(acc.state, "fsdp_plugin", None) is not None:  # set only on an FSDP state
        return Fsdp2(dist, acc), device
    return Ddp(dist, acc), device
