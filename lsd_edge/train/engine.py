"""How the student trains on the run's processes: one module whose forward is a micro-batch's loss
terms, prepared by Accelerate (DDP, FSDP2 or DeepSpeed ZeRO as the launch config writes it),
accumulation without a sync until a step's last micro-batch (ZeRO reduces in every backward and
steps in the last), and the plain trained student back at the end of a stage.

`StudentStep` holds the student and the stage's latent projections, and its forward runs the whole
objective (student forward, lm_head losses, projections), so the wrapper's hooks see every use of
every parameter: DDP all-reduces gradients in its buckets while backward runs, FSDP2 gathers one
layer at a time and reduce-scatters its gradients. Every process runs the same number of forwards
and backwards in each step (a slot with nothing to learn runs a one-token micro-batch at weight 0),
so the collectives meet.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from lsd_edge.data.dataset import Batch
from lsd_edge.distill.objective import Counts, LatentProjector, loss_terms, weighted_total
from lsd_edge.distill.teacher import Teacher
from lsd_edge.models.tokens import IGNORE_INDEX
from lsd_edge.recipe.schema import StageConfig
from lsd_edge.train import zero
from lsd_edge.train.distributed import Dist
from lsd_edge.train.launch import check_wrap_classes


class StudentStep(nn.Module):
    """The student and its latent projections; forward = one micro-batch's weighted loss and terms."""

    def __init__(self, student: nn.Module, latent: LatentProjector | None):
        super().__init__()
        self.student = student
        self.latent = latent
        self.sharded = False  # set once FSDP2 has sharded it
        self.every_module = False  # DeepSpeed: every micro-batch reaches every trainable weight

    def forward(
        self,
        batch: Batch,
        teacher: Teacher | None,
        stage: StageConfig,
        counts: Counts,
        vocab_rows: int,
        lam: float,
        weight: float = 1.0,
        meet: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`weight` scales the loss (0 for a pad slot); `meet`: every process must run a backward
        (several processes), even where this micro-batch reached no trainable weight."""
        terms = loss_terms(
            self.student, teacher, batch, stage, counts, vocab_rows, self.latent, self.every_module
        )
        total = weighted_total(terms, stage, lam)
        if self.every_module:  # every trainable weight was reached (see loss_terms)
            return total * weight, terms
        if meet and (self.sharded or weight != 1.0 or not total.requires_grad):
            # A slot run only so that the collectives meet: its gradients are zeros, and a loss that
            # touched no trainable weight (a projector-only stage on text) still has a backward.
            # Under FSDP2 every process must also hand the same gradients to each reduce-scatter,
            # used or not (the vision tower on a text-only micro-batch): they get zeros.
            total = total * weight + self.ghost()
        return total, terms

    def ghost(self) -> torch.Tensor:
        """0 with a graph to the trainable weights this process holds whole (FSDP2 keeps a layer's
        weights sharded outside its own forward, and those are reached through the layer)."""
        zero = torch.zeros((), device=next(self.parameters()).device)
        for p in self.parameters():
            if p.requires_grad and not isinstance(p, DTensor):
                zero = zero + p.reshape(-1)[:1].sum() * 0.0
        return zero


def pad_batch(pad_id: int, device: torch.device) -> Batch:
    """One pad token with no label and no image: a micro-batch that adds nothing to any loss term."""
    one = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
    return Batch(
        ids=[],
        input_ids=one,
        attention_mask=torch.ones_like(one),
        labels=torch.full_like(one, IGNORE_INDEX),
        pixel_values=None,
        visual_mask=torch.zeros_like(one, dtype=torch.bool),
    )


@dataclass
class Prepared:
    """A stage's trainable objects as Accelerate returned them."""

    module: Any  # StudentStep, or its DDP / FSDP2 wrapper
    optimizer: Any
    scheduler: Any
    step: StudentStep  # the unwrapped module (the student as FSDP2 left it, sharded, under FSDP)


def prepare(
    dist: Dist, step: StudentStep, optimizer, scheduler, stage: StageConfig, bf16: bool = False
) -> Prepared:
    """`bf16`: the stage's forward runs under bf16 autocast (DeepSpeed's engine is told so)."""
    acc = dist.accelerator
    if acc is None:  # a stage run on its own (tests): nothing to prepare
        assert not dist.active, "several processes train through the run's Accelerator (distributed.setup)"
        return Prepared(step, optimizer, scheduler, step)
    plugin = getattr(acc.state, "fsdp_plugin", None)  # set only on an FSDP state
    if plugin is not None:
        check_wrap_classes(plugin, step)
    if dist.zero:
        hidden = step.student.config.text_config.hidden_size
        zero.configure(acc.state.deepspeed_plugin.deepspeed_config, stage, dist.world, hidden, bf16)
    module, optimizer, scheduler = acc.prepare(step, optimizer, scheduler)
    unwrapped = acc.unwrap_model(module)
    unwrapped.sharded = any(isinstance(q, DTensor) for q in unwrapped.parameters())
    unwrapped.every_module = dist.zero > 0
    if dist.zero == 3:
        zero.gather_head(unwrapped)
    return Prepared(module, optimizer, scheduler, unwrapped)


def sync_context(dist: Dist, p: Prepared, last: bool):
    """Gradients are communicated in the backward of a step's last micro-batch only (ZeRO reduces
    its buckets in every backward: it accumulates reduced, partitioned gradients)."""
    if dist.accelerator is None or last or dist.zero:
        return contextlib.nullcontext()
    return dist.accelerator.no_sync(p.module)


def backward(dist: Dist, p: Prepared, loss: torch.Tensor, last: bool) -> None:
    """One micro-batch's backward. DDP, FSDP2 and ZeRO average gradients over processes; the terms
    are already divided by counts summed over all of them, so the gradient one process would
    compute is the sum: W x the average. Under ZeRO the step's last backward also clips and steps
    (DeepSpeed's engine does both; `step` below then only advances the schedule)."""
    if dist.accelerator is None:
        loss.backward()
        return
    scaled = loss * dist.world if dist.active else loss
    if dist.zero:
        p.module.set_gradient_accumulation_boundary(last)
        p.module.backward(scaled)
        if last:
            p.module.step()
        return
    dist.accelerator.backward(scaled)


def clip(dist: Dist, p: Prepared, max_norm: float) -> None:
    if dist.zero:
        return  # clipped inside DeepSpeed's step (the stage's max_grad_norm is in its config)
    params = [q for q in p.step.parameters() if q.requires_grad]
    if dist.accelerator is None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        dist.accelerator.clip_grad_norm_(params, max_norm)


def plain_student(p: Prepared, device: torch.device) -> nn.Module:
    """The trained student as a plain model on every process (evaluation and checkpoints read it):
    under FSDP2 and ZeRO, rebuilt from the full weights (gathered, where sharded); otherwise the
    student itself."""
    student = p.step.student
    if p.step.every_module:  # DeepSpeed: gathered (ZeRO-3), and free of the engine's hooks
        return rebuilt(student, zero.full_weights(student), device)
    if not p.step.sharded:
        return student
    full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True))
    return rebuilt(student, full, device)


def rebuilt(student: nn.Module, full: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """A fresh model of the student's class holding `full`, its buffers and trainable flags."""
    with torch.device("meta"):
        model = type(student)(student.config)
    model.to_empty(device=device)
    model.load_state_dict(full, strict=False)
    buffers = dict(student.named_buffers())
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])  # non-persistent ones (rotary frequencies) are not in `full`
    model.tie_weights()
    grads = {n: q.requires_grad for n, q in student.named_parameters()}
    for n, q in model.named_parameters():
        q.requires_grad_(grads.get(n, False))
    return model.train(student.training)


def release(dist: Dist) -> None:
    """Drop Accelerate's references to a finished stage's wrapped objects."""
    if dist.accelerator is not None:
        dist.accelerator.free_memory()
