"""The losses of METHOD.md as pure functions on tensors.

Every function returns a *sum* over the positions (or images) it is given, so that the trainer can
divide by the number of valid items in the whole accumulated batch (METHOD.md: "normalize by the
number of valid tokens in the whole (accumulated) batch"), and takes only the rows the tokenizer can
produce (`vocab_rows`), so padded embedding rows never enter a distribution.

Shapes: N = positions already gathered (response or visual tokens), V = vocabulary rows,
K = visual tokens per image, I = images, D = hidden size, k = cached teacher log-probs per position.

The teacher side of a logit loss is `DenseTargets` (its hidden states and lm_head), `TopKTargets` (a
cache's top-k log-probs plus the remaining mass as one bucket), `LogProbTargets` (log-probs made
elsewhere: a mixture pooled by `grid`) or targets over another vocabulary that score themselves
(`cross_vocab`). `chunked_logit_sums` computes the same sums from hidden states and lm_head weights
a chunk of positions at a time, so B x T x V logits are never whole in memory for either model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lsd_edge.models.tokens import IGNORE_INDEX


def log_probs(logits: torch.Tensor, temperature: float, vocab_rows: int | None) -> torch.Tensor:
    """(N, V') -> (N, V) fp32 log-softmax of logits / T over the first `vocab_rows` rows."""
    if vocab_rows is not None:
        logits = logits[..., :vocab_rows]
    logits = logits.float()
    # x / 1.0 == x exactly; skipping it saves a whole (N, V) copy on the common path
    return F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def cross_entropy_sum(
    logits: torch.Tensor, targets: torch.Tensor, vocab_rows: int | None = None
) -> torch.Tensor:
    """L_reg: summed next-token cross-entropy.

    logits (N, V') at the positions that predict `targets` (N,); entries of `targets` equal to -100
    are ignored. Returns a scalar sum (fp32).
    """
    logp = log_probs(logits, 1.0, vocab_rows)
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
    teacher_logits: torch.Tensor | LogProbTargets,
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
    gradients keep their size as T changes. The teacher may instead be `LogProbTargets` (N, V), its
    log-probs at T over the compared rows already (a mixture pooled by `lsd_edge.distill.grid`).

    - forward: KL(p_t || p_s), METHOD.md's L_res / L_vis (the default)
    - reverse: KL(p_s || p_t)
    - jsd:     beta * KL(p_t || m) + (1 - beta) * KL(p_s || m), m = beta * p_t + (1 - beta) * p_s
    - skew:    KL(p_t || lambda * p_t + (1 - lambda) * p_s)  (skew KL, lambda = 0.1 by default)
    """
    made = isinstance(teacher_logits, LogProbTargets)  # log-probs at T made elsewhere (pooled)
    t = teacher_logits.logp if made else teacher_logits
    rows = vocab_rows if vocab_rows is not None else min(student_logits.shape[-1], t.shape[-1])
    if made and rows != t.shape[-1]:
        raise ValueError(f"teacher log-probs have {t.shape[-1]} rows, the loss compares {rows}")
    log_s = log_probs(student_logits, temperature, rows)
    log_t = t if made else log_probs(t, temperature, rows)
    return divergence(log_s, log_t, kind, jsd_beta, skew_lambda) * (temperature**2)


def divergence(
    log_s: torch.Tensor, log_t: torch.Tensor, kind: str, jsd_beta: float, skew_lambda: float
) -> torch.Tensor:
    """The four divergences between two (N, B) log-distributions -> (N,)."""
    if kind == "forward":
        return _kl(log_t, log_s)
    if kind == "reverse":
        return _kl(log_s, log_t)
    if kind == "jsd":
        log_m = _log_mix(log_t, log_s, jsd_beta)
        return jsd_beta * _kl(log_t, log_m) + (1.0 - jsd_beta) * _kl(log_s, log_m)
    if kind == "skew":
        return _kl(log_t, _log_mix(log_t, log_s, skew_lambda))
    raise ValueError(f"unknown KL kind '{kind}'")


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
    return relation_sum_to(student_tokens, relation_matrix(teacher_tokens))


def relation_sum_to(student_tokens: torch.Tensor, teacher_relation: torch.Tensor) -> torch.Tensor:
    """RDist against teacher relation matrices already made (a cache stores them): student_tokens
    (I, K, Ds), teacher_relation (I, K, K) -> sum over images of 1 - cos(flatten(R_s), flatten(R_t))."""
    if student_tokens.shape[0] == 0:
        return student_tokens.sum() * 0.0
    rs = relation_matrix(student_tokens).flatten(1)
    return (1.0 - F.cosine_similarity(rs, teacher_relation.float().flatten(1), dim=-1)).sum()


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


# ------------------------------------------------------------------------------------- teacher targets


@dataclass(frozen=True)
class DenseTargets:
    """The teacher's whole distribution at N positions, kept as final hidden states (N, Dt) and its
    lm_head weight (Vt, Dt): logits are made only where (and as many rows at a time as) they are used."""

    hidden: torch.Tensor
    weight: torch.Tensor

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def rows(self, sl: slice) -> DenseTargets:
        return DenseTargets(self.hidden[sl], self.weight)

    def logits(self, vocab_rows: int | None = None) -> torch.Tensor:
        """(N, V) teacher logits over the first `vocab_rows` rows, without a graph."""
        weight = self.weight if vocab_rows is None else self.weight[:vocab_rows]
        with torch.no_grad():
            return F.linear(self.hidden, weight)


@dataclass(frozen=True)
class TopKTargets:
    """The teacher's distribution at N positions as a cache stores it: the top-k token ids (N, k), their
    log-probs at temperature T (N, k), and the log of the mass of every other row (N,), so the k + 1
    buckets form a proper distribution. When k covers every vocabulary row there is no tail bucket."""

    ids: torch.Tensor
    logp: torch.Tensor
    tail: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    def rows(self, sl: slice) -> TopKTargets:
        return TopKTargets(self.ids[sl], self.logp[sl], self.tail[sl])


@dataclass(frozen=True)
class LogProbTargets:
    """The teacher's distribution at N positions as fp32 log-probs (N, V) at the loss's temperature over
    the tokenizer's V rows: a target made elsewhere, such as a mixture pooled by `lsd_edge.distill.grid`."""

    logp: torch.Tensor

    def __len__(self) -> int:
        return self.logp.shape[0]

    def rows(self, sl: slice) -> LogProbTargets:
        return LogProbTargets(self.logp[sl])


@dataclass
class TeacherTargets:
    """What the losses need from the teacher for one micro-batch, online or from a cache. Rows follow
    the student's gathering order (sample by sample, position by position); a part not available is None.
    """

    response: DenseTargets | TopKTargets | None = None  # the response positions
    visual: DenseTargets | TopKTargets | LogProbTargets | None = None  # the visual-token positions
    visual_tokens: torch.Tensor | None = None  # (I, K, Dt) LLM outputs at visual positions (online)
    relation: torch.Tensor | None = None  # (I, K, K) relation matrices R_t (cached)
    image_features: torch.Tensor | None = None  # (I, K, Dt) projector output
    hidden_states: tuple[torch.Tensor, ...] | None = None  # per layer (online, latent layer pairs)
    vision_features: torch.Tensor | None = None  # (I, K, Dvt) the vision tower's feature layer


def _tail_log_mass(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability outside `ids`: (N, V) log-probs, (N, k) ids -> (N,). Summed directly over
    the other rows (not 1 - sum(top-k)), so a tail far below the top-k mass keeps its precision."""
    return logp.scatter(-1, ids, float("-inf")).logsumexp(-1)


def top_k_targets(
    teacher_logits: torch.Tensor, k: int, temperature: float = 1.0, vocab_rows: int | None = None
) -> TopKTargets:
    """(N, V') teacher logits -> the top-k log-probs of softmax(logits / T) over `vocab_rows` rows + tail."""
    return top_k_of_log_probs(log_probs(teacher_logits, temperature, vocab_rows), k)


def top_k_of_log_probs(logp: torch.Tensor, k: int) -> TopKTargets:
    """(N, V) teacher log-probs (at the loss's temperature, over the tokenizer's rows) -> top-k + tail."""
    k = min(k, logp.shape[-1])
    top, ids = logp.topk(k, dim=-1)
    if k == logp.shape[-1]:
        return TopKTargets(ids, top, torch.full_like(top[:, 0], float("-inf")))
    return TopKTargets(ids, top, _tail_log_mass(logp, ids))


def sparse_kd_sum(
    student_logits: torch.Tensor,
    target: TopKTargets,
    *,
    kind: str = "forward",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    vocab_rows: int | None = None,
) -> torch.Tensor:
    """L_res / L_vis against cached top-k targets, summed over positions.

    The student's distribution (N, V') is bucketed like the teacher's: its log-probs at the teacher's
    top-k ids plus the log of its remaining mass. Any of the four divergences is then taken between the
    two (k + 1)-bucket distributions, times T^2 as in `distill_divergence`. With k = V it is exactly the
    dense divergence; with k < V it is the divergence of the bucketed distributions (a lower bound of
    the dense one for forward and reverse KL).
    """
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    log_s = log_probs(student_logits, temperature, vocab_rows)
    picked = log_s.gather(-1, target.ids)
    log_t = target.logp.float()
    if target.ids.shape[-1] < log_s.shape[-1]:
        picked = torch.cat([picked, _tail_log_mass(log_s, target.ids).unsqueeze(-1)], -1)
        log_t = torch.cat([log_t, target.tail.float().unsqueeze(-1)], -1)
    return (divergence(picked, log_t, kind, jsd_beta, skew_lambda) * (temperature**2)).sum()


def divergence_sum(student_logits: torch.Tensor, target: DenseTargets | TopKTargets | LogProbTargets, **kw):
    """`kd_sum` against a dense teacher or teacher log-probs, `sparse_kd_sum` against cached top-k targets."""
    if hasattr(target, "divergence_sum"):  # over another vocabulary: scores itself (`cross_vocab`)
        return target.divergence_sum(student_logits, **kw)
    if isinstance(target, TopKTargets):
        return sparse_kd_sum(student_logits, target, **kw)
    teacher = target if isinstance(target, LogProbTargets) else target.logits(kw.get("vocab_rows"))
    return kd_sum(student_logits, teacher, **kw)


# --------------------------------------------------------------------------------------- chunked path


class _ChunkedLinearSums(torch.autograd.Function):
    """Sums of `fn(hidden[c] @ weight.T, c)` over chunks c of rows, with their gradients made chunk by
    chunk in the forward pass (as fused linear-cross-entropy kernels do): one chunk's logits and their
    gradient live at a time, nothing is recomputed, and backward only scales what was stored.

    Each output keeps its own gradient, so any weighting of the outputs afterwards is exact.
    """

    @staticmethod
    def forward(ctx, hidden, weight, fn, n_out, chunk, want_grads):
        need_h = bool(want_grads and ctx.needs_input_grad[0])
        need_w = bool(want_grads and ctx.needs_input_grad[1])
        sums = [torch.zeros((), dtype=torch.float32, device=hidden.device) for _ in range(n_out)]
        grad_h = [torch.zeros_like(hidden) for _ in range(n_out)] if need_h else []
        grad_w = [torch.zeros_like(weight) for _ in range(n_out)] if need_w else []
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, min(hidden.shape[0], start + chunk))
            with torch.enable_grad():
                h = hidden[sl].detach().requires_grad_(need_h)
                w = weight.detach().requires_grad_(need_w)
                logits = F.linear(h, w)  # (c, V)
                outs = fn(logits, sl)
                for k, out in enumerate(outs):
                    sums[k] += out.detach().float()
                    if not (need_h or need_w):
                        continue
                    (g,) = torch.autograd.grad(out, logits, retain_graph=k < n_out - 1)  # (c, V)
                    if need_h:
                        grad_h[k][sl] = (g @ w.detach()).to(hidden.dtype)
                    if need_w:
                        grad_w[k].addmm_(g.t().to(weight.dtype), h.detach().to(weight.dtype))
        ctx.layout = (n_out, need_h, need_w)
        ctx.save_for_backward(*grad_h, *grad_w)
        return tuple(sums)

    @staticmethod
    def backward(ctx, *grad_out):
        n_out, need_h, need_w = ctx.layout
        if getattr(ctx, "used", False):
            raise RuntimeError("chunked logit losses keep their gradients for one backward pass only")
        ctx.used = True
        saved = list(ctx.saved_tensors)
        grad_h = saved[:n_out] if need_h else []
        grad_w = saved[n_out if need_h else 0 :] if need_w else []
        return _combine(grad_h, grad_out), _combine(grad_w, grad_out), None, None, None, None


def _combine(grads: list[torch.Tensor], scales: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """sum_k scales[k] * grads[k], in place in grads[0]: a (V, D) weight gradient is not copied."""
    if not grads:
        return None
    out = grads[0].mul_(scales[0].to(grads[0].dtype))
    for g, s in zip(grads[1:], scales[1:], strict=True):
        out.addcmul_(g, s.to(g.dtype))
    return out


def chunked_linear_sums(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    fn: Callable[[torch.Tensor, slice], list[torch.Tensor]],
    n_out: int,
    chunk: int,
) -> tuple[torch.Tensor, ...]:
    """Sum over row chunks of `fn(logits_chunk, rows)` (n_out scalars each), logits = hidden @ weight.T.

    hidden (N, D), weight (V, D). Values and gradients (to hidden and weight) are those of
    `fn(hidden @ weight.T, slice(None))` when `fn` is a sum over rows; peak memory is one chunk's."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    want = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedLinearSums.apply(hidden, weight, fn, n_out, chunk, want)


def chunked_logit_sums(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    *,
    targets: torch.Tensor | None = None,
    teacher: DenseTargets | TopKTargets | LogProbTargets | None = None,
    chunk: int = 1024,
    vocab_rows: int | None = None,
    **kl,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(CE sum, KD sum) at N positions from the student's hidden states (N, Ds) and lm_head weight
    (Vs, Ds), `chunk` positions at a time: the same values and gradients as `cross_entropy_sum` and
    `divergence_sum` on whole logits (temperature, T^2 and padded rows included). `targets` (N,) gives
    the CE term, `teacher` the KD term (`kl`: kind, temperature, jsd_beta, skew_lambda); a term not
    asked for is None."""
    weight = student_weight if vocab_rows is None else student_weight[:vocab_rows]

    def per_chunk(logits: torch.Tensor, sl: slice) -> list[torch.Tensor]:
        outs = []
        if targets is not None:
            outs.append(cross_entropy_sum(logits, targets[sl], vocab_rows))
        if teacher is not None:
            outs.append(divergence_sum(logits, teacher.rows(sl), vocab_rows=vocab_rows, **kl))
        return outs

    n_out = (targets is not None) + (teacher is not None)
    if n_out == 0:
        return None, None
    sums = list(chunked_linear_sums(student_hidden, weight, per_chunk, n_out, chunk))
    ce = sums.pop(0) if targets is not None else None
    kd = sums.pop(0) if teacher is not None else None
    return ce, kd
