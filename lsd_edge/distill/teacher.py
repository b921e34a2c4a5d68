"""What a stage distils from, behind one interface: the teacher model run now, or a teacher cache.

A `Teacher` gives the teacher side of a micro-batch (`targets`) and its hidden size. `OnlineTeacher`
runs the frozen model under `torch.no_grad()`; `lsd_edge.distill.teacher_cache.TeacherCache` reads
the same targets from disk with no model in memory. How the teacher is placed over processes, and
whether a pad slot runs it, is the training backend's business (`lsd_edge.train.backends`).

A teacher that sees with another visual grid than the student (METHOD.md, "edge vision") runs on the
batch's teacher view, and its visual-position targets are pooled onto the student's grid
(`lsd_edge.distill.grid`) before any loss reads them: the visual KL's mixture of distributions,
RDist's tokens, the projector features, and per-layer states re-laid onto the student's positions
(text positions one to one, visual positions pooled). The losses then read them as they read a
teacher that sees as the student does.

A teacher with another tokenizer than the student runs on its own tokenization of each record (the
batch's teacher view); its response targets are taken at the answer tokens both tokenizations start
at the same character (`Batch.kd_positions`), and its response and visual targets are wrapped to be
scored across the two vocabularies (`lsd_edge.distill.cross_vocab`: ULD or GOLD).
"""

from __future__ import annotations

from typing import Protocol

import torch

from lsd_edge.data.batch import Batch
from lsd_edge.distill import losses
from lsd_edge.distill.cross_vocab import VocabMap
from lsd_edge.distill.forward import Forward, forward, n_images, per_image
from lsd_edge.distill.grid import GridMap, pool_features, pooled_log_probs


class Teacher(Protocol):
    hidden_size: int
    vision_hidden_size: int

    def targets(self, batch: Batch, need_hidden: bool) -> losses.TeacherTargets: ...


def vision_width(config) -> int:
    """Width of the tower features the projector reads (several feature layers are concatenated)."""
    layer = config.vision_feature_layer
    return config.vision_config.hidden_size * (1 if isinstance(layer, int) else len(layer))


def online_targets(
    teacher, batch: Batch, need_hidden: bool, grid: GridMap | None = None, vocab: VocabMap | None = None
) -> losses.TeacherTargets:
    """The teacher side of a micro-batch from a forward pass of the teacher (no graph), on the
    student's grid: `grid` maps the teacher's visual positions onto it (None: the grids are equal);
    `vocab` maps its vocabulary onto the student's (None: one vocabulary)."""
    targets = _online_targets(teacher, batch, need_hidden, grid)
    if vocab is not None:
        targets.response = vocab.wrap(targets.response)
        targets.visual = vocab.wrap(targets.visual)
    return targets


def _online_targets(teacher, batch: Batch, need_hidden: bool, grid: GridMap | None) -> losses.TeacherTargets:
    tb = batch.teacher_view
    with torch.no_grad():
        t = forward(teacher, tb, hidden_states=need_hidden)
        resp = tb.kd_positions
        weight = teacher.lm_head.weight
        t_vis = t.hidden[tb.visual_mask]  # (I*Kt, Dt), gathered once
        response = losses.DenseTargets(t.hidden[:, :-1][resp], weight)
        tokens = per_image(t_vis, n_images(t))
        if grid is None or n_images(t) == 0:
            return losses.TeacherTargets(
                response,
                losses.DenseTargets(t_vis, weight),
                tokens,
                None,
                t.image_features,
                t.hidden_states,
                t.vision_features,
            )
        return losses.TeacherTargets(
            response=response,
            visual=losses.LogProbTargets(
                pooled_log_probs(
                    losses.DenseTargets(t_vis, weight),
                    grid.p,
                    temperature=grid.temperature,
                    vocab_rows=grid.vocab_rows,
                )
            ),
            visual_tokens=pool_features(tokens, grid.p),
            image_features=pool_features(t.image_features, grid.p),
            hidden_states=None if t.hidden_states is None else relaid_states(t, batch, tb, grid),
            vision_features=pool_features(t.vision_features, grid.p),
        )


def relaid_states(t: Forward, batch: Batch, tb: Batch, grid: GridMap) -> tuple[torch.Tensor, ...]:
    """The teacher's per-layer states (B, Tt, D) on the student's positions (B, Ts, D): its text
    positions one to one (both views hold the same text in the same order), its visual positions
    pooled onto the student's grid; padding left at 0 (no loss reads it)."""
    s_text = batch.attention_mask.bool() & ~batch.visual_mask
    t_text = tb.attention_mask.bool() & ~tb.visual_mask
    out = []
    for h in t.hidden_states:
        laid = h.new_zeros(batch.input_ids.shape + h.shape[-1:])
        laid[s_text] = h[t_text]
        laid[batch.visual_mask] = (
            pool_features(per_image(h[tb.visual_mask], n_images(t)), grid.p).flatten(0, 1).to(h.dtype)
        )
        out.append(laid)
    return tuple(out)


class OnlineTeacher:
    """The frozen teacher model, run on each micro-batch without a graph; `grid` maps its visual
    positions onto a student that sees with another grid (None: the same grid), `vocab` its
    vocabulary onto a student with another tokenizer (None: the same one)."""

    def __init__(self, model, grid: GridMap | None = None, vocab: VocabMap | None = None):
        self.model = model.eval()
        self.grid = grid
        self.vocab = vocab

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def vision_hidden_size(self) -> int:
        return vision_width(self.model.config)

    def targets(self, batch: Batch, need_hidden: bool) -> losses.TeacherTargets:
        return online_targets(self.model, batch, need_hidden, self.grid, self.vocab)
