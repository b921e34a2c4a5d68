"""The losses of METHOD.md as pure functions on tensors.

Every function returns a *sum* over the positions (or images) it is given, so that the trainer can
divide by the number of valid items in the whole accumulated batch (METHOD.md: "normalize by the
number of valid tokens in the whole (accumulated) batch"), and takes only the rows the tokenizer can
produce (`vocab_rows`), so padded embedding rows never enter a distribution.

Shapes: N = positions already gathered (response or visual tokens), V = vocabulary rows,
K = visual tokens per image, I = images, D = hidden size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _log_probs(logits: torch.Tensor, temperature: float, vocab_rows: int | None) -> torch.Tensor:
    """(N, V') -> (N, V) fp32 log-softmax of logits / T over the first `vocab_rows` rows."""
    if vocab_rows is not None:
        logits = logits[..., :vocab_rows]
    return F.log_softmax(logits.float() / temperature, dim=-1)


def cross_entropy_sum(
    logits: torch.Tensor, targets: torch.Tensor, vocab_rows: int | None = None
) -> torch.Tensor:
    """L_reg: summed next-token cross-entropy.

    logits (N, V') at the positions that predict `targets` (N,); entries of `targets` equal to -100
    are ignored. Returns a scalar sum (fp32).
    """
    logp = _log_probs(logits, 1.0, vocab_rows)
    valid = targets != IGNORE_INDEX
    if not valid.any():
        return logits.sum() * 0.0
    picked = logp[valid].gather(-1, targets[valid].unsqueeze(-1)).squeeze(-1)
    return -picked.sum()


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probabilities (N, V) -> (N,); 0 * log 0 taken as 0."""
    p = logp.exp()
    return (p * (logp - logq)).sum(-1)


def _log_mix(logp: torch.Tensor, logq: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(w * p + (1 - w) * q), computed stably in log space."""
    return torch.logsumexp(torch.stack([logp + math.log(weight_p), logq + math.log(1.0 - weight_p)]), dim=0)


def distill_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str = "forward",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    vocab_rows: int | None = None,
) -> torch.Tensor:
    """Per-position divergence between teacher (phi_l) and student (phi_s) next-token distributions.

    student_logits (N, Vs), teacher_logits (N, Vt): both cut to `vocab_rows` (the tokenizer's rows),
    divided by the temperature T, soft-maxed in fp32. Returns (N,) scaled by T^2 (Hinton), so the
    gradients keep their size as T changes.

    - forward: KL(p_t || p_s), METHOD.md's L_res / L_vis (the default)
    - reverse: KL(p_s || p_t)
    - jsd:     beta * KL(p_t || m) + (1 - beta) * KL(p_s || m), m = beta * p_t + (1 - beta) * p_s
    - skew:    KL(p_t || lambda * p_t + (1 - lambda) * p_s)  (skew KL, lambda = 0.1 by default)
    """
    rows = vocab_rows if vocab_rows is not None else min(student_logits.shape[-1], teacher_logits.shape[-1])
    log_s = _log_probs(student_logits, temperature, rows)
    log_t = _log_probs(teacher_logits, temperature, rows)
    if kind == "forward":
        div = _kl(log_t, log_s)
    elif kind == "reverse":
        div = _kl(log_s, log_t)
    elif kind == "jsd":
        log_m = _log_mix(log_t, log_s, jsd_beta)
        div = jsd_beta * _kl(log_t, log_m) + (1.0 - jsd_beta) * _kl(log_s, log_m)
    elif kind == "skew":
        log_m = _log_mix(log_t, log_s, skew_lambda)
        div = _kl(log_t, log_m)
    else:
        raise ValueError(f"unknown KL kind '{kind}'")
    return div * (temperature**2)


def kd_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, **kw) -> torch.Tensor:
    """Sum over positions of `distill_divergence`: L_res over response positions, L_vis over visual ones."""
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    return distill_divergence(student_logits, teacher_logits, **kw).sum()


def relation_matrix(tokens: torch.Tensor) -> torch.Tensor:
    """R = y_v (x) y_v of L2-normalised rows: (I, K, D) -> (I, K, K) cosine-similarity matrices."""
    y = F.normalize(tokens.float(), dim=-1)
    return y @ y.transpose(-1, -2)


def relation_sum(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
    """RDist: sum over images of 1 - cos(flatten(R_s), flatten(R_t)).

    student_tokens (I, K, Ds), teacher_tokens (I, K, Dt): the LLM outputs at the visual positions.
    Works across hidden sizes since R is K x K for both. No image, no term (returns 0).
    """
    if student_tokens.shape[0] == 0:
        return student_tokens.sum() * 0.0
    rs = relation_matrix(student_tokens).flatten(1)
    rt = relation_matrix(teacher_tokens).flatten(1)
    return (1.0 - F.cosine_similarity(rs, rt, dim=-1)).sum()


def latent_sum(projected_student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Latent alignment, summed over positions: (N, D) student states already projected to the
    teacher's width, (N, D) teacher states. `mse`: mean squared error over D; `cosine`: 1 - cos."""
    if projected_student.shape[0] == 0:
        return projected_student.sum() * 0.0
    s, t = projected_student.float(), teacher.float()
    if kind == "mse":
        return ((s - t) ** 2).mean(-1).sum()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).sum()
    raise ValueError(f"unknown latent kind '{kind}'")
