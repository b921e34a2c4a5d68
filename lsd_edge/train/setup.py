"""What a stage sets up before its loop: which stage a command names, precision, parameter groups,
optimizer and learning-rate schedule."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from lsd_edge.errors import LsdEdgeError
from lsd_edge.models.groups import group_modules
from lsd_edge.recipe.schema import Recipe, StageConfig


def uses_bf16(device: torch.device, precision: str) -> bool:
    """Whether the student's forward runs under bf16 autocast (CUDA, run.precision auto or bf16)."""
    return device.type == "cuda" and precision in ("auto", "bf16")


def autocast(device: torch.device, precision: str):
    if uses_bf16(device, precision):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def lr_lambda(stage: StageConfig, total_steps: int):
    warm = stage.warmup_steps or math.ceil(stage.warmup_ratio * total_steps)

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if stage.schedule == "constant":
            return 1.0
        frac = (step - warm) / max(1, total_steps - warm)
        frac = min(1.0, max(0.0, frac))
        decay = 0.5 * (1 + math.cos(math.pi * frac)) if stage.schedule == "cosine" else 1.0 - frac
        return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * decay

    return f


def total_steps(stage: StageConfig, n_samples: int) -> int:
    if stage.max_steps is not None:
        return stage.max_steps
    per_step = stage.batch_size * stage.grad_accum
    return max(1, math.ceil(stage.epochs * n_samples / per_step))


def param_groups(model, latent: nn.Module | None, stage: StageConfig) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: one at stage.lr, or one per model group when the stage
    scales a group's learning rate (`lr_scale`); the latent projections train at stage.lr."""
    extra = [] if latent is None else list(latent.parameters())
    if not stage.lr_scale:
        return [{"params": [p for p in model.parameters() if p.requires_grad] + extra}]
    groups = []
    for name, module in group_modules(model).items():
        own = [p for p in module.parameters() if p.requires_grad]
        if own:
            groups.append({"params": own, "lr": stage.lr * stage.lr_scale.get(name, 1.0)})
    if extra:
        groups.append({"params": extra, "lr": stage.lr})
    grouped = {id(p) for g in groups for p in g["params"]}
    assert all(id(p) in grouped for p in model.parameters() if p.requires_grad), (
        "a trainable parameter outside the groups"
    )
    return groups


def make_optimizer(model, latent: nn.Module | None, stage: StageConfig, steps: int):
    """AdamW over the stage's parameter groups and its warmup + decay schedule over `steps`."""
    groups = param_groups(model, latent, stage)
    optimizer = torch.optim.AdamW(groups, lr=stage.lr, weight_decay=stage.weight_decay, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage, steps))
    return optimizer, scheduler


def pick_stage(recipe: Recipe, name: str | None) -> StageConfig:
    """The stage `--stage` names, or by default the last distilling one (else the last)."""
    names = [s.name for s in recipe.stages]
    if name is None:
        distilling = [s for s in recipe.stages if s.distills]
        return (distilling or recipe.stages)[-1]
    if name not in names:
        raise LsdEdgeError(f"--stage {name}: the recipe has no such stage; its stages are {', '.join(names)}")
    return recipe.stages[names.index(name)]
