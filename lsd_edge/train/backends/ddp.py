"""Several processes under DDP (Accelerate's MULTI_GPU / MULTI_CPU launch): the student replicated,
gradients all-reduced in DDP's buckets during the backward of a step's last micro-batch only.

Every process runs the same number of forwards and backwards in each step, so the collectives meet:
a slot with nothing to learn runs a one-token pad micro-batch at weight 0 (`MeetingStep`), and a
loss that reached no trainable weight (a projector-only stage on text) still gets a backward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lsd_edge.train.backends.base import Backend, Prepared, StudentStep


class MeetingStep(StudentStep):
    """A StudentStep whose every micro-batch gives a backward, on every process. `sharded` (FSDP2):
    every micro-batch hands every trainable weight a gradient (zeros where it was not used), as each
    reduce-scatter needs the same gradients from every process."""

    sharded = False

    def forward(self, batch, teacher, stage, counts, vocab_rows, lam, weight=1.0):
        total, terms = super().forward(batch, teacher, stage, counts, vocab_rows, lam, weight)
        if self.sharded or weight != 1.0 or not total.requires_grad:
            # A slot run only so that the collectives meet: its gradients are zeros.
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


class Ddp(Backend):
    """DDP over the run's processes. The terms are divided by counts summed over every process, so
    the gradient one process would compute is the sum: DDP averages, hence backward of W x the loss."""

    def make_step(self, student: nn.Module, latent) -> StudentStep:
        return MeetingStep(student, latent)

    def no_sync(self, p: Prepared, last: bool):
        if last:
            return super().no_sync(p, last)
        return self.accelerator.no_sync(p.module)

    def backward(self, p: Prepared, loss: torch.Tensor, last: bool) -> None:
        self.accelerator.backward(loss * self.dist.world)
