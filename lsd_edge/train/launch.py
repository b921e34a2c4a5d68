"""The run's Accelerator, made from the launch config that `accelerate launch` put in the environment.

What lsd-edge reads of a launch config: the distributed type (MULTI_GPU / MULTI_CPU = DDP, FSDP;
DEEPSPEED is refused, see `check_deepspeed`) and, under FSDP, `fsdp_config` as written: `fsdp_version` (2 only),
`fsdp_reshard_after_forward` (true / FULL_SHARD, or false / SHARD_GRAD_OP), the auto-wrap policy and
layer classes, CPU offload and RAM-efficient loading. Settings lsd-edge owns elsewhere are refused
with the recipe key that replaces them (mixed precision: `run.precision`; activation checkpointing:
`student.gradient_checkpointing`).
"""

from __future__ import annotations

import importlib.util
import os
from datetime import timedelta
from pathlib import Path

from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs

from lsd_edge.errors import LsdEdgeError

# What each tracker of `run.report_to` needs installed, and how to install it.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}
RESHARD = {"true": True, "full_shard": True, "false": False, "shard_grad_op": False}


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip().lower()


def fsdp_plugin() -> FullyShardedDataParallelPlugin | None:
    """The launch config's FSDP settings, checked; None when the launch is not FSDP."""
    if _env("ACCELERATE_USE_FSDP", "false") != "true":
        return None
    version = _env("FSDP_VERSION", "1")
    if version != "2":
        raise LsdEdgeError(
            f"launch config: fsdp_config.fsdp_version is {version}; lsd-edge shards with FSDP2: set "
            "fsdp_version: 2 (see recipes/accelerate/fsdp.yaml)"
        )
    reshard = _env("FSDP_RESHARD_AFTER_FORWARD", "true")
    if reshard not in RESHARD:
        raise LsdEdgeError(
            f"launch config: fsdp_config.fsdp_reshard_after_forward is {reshard!r}; FSDP2 takes true "
            "(FULL_SHARD) or false (SHARD_GRAD_OP)"
        )
    if _env("FSDP_ACTIVATION_CHECKPOINTING", "false") == "true":
        raise LsdEdgeError(
            "launch config: fsdp_config.fsdp_activation_checkpointing is true; set it to false and use "
            "student.gradient_checkpointing (or a stage's gradient_checkpointing) in the recipe"
        )
    if _env("ACCELERATE_MIXED_PRECISION", "no") not in ("no", ""):
        raise LsdEdgeError(
            "launch config: mixed_precision is set; leave it 'no' and choose run.precision in the recipe"
        )
    return FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=RESHARD[reshard])


def check_wrap_classes(plugin: FullyShardedDataParallelPlugin, model) -> None:
    """The layer classes the launch config wraps (each its own FSDP2 unit) are the model's."""
    names = plugin.transformer_cls_names_to_wrap or []
    have = {type(m).__name__ for m in model.modules()}
    missing = [n for n in names if n not in have]
    if missing:
        layers = sorted(n for n in have if n.endswith("Layer"))
        raise LsdEdgeError(
            f"launch config: fsdp_config.fsdp_transformer_layer_cls_to_wrap names {', '.join(missing)}, "
            f"which the student does not have; its layers are {', '.join(layers)}"
        )


def check_deepspeed() -> None:
    """DeepSpeed is refused: its engine accumulates micro-batches and scales the loss by its own count,
    where a step here is a fixed set of slots per process normalised by counts summed over all of
    them, and its checkpoints are not the distributed checkpoints a resume reads."""
    if _env("ACCELERATE_USE_DEEPSPEED", "false") == "true":
        raise LsdEdgeError(
            "launch config: distributed_type DEEPSPEED is not supported; launch with "
            "recipes/accelerate/fsdp.yaml (FSDP2 shards the student's weights, gradients and optimizer "
            "state as ZeRO-3 does) or ddp.yaml"
        )


def check_trackers(report_to: list[str]) -> None:
    for name in report_to:
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise LsdEdgeError(
                f"run.report_to: '{name}' needs the {TRACKER_PACKAGES[name]} package; "
                "pip install 'lsd-edge[track]', or remove it from run.report_to"
            )


def make_accelerator(cpu: bool, world: int, report_to: list[str], logging_dir: Path) -> Accelerator:
    """One Accelerator per process. Precision stays the recipe's (run.precision, our autocast), the
    scheduler steps once per optimizer step (a step is global, not per process), and DDP looks for
    parameters a micro-batch did not use (the vision tower on text-only samples)."""
    check_deepspeed()
    check_trackers(report_to)
    plugin = fsdp_plugin() if world > 1 else None
    if "wandb" in report_to:
        os.environ.setdefault("WANDB_MODE", "offline")  # offline unless the user asks otherwise
    acc = Accelerator(
        cpu=cpu,
        device_placement=False,
        mixed_precision="no",
        step_scheduler_with_optimizer=False,
        fsdp_plugin=plugin,
        log_with=list(report_to) or None,
        project_dir=str(logging_dir),
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=True),
            # Rank 0 evaluates and writes checkpoints while the others wait at a barrier.
            InitProcessGroupKwargs(timeout=timedelta(minutes=60)),
        ],
    )
    if plugin is not None and acc.distributed_type != DistributedType.FSDP:
        # Accelerate applies FSDP on accelerators only; on CPU processes (gloo) the same FSDP2
        # preparation runs once the state says FSDP, which is how the CPU tests cover this path.
        # (AcceleratorState copies PartialState's fields each time it is made: both are set.)
        PartialState().distributed_type = DistributedType.FSDP
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
    return acc
