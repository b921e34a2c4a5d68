"""A stage's objective on one micro-batch: every loss term of METHOD.md, normalised and weighted.

L = ce*L_reg + lambda * (alpha*L_res + beta*L_vis + gamma*L_rel + delta*L_lat + eps*L_tower). Each term is a sum
from `lsd_edge.distill.losses` divided by its count over the whole accumulated batch (`Counts`, summed
over processes too), so any split of a step into micro-batches and processes trains the same step.
A teacher that sees with another grid hands its targets over already pooled onto the student's
(`lsd_edge.distill.teacher`), so the terms read the same here whatever the two grids; one with
another tokenizer hands over targets that score themselves across the two vocabularies
(`lsd_edge.distill.cross_vocab`), at the answer tokens both tokenizations start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lsd_edge.data.batch import Batch
from lsd_edge.distill import losses
from lsd_edge.distill.forward import PLAIN, Forward, StudentPass, n_images, output_weight, per_image
from lsd_edge.distill.teacher import Teacher
from lsd_edge.models.tokens import IGNORE_INDEX
from lsd_edge.recipe.schema import DISTILL_TERMS, StageConfig

TERMS = ("ce",) + DISTILL_TERMS


@dataclass
class Counts:
    """Valid items in a whole accumulated batch: the denominators of every term. `response` counts
    the answer positions the response KL reads (the data's answers and the student's own, on-policy),
    `labelled` those CE reads (the data's answers only)."""

    response: int = 0
    visual: int = 0
    images: int = 0
    tokens: int = 0
    labelled: int = 0

    @staticmethod
    def of(batches: list[Batch], n_image_tokens: int) -> Counts:
        c = Counts()
        for b in batches:
            c.response += int((b.labels[:, 1:] != IGNORE_INDEX).sum())
            c.labelled += int((b.ce_labels[:, 1:] != IGNORE_INDEX).sum())
            c.visual += int(b.visual_mask.sum())
            c.images += int(b.visual_mask.sum()) // max(1, n_image_tokens)
            c.tokens += b.n_tokens
        return c

    def as_list(self) -> list[int]:
        return [self.response, self.visual, self.images, self.tokens, self.labelled]


class LatentProjector(nn.Module):
    """Trainable linear maps from student hidden size to teacher hidden size, one per latent pair, and
    (`tower`: (student, teacher) widths) one from the student tower's feature width to the teacher's,
    for the vision-tower term.

    Part of training only: never saved with the student (METHOD.md)."""

    def __init__(self, pairs, student_dim: int, teacher_dim: int, tower: tuple[int, int] | None = None):
        super().__init__()
        self.pairs = [tuple(p) for p in pairs]
        self.maps = nn.ModuleList(nn.Linear(student_dim, teacher_dim) for _ in self.pairs)
        self.tower = None if tower is None else nn.Linear(*tower)

    def all_maps(self) -> list[nn.Linear]:
        return list(self.maps) + ([] if self.tower is None else [self.tower])


def logit_sums(student, hidden, lc, vocab_rows, *, targets=None, teacher=None):
    """(CE sum, KD sum) at gathered positions: hidden (N, Ds), targets (N,) for CE, `teacher` targets
    for KD; whole logits, or `lc.chunk_size` positions at a time (same values and gradients)."""
    kl = dict(
        kind=lc.kl,
        temperature=lc.temperature,
        jsd_beta=lc.jsd_beta,
        skew_lambda=lc.skew_lambda,
        vocab_rows=vocab_rows,
    )
    if lc.chunk_size:
        return losses.chunked_logit_sums(
            hidden, output_weight(student), targets=targets, teacher=teacher, chunk=lc.chunk_size, **kl
        )
    head = student.lm_head  # its weight, not its call: the chunked path reads the weight too
    logits = F.linear(hidden, head.weight, head.bias)  # (N, Vs)
    ce = None if targets is None else losses.cross_entropy_sum(logits, targets, vocab_rows)
    kd = None if teacher is None else losses.divergence_sum(logits, teacher, **kl)
    return ce, kd


def loss_terms(
    student,
    teacher: Teacher | None,
    batch: Batch,
    stage: StageConfig,
    counts: Counts,
    vocab_rows: int,
    latent: LatentProjector | None,
    student_pass: StudentPass = PLAIN,
) -> dict[str, torch.Tensor]:
    """Every loss term of one micro-batch, each normalised by its count in the accumulated batch.

    L = ce*L_reg + lambda * (alpha*L_res + beta*L_vis + gamma*L_rel + delta*L_lat + eps*L_tower); the
    weights are applied by the caller. Terms with weight 0 are not computed. `teacher` is the online teacher or a
    teacher cache (`lsd_edge.distill.teacher.Teacher`). `student_pass` runs the student's forward
    and says what a latent map adds where this micro-batch has nothing for it
    (`lsd_edge.distill.forward.StudentPass`: the plain pass adds nothing).
    """
    lc = stage.loss
    w = {t: lc.weight(t) for t in DISTILL_TERMS}
    need_teacher = teacher is not None and stage.distills
    need_hidden = need_teacher and w["latent"] > 0 and any(isinstance(p[0], int) for p in lc.latent_pairs)
    s = student_pass.run(student, batch, need_hidden)
    resp = batch.labels[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts token t+1
    s_resp_h = s.hidden[:, :-1][resp]  # (N, Ds)
    targets = batch.ce_labels[:, 1:][resp]  # (N,): -100 at the student's own answers (no CE)
    t = teacher.targets(batch, need_hidden) if need_teacher else None
    resp_t = t.response if t is not None and w["response_kl"] > 0 else None
    # A teacher with another tokenizer is compared at the answer tokens both tokenizations start
    # (`Batch.kd_positions`), CE at every label; one tokenizer: the same rows for both, in one pass.
    aligned = batch.kd is not None and resp_t is not None
    ce, kd = logit_sums(
        student, s_resp_h, lc, vocab_rows, targets=targets, teacher=None if aligned else resp_t
    )
    if aligned:
        _, kd = logit_sums(student, s.hidden[:, :-1][batch.kd_positions], lc, vocab_rows, teacher=resp_t)
    terms: dict[str, torch.Tensor] = {"ce": ce / max(1, counts.labelled)}
    if t is None:
        if latent is not None:  # no teacher targets: the maps have nothing to align
            terms["ce"] = with_unused(terms["ce"], [student_pass.unused_map(m, s) for m in latent.all_maps()])
        return terms
    if kd is not None:
        terms["response_kl"] = kd / max(1, counts.response)
    # A micro-batch without images adds nothing to the visual terms (METHOD.md), its CE and response
    # KL still train; the counts are the whole step's, so its share of the step stays right.
    # A micro-batch has visual tokens exactly when it has images (each gives K): known without a sync.
    s_vis = None
    if n_images(s) > 0 and (w["visual_kl"] > 0 or w["relation"] > 0):
        s_vis = s.hidden[batch.visual_mask]  # (I*K, Ds), gathered once for both terms
    if w["visual_kl"] > 0 and s_vis is not None:
        _, kd = logit_sums(student, s_vis, lc, vocab_rows, teacher=t.visual)
        terms["visual_kl"] = kd / max(1, counts.visual)
    if w["relation"] > 0 and s_vis is not None:
        sv = per_image(s_vis, n_images(s))
        if t.relation is not None:
            rel = losses.relation_sum_to(sv, t.relation)
        else:
            rel = losses.relation_sum(sv, t.visual_tokens)
        terms["relation"] = rel / max(1, counts.images)
    if w["latent"] > 0 and latent is not None:
        terms["latent"] = latent_term(s, t, batch, counts, latent, lc.latent_kind, student_pass)
    if w["vision"] > 0 and latent is not None and latent.tower is not None:
        terms["vision"] = tower_term(s, t, counts, latent.tower, lc.latent_kind, student_pass)
    return terms


def tower_term(
    s: Forward,
    t: losses.TeacherTargets,
    counts: Counts,
    tower: nn.Linear,
    kind: str,
    student_pass: StudentPass,
) -> torch.Tensor:
    """L_tower: sum over the student's visual positions of d(W(v_s), v_t) / visual positions, v the
    towers' feature layers (the teacher's pooled onto the student's grid), d as `loss.latent_kind`."""
    if s.vision_features is None:  # no image in this micro-batch
        return with_unused(s.hidden.new_zeros(()), [student_pass.unused_map(tower, s)])
    sx, tx = s.vision_features.flatten(0, 1), t.vision_features.flatten(0, 1)
    return losses.latent_sum(tower(sx.float()), tx.float(), kind) / max(1, counts.visual)


def with_unused(total: torch.Tensor, extras: list[torch.Tensor | None]) -> torch.Tensor:
    """`total` plus what the student pass adds for unused parts (nothing for the plain pass)."""
    for extra in extras:
        if extra is not None:
            total = total + extra
    return total


def latent_term(
    s: Forward,
    t: losses.TeacherTargets,
    batch: Batch,
    counts: Counts,
    latent: LatentProjector,
    kind: str,
    student_pass: StudentPass = PLAIN,
) -> torch.Tensor:
    """L_lat: the mean over latent pairs of each pair's alignment sum over its count (visual tokens for
    the projector pair, every valid token for layer pairs)."""
    total = s.hidden.new_zeros(())
    valid = batch.attention_mask.bool()
    for proj, (ls, lt) in zip(latent.maps, latent.pairs, strict=True):
        if ls == "projector":
            if s.image_features is None:  # no image in this micro-batch: nothing to align here
                total = with_unused(total, [student_pass.unused_map(proj, s)])
                continue
            sx = s.image_features.flatten(0, 1)
            tx = t.image_features.flatten(0, 1)
            denom = max(1, counts.visual)
        else:
            sx = s.hidden_states[ls][valid]
            tx = t.hidden_states[lt][valid]
            denom = max(1, counts.tokens)
        total = total + losses.latent_sum(proj(sx.float()), tx.float(), kind) / denom
    return total / len(latent.pairs)


def weighted_total(terms: dict[str, torch.Tensor], stage: StageConfig, lam: float) -> torch.Tensor:
    """L = ce*L_reg + lambda * sum(weight * term) over the distillation terms present."""
    total = stage.loss.ce * terms["ce"]
    for t in DISTILL_TERMS:
        if t in terms:
            total = total + lam * stage.loss.weight(t) * terms[t]
    return total
