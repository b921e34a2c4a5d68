"""The run's Accelerator, made from the launch config that `accelerate launch` put in the environment.

What lsd-edge reads of a launch config: the distributed type (MULTI_GPU / MULTI_CPU = DDP, FSDP,
DEEPSPEED); under FSDP, `fsdp_config` as written: `fsdp_version` (2 only),
`fsdp_reshard_after_forward` (true / FULL_SHARD, or false / SHARD_GRAD_OP), the auto-wrap policy and
layer classes, CPU offload and RAM-efficient loading; under DEEPSPEED, `deepspeed_config` (or the
DeepSpeed JSON it names) with ZeRO stage 2 or 3, the rest of ZeRO's settings as written. Settings
lsd-edge owns elsewhere are refused with the recipe key that replaces them (mixed precision:
`run.precision`; activation checkpointing: `student.gradient_checkpointing`; micro-batches, their
accumulation and gradient clipping: a stage's `batch_size`, `grad_accum`, `max_grad_norm`; the
optimizer and schedule: a stage's `lr`, `warmup_ratio`, `weight_decay`).
"""

from __future__ import annotations

import importlib.util
import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DeepSpeedPlugin, FullyShardedDataParallelPlugin, PartialState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs
from transformers.integrations import unset_hf_deepspeed_config

from lsd_edge.errors import LsdEdgeError

# What each tracker of `run.report_to` needs installed, and how to install it.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}
RESHARD = {"true": True, "full_shard": True, "false": False, "shard_grad_op": False}


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip().lower()


def check_mixed_precision() -> None:
    if _env("ACCELERATE_MIXED_PRECISION", "no") not in ("no", ""):
        raise LsdEdgeError(
            "launch config: mixed_precision is set; leave it 'no' and choose run.precision in the recipe"
        )


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
    check_mixed_precision()
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


def _refuse_deepspeed(key: str, value, what: str) -> None:
    raise LsdEdgeError(f"launch config: deepspeed_config.{key} is {value!r}; {what}")


def deepspeed_plugin() -> DeepSpeedPlugin | None:
    """The launch config's DeepSpeed settings, checked; None when the launch is not DeepSpeed.

    ZeRO-2 (gradients and AdamW states partitioned) and ZeRO-3 (weights too) train the student;
    everything lsd-edge decides per stage (micro-batch size, gradient clipping, optimizer, schedule)
    is written into the config when each stage is prepared (`lsd_edge.train.backends.zero.configure`)."""
    if _env("ACCELERATE_USE_DEEPSPEED", "false") != "true":
        return None
    if importlib.util.find_spec("deepspeed") is None:
        raise LsdEdgeError(
            "launch config: distributed_type DEEPSPEED needs the deepspeed package; "
            "pip install 'lsd-edge[deepspeed]', or launch with recipes/accelerate/fsdp.yaml"
        )
    check_mixed_precision()
    if _env("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false") == "true":
        _refuse_deepspeed(
            "zero3_init_flag", True, "set it to false: models are built whole and partitioned when prepared"
        )
    plugin = DeepSpeedPlugin()
    check_zero_config(plugin.deepspeed_config)
    return plugin


def check_zero_config(config: dict) -> None:
    """What a DeepSpeed config may say: ZeRO stage 2 or 3 and its own tuning; nothing that the recipe
    decides, and no offload (FSDP2's fsdp_offload_params offloads with the same torch AdamW)."""
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (2, 3):
        _refuse_deepspeed(
            "zero_stage", stage, "lsd-edge trains with ZeRO stage 2 or 3 (or launch with ddp.yaml)"
        )
    for part in ("offload_optimizer", "offload_param"):
        device = (zero.get(part) or {}).get("device", "none")
        if device not in ("none", None):
            _refuse_deepspeed(
                f"{part}_device",
                device,
                "set it to none; to offload, launch with recipes/accelerate/fsdp.yaml "
                "and fsdp_offload_params: true",
            )
    owned = {
        "gradient_accumulation_steps": ("set it to 1: a stage accumulates its grad_accum micro-batches", 1),
        "gradient_clipping": ("leave it out or 'auto': a stage's max_grad_norm clips", None),
        "train_micro_batch_size_per_gpu": ("leave it 'auto': a stage's batch_size is the micro-batch", None),
        "train_batch_size": ("leave it 'auto': a stage's batch_size x grad_accum is the step", None),
    }
    for key, (what, allowed) in owned.items():
        value = config.get(key, "auto")
        if value not in ("auto", allowed):
            _refuse_deepspeed(key, value, what)
    for key in ("optimizer", "scheduler"):
        if key in config:
            _refuse_deepspeed(
                key,
                config[key].get("type", key),
                "remove it: a stage's lr, warmup_ratio and "
                "weight_decay make the AdamW optimizer and its schedule",
            )
    for key in ("fp16", "bf16"):
        if str((config.get(key) or {}).get("enabled", "auto")).lower() not in ("auto", "false"):
            _refuse_deepspeed(
                f"{key}.enabled", True, "leave it 'auto' and choose run.precision in the recipe"
            )
    if (config.get("activation_checkpointing") or {}).get("partition_activations"):
        _refuse_deepspeed(
            "activation_checkpointing", "on", "remove it and use student.gradient_checkpointing in the recipe"
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
    check_trackers(report_to)
    zero = deepspeed_plugin()
    if zero is not None and cpu and torch.cuda.is_available():
        raise LsdEdgeError(
            "run.device is 'cpu' under a DeepSpeed launch on a machine with CUDA, where DeepSpeed puts "
            "the student on the GPU: set run.device = 'auto', or launch with ddp.yaml for CPU processes"
        )
    plugin = fsdp_plugin() if world > 1 and zero is None else None
    if "wandb" in report_to:
        os.environ.setdefault("WANDB_MODE", "offline")  # offline unless the user asks otherwise
    acc = Accelerator(
        # Accelerate turns DeepSpeed off on CPU processes; with cpu=False it runs on gloo there too
        cpu=cpu and zero is None,
        device_placement=False,
        mixed_precision="no",
        step_scheduler_with_optimizer=False,
        fsdp_plugin=plugin,
        deepspeed_plugin=zero,
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
    if zero is not None:
        # Accelerate tells transformers about a ZeRO-3 config, which then builds and loads every
        # model partitioned (deepspeed.zero.Init); here models are built whole and only the
        # student is partitioned, when a stage prepares it
        unset_hf_deepspeed_config()
        if acc.state.backend is None and torch.distributed.is_initialized():
            cpu_deepspeed_state(acc)
    return acc


def cpu_deepspeed_state(acc: Accelerator) -> None:
    """DeepSpeed made the process group (gloo, on CPU processes) but Accelerate found no accelerator
    and counted one process: give its state the group's ranks, as it would on GPUs."""
    for state in (PartialState(), acc.state):
        state.backend = "gloo"
        state.num_processes = torch.distributed.get_world_size()
        state.process_index = torch.distributed.get_rank()
        state.local_process_index = int(os.environ.get("LOCAL_RANK", state.process_index))
