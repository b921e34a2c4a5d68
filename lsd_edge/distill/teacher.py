"""What a stage distils from, behind one interface: the teacher model run now, or a teacher cache.

A `Teacher` gives the teacher side of a micro-batch (`targets`) and its hidden size. `OnlineTeacher`
runs the frozen model under `torch.no_grad()`; `lsd_edge.distill.teacher_cache.TeacherCache` reads
the same targets from disk with no model in memory. How the teacher is placed over processes, and
whether a pad slot runs it, is the training backend's business (`lsd_edge.train.backends`).
"""

from __future__ import annotations

from typing import Protocol

import torch

from lsd_edge.data.dataset import Batch
from lsd_edge.distill import losses
from lsd_edge.distill.forward import forward, n_images, per_image
from lsd_edge.models.tokens import IGNORE_INDEX


class Teacher(Protocol):
    hidden_size: int

    def targets(self, batch: Batch, need_hidden: bool) -> losses.TeacherTargets: ...


def online_targets(teacher, batch: Batch, need_hidden: bool) -> losses.TeacherTargets:
    """The teacher side of a micro-batch from a forward pass of the teacher (no graph)."""
    with torch.no_grad():
        t = forward(teacher, batch, hidden_states=need_hidden)
    resp = batch.labels[:, 1:] != IGNORE_INDEX
    vis = batch.visual_mask
    weight = teacher.lm_head.weight
    t_vis = t.hidden[vis]  # (I*K, Dt), gathered once
    return losses.TeacherTargets(
        response=losses.DenseTargets(t.hidden[:, :-1][resp], weight),
        visual=losses.DenseTargets(t_vis, weight),
        visual_tokens=per_image(t_vis, n_images(t)),
        image_features=t.image_features,
        hidden_states=t.hidden_states,
    )


class OnlineTeacher:
    """The frozen teacher model, run on each micro-batch without a graph."""

    def __init__(self, model):
        self.model = model.eval()

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    def targets(self, batch: Batch, need_hidden: bool) -> losses.TeacherTargets:
        return online_targets(self.model, batch, need_hidden)
