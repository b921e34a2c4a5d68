"""Distillation across unequal visual-token grids (METHOD.md, "edge vision"), as pure functions.

A student that sees with fewer visual tokens than its teacher (a lower resolution, or another tower)
has a Hs x Ws patch grid where the teacher has Ht x Wt. This module owns the map between the two,
the area-overlap matrix P (Ks x Kt), and the teacher's visual-position targets pooled through it onto
the student's grid: the visual KL's mixture of distributions, RDist's pooled tokens, the pooled
features of the latent alignment and of the vision-tower feature term. Each loss returns a sum, like
`lsd_edge.distill.losses`, whose losses it reuses on the pooled targets.

Shapes: I = images, Kt = Ht*Wt teacher and Ks = Hs*Ws student visual positions per image, both in
row-major order (cell r*W + c), the order LLaVA and SigLIP flatten patches; V = vocabulary rows,
D = hidden size. The teacher side is a target: it is detached, and only the student gets gradients.

With equal grids P is the identity and every function hands the teacher's own tensors to the losses
of `lsd_edge.distill.losses`, so every term is today's bit for bit (a pooled path need not be: a
log-sum-exp or a matmul may move the last bits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lsd_edge.distill.losses import (
    DenseTargets,
    LogProbTargets,
    TopKTargets,
    divergence_sum,
    kd_sum,
    latent_sum,
    log_probs,
    relation_matrix,
    relation_sum,
)


def _overlap_1d(n_teacher: int, n_student: int) -> torch.Tensor:
    """(n_student, n_teacher) float64: the fraction of student interval [a/ns, (a+1)/ns] that teacher
    interval [b/nt, (b+1)/nt] covers."""
    # In units of 1 / (ns * nt) every edge of both grids is an integer: the overlaps are exact integers.
    a = torch.arange(n_student)[:, None]
    b = torch.arange(n_teacher)[None, :]
    lo = torch.maximum(a * n_teacher, b * n_student)
    hi = torch.minimum((a + 1) * n_teacher, (b + 1) * n_student)
    return (hi - lo).clamp_min(0).double() / n_teacher


def overlap_matrix(
    teacher_grid: tuple[int, int], student_grid: tuple[int, int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """P (Ks, Kt): P_ij = area(student cell i ∩ teacher cell j) / area(student cell i).

    teacher_grid (Ht, Wt) and student_grid (Hs, Ws) both tile the same unit square; cells are numbered
    row-major (i = r*Ws + c, j = r*Wt + c). Rows sum to 1. The area of a cell intersection is the
    product of its row and column interval overlaps, so P = kron(A_rows, A_cols) with
    A[a, b] = |[a/Hs, (a+1)/Hs] ∩ [b/Ht, (b+1)/Ht]| * Hs (and likewise for columns): exact for any
    sizes (computed in integers, then float64), not only integer ratios. Equal grids give the identity
    exactly.
    """
    (ht, wt), (hs, ws) = teacher_grid, student_grid
    if min(ht, wt, hs, ws) <= 0:
        raise ValueError(
            f"grids must have positive sizes, got teacher {teacher_grid}, student {student_grid}"
        )
    return torch.kron(_overlap_1d(ht, hs), _overlap_1d(wt, ws)).to(dtype)


@dataclass(frozen=True)
class GridMap:
    """The teacher's visual positions mapped onto the student's for one stage: P (Ks, Kt) and the
    temperature and vocabulary rows the pooled visual mixture is taken at (the stage loss's)."""

    p: torch.Tensor
    temperature: float = 1.0
    vocab_rows: int | None = None

    @staticmethod
    def between(
        teacher_grid: tuple[int, int],
        student_grid: tuple[int, int],
        temperature: float,
        vocab_rows: int | None,
    ) -> GridMap | None:
        """The map of two grids, or None where they are equal (the teacher's targets are then used as they are)."""
        if teacher_grid == student_grid:
            return None
        return GridMap(overlap_matrix(teacher_grid, student_grid), temperature, vocab_rows)


def _is_identity(p: torch.Tensor) -> bool:
    return p.shape[0] == p.shape[1] and torch.equal(p, torch.eye(p.shape[0], dtype=p.dtype, device=p.device))


def _n_images(n_rows: int, p: torch.Tensor, what: str) -> int:
    """How many images `n_rows` teacher rows hold: a whole number of Kt each."""
    if n_rows % p.shape[1]:
        raise ValueError(f"{what}: {n_rows} rows are not a whole number of images of {p.shape[1]} positions")
    return n_rows // p.shape[1]


def pool_log_probs(teacher_log_probs: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """log sum_j P_ij phi_l(. | j): each image's teacher distributions mixed onto the student's grid.

    teacher_log_probs (I*Kt, V): fp32 log-probs (at the loss's temperature, over the tokenizer's rows)
    at each image's Kt teacher positions, image by image; p (Ks, Kt). Returns (I*Ks, V) fp32.

    The mixture is taken in probability space (not in logits), computed in log space: a logsumexp of
    log P_ij + log phi_l(. | j) over the teacher cells j that student cell i overlaps, so no tail
    probability underflows. One image at a time, its intermediate is (Ks, M, V), M = the most teacher
    cells one student cell overlaps (9 for 27 x 27 -> 12 x 12).
    """
    log_t = teacher_log_probs.detach()
    if _is_identity(p):
        return log_t
    (ks, kt), n_img = p.shape, _n_images(log_t.shape[0], p, "teacher log-probs")
    w = p.to(device=log_t.device, dtype=torch.float32)
    weight, cells = w.topk(int((w > 0).sum(-1).max()), dim=-1)  # (Ks, M): each student cell's teacher cells
    log_w = weight.log()[:, :, None]  # (Ks, M, 1); log 0 = -inf where a cell overlaps fewer than M
    out = torch.empty(n_img * ks, log_t.shape[-1], dtype=torch.float32, device=log_t.device)
    for img in range(n_img):
        rows = log_t[img * kt : (img + 1) * kt].float()[cells]  # (Ks, M, V)
        out[img * ks : (img + 1) * ks] = torch.logsumexp(rows + log_w, dim=1)
    return out


def pooled_log_probs(
    teacher: torch.Tensor | DenseTargets,
    p: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_rows: int | None = None,
) -> torch.Tensor:
    """The pooled visual targets from the teacher's logits: (I*Ks, V) log sum_j P_ij phi_l(. | j),
    phi_l = softmax(z / T) over the first `vocab_rows` rows in fp32.

    teacher: logits (I*Kt, V') at each image's Kt visual positions, or `DenseTargets` there; p (Ks, Kt).
    Made one image at a time, so only one image's (Kt, V) teacher logits exist at once. A teacher
    cache stores these (their top-k: `losses.top_k_of_log_probs`), not the teacher's own rows.
    """
    dense = isinstance(teacher, DenseTargets)
    kt, n_img = p.shape[1], _n_images(len(teacher), p, "teacher logits")
    if _is_identity(p) or n_img == 0:  # the teacher's own rows, made as the losses make them
        logits = teacher.logits(vocab_rows) if dense else teacher
        return log_probs(logits.detach(), temperature, vocab_rows)
    parts = []
    for img in range(n_img):
        sl = slice(img * kt, (img + 1) * kt)
        logits = teacher.rows(sl).logits(vocab_rows) if dense else teacher[sl]
        parts.append(pool_log_probs(log_probs(logits.detach(), temperature, vocab_rows), p))
    return torch.cat(parts)


def pooled_divergence_sum(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | DenseTargets | LogProbTargets,
    p: torch.Tensor,
    *,
    kind: str = "forward",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    vocab_rows: int | None = None,
) -> torch.Tensor:
    """Pooled L_vis: sum over the student's visual positions i of D(sum_j P_ij phi_l(. | j), phi_s(. | i)).

    student_logits (I*Ks, Vs) at each image's Ks visual positions; teacher at each image's Kt: logits
    (I*Kt, Vt), `DenseTargets`, or `LogProbTargets` (log-probs at T over the compared rows); p (Ks, Kt).
    Cached `TopKTargets` only with equal grids: a cache pools before it keeps the top k.
    D is the stage's divergence (`kind`: forward, reverse, jsd with `jsd_beta`, skew with
    `skew_lambda`), both sides at temperature T in fp32 over `vocab_rows` rows (the smaller
    vocabulary when None), times T^2: `losses.divergence_sum` against the pooled mixture.
    """
    kw = dict(
        kind=kind, temperature=temperature, jsd_beta=jsd_beta, skew_lambda=skew_lambda, vocab_rows=vocab_rows
    )
    if _is_identity(p):  # equal grids: today's term, by today's function (cached top-k targets too)
        if isinstance(teacher, torch.Tensor):
            return kd_sum(student_logits, teacher.detach(), **kw)
        return divergence_sum(student_logits, teacher, **kw)
    if isinstance(teacher, TopKTargets):
        raise ValueError(
            "top-k targets cannot be mixed per token id: pool the teacher's log-probs when the cache is "
            "built (pooled_log_probs, then losses.top_k_of_log_probs)"
        )
    if student_logits.shape[0] == 0:  # no image in this micro-batch
        return student_logits.sum() * 0.0
    if isinstance(teacher, LogProbTargets):
        log_t = pool_log_probs(teacher.logp, p)
    else:
        width = teacher.weight.shape[0] if isinstance(teacher, DenseTargets) else teacher.shape[-1]
        rows = vocab_rows if vocab_rows is not None else min(student_logits.shape[-1], width)
        log_t = pooled_log_probs(teacher, p, temperature=temperature, vocab_rows=rows)
    if student_logits.shape[0] != log_t.shape[0]:
        raise ValueError(
            f"{student_logits.shape[0]} student visual rows against {log_t.shape[0]} pooled ones"
        )
    return divergence_sum(student_logits, LogProbTargets(log_t), **kw)


def pool_features(teacher: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """sum_j P_ij t_j: teacher features (I, Kt, D) pooled onto the student's grid -> (I, Ks, D) fp32
    (the teacher's own tensor, detached, when P is the identity). The target of the projector-output
    latent alignment and of the vision-tower feature term; RDist's pooled tokens P y_v^t."""
    t = teacher.detach()
    if _is_identity(p):
        return t
    if t.shape[1] != p.shape[1]:
        raise ValueError(f"teacher features have {t.shape[1]} positions per image, P maps {p.shape[1]}")
    return p.to(device=t.device, dtype=torch.float32) @ t.float()  # (Ks, Kt) @ (I, Kt, D)


def pooled_relation_matrix(teacher_tokens: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """R_t = rel(P y_v^t): teacher visual tokens (I, Kt, D) -> (I, Ks, Ks), what a cache stores for RDist."""
    return relation_matrix(pool_features(teacher_tokens, p))


def pooled_relation_sum(
    student_tokens: torch.Tensor, teacher_tokens: torch.Tensor, p: torch.Tensor
) -> torch.Tensor:
    """Pooled RDist: sum over images of 1 - cos(flatten(rel(y_v^s)), flatten(rel(P y_v^t))).

    student_tokens (I, Ks, Ds), teacher_tokens (I, Kt, Dt): the LLM outputs at the visual positions;
    p (Ks, Kt). rel = `losses.relation_matrix` (cosine similarities, Ks x Ks for both). No image, no
    term (returns 0)."""
    if student_tokens.shape[0] == 0:
        return student_tokens.sum() * 0.0
    return relation_sum(student_tokens, pool_features(teacher_tokens, p))


def pooled_latent_sum(
    projected_student: torch.Tensor, teacher: torch.Tensor, p: torch.Tensor, kind: str = "cosine"
) -> torch.Tensor:
    """Alignment against pooled teacher features, summed over student positions: sum_i d(W(s_i), sum_j
    P_ij t_j), d = mean squared error over D (`mse`) or 1 - cos (`cosine`), as `losses.latent_sum`.

    projected_student (I, Ks, Dt): the student's features already projected to the teacher's width by
    the caller's nn.Linear W; teacher (I, Kt, Dt); p (Ks, Kt). Serves both METHOD.md terms: the
    projector-output latent alignment (projector outputs) and the vision-tower feature term (the
    towers' feature-layer outputs, patch positions only, as the projector reads them)."""
    if projected_student.shape[0] == 0:
        return projected_student.sum() * 0.0
    pooled = pool_features(teacher, p)
    return latent_sum(projected_student.flatten(0, 1), pooled.flatten(0, 1), kind)
