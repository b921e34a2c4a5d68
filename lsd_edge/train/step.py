"""One optimizer step of a stage, as training and `lsd-edge memory --measure` both run it.

`prepare_student` sets the stage's trainable groups, activation checkpointing and latent
projections, makes the optimizer and schedule and hands them to the run's backend; `Stepper` runs
one step of this process's micro-batches: each one's forward (the backend's prepared module, whose
forward is the objective) and backward in the backend's no-sync context, then the backend's clip
and optimizer step. The stage loop (`lsd_edge.train.loop`) adds the data, the logs and the resume
states around it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lsd_edge.data.batch import Batch
from lsd_edge.distill.objective import TERMS, Counts, LatentProjector
from lsd_edge.distill.teacher import OnlineTeacher, Teacher, vision_width
from lsd_edge.models.groups import set_activation_checkpointing, set_trainable
from lsd_edge.recipe.schema import StageConfig
from lsd_edge.train.backends.base import Backend, Prepared
from lsd_edge.train.setup import autocast, make_optimizer, uses_bf16


def prepare_student(
    backend: Backend,
    model,
    teacher: Teacher | None,
    stage: StageConfig,
    *,
    steps: int,
    seed: int,
    device: torch.device,
    precision: str,
    checkpointing: bool,
) -> Prepared:
    """The stage's student made trainable and prepared by `backend`, with its latent projections
    (seeded by `seed`, without touching the global RNG), optimizer and `steps`-step schedule."""
    set_trainable(model, stage.trainable)
    model.train()
    if checkpointing:
        set_activation_checkpointing(model, True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        latent = None
        lc = stage.loss
        if teacher is not None and (lc.weight("latent") > 0 or lc.weight("vision") > 0):
            tower = (
                (vision_width(model.config), teacher.vision_hidden_size) if lc.weight("vision") > 0 else None
            )
            pairs = lc.latent_pairs if lc.weight("latent") > 0 else []
            latent = LatentProjector(
                pairs, model.config.text_config.hidden_size, teacher.hidden_size, tower
            ).to(device)
    optimizer, scheduler = make_optimizer(model, latent, stage, steps)
    return backend.prepare(model, latent, optimizer, scheduler, stage, uses_bf16(device, precision))


@dataclass
class Stepper:
    """What one step needs: the backend and what it prepared, the stage, the teacher it distils from
    (None: it does not), the vocabulary rows the logit losses compare, a pad micro-batch for a slot
    with nothing to run (several processes), the device and the run's precision."""

    backend: Backend
    prepared: Prepared
    stage: StageConfig
    teacher: Teacher | None
    vocab_rows: int
    pad: Batch | None
    device: torch.device
    precision: str

    def accumulate(self, slots: list[Batch | None], counts: Counts, lam: float) -> dict[str, float]:
        """Forward and backward of this process's micro-batches of one step; the loss terms' sums
        (over every process). Gradients are communicated in the last one's backward only. With
        several processes a slot with nothing to run still runs (a pad token at weight 0), so every
        process meets each collective."""
        sums = {t: 0.0 for t in TERMS}
        p, backend, dist = self.prepared, self.backend, self.backend.dist
        for i, b in enumerate(slots):
            weight, teacher = 1.0, self.teacher
            if b is None:
                if not dist.active:
                    continue
                # the backend says whether a pad slot runs the online teacher (a sharded teacher's
                # forward is collective); a cache is never run for one
                b, weight = self.pad, 0.0
                online = backend.pad_runs_teacher and isinstance(teacher, OnlineTeacher)
                teacher = teacher if online else None
            last = i == len(slots) - 1
            with backend.no_sync(p, last):
                with autocast(self.device, self.precision):
                    total, terms = p.module(b, teacher, self.stage, counts, self.vocab_rows, lam, weight)
                if weight:
                    for name, value in terms.items():
                        sums[name] += float(value.detach())
                # a projector-only stage on a text-only batch has nothing to learn (a backend whose
                # processes must meet gives such a loss a graph of its own)
                if total.requires_grad:
                    backend.backward(p, total, last)
        if dist.active:
            sums = dict(zip(TERMS, dist.sum_floats([sums[t] for t in TERMS], self.device), strict=True))
        return sums

    def update(self) -> None:
        """Clip (the stage's max_grad_norm) and step the optimizer and schedule."""
        if self.stage.max_grad_norm > 0:
            self.backend.clip(self.prepared, self.stage.max_grad_norm)
        self.backend.optimizer_step(self.prepared)
