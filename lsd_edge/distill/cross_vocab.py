"""Logit distillation between two vocabularies (a student LLM with another tokenizer), as pure functions.

A teacher and a student with other tokenizers have next-token distributions over different sets of
tokens, so a KL between them is undefined. Two losses compare them anyway (`loss.cross_tokenizer`):

- `uld`: Universal Logit Distillation (Boizard et al., 2024, "Towards Cross-Tokenizer Distillation:
  the Universal Logit Distillation Loss for LLMs"). Both distributions sorted by probability, the
  shorter padded with zeros, and compared by their L1 distance, the closed form the paper gives of
  the Wasserstein-1 distance between them under a uniform transport cost:
  ULD(p_t, p_s) = sum_k |sort(p_s)_k - sort(p_t)_k|. It asks the student for the teacher's *shape*
  (how peaked, how much tail), not for which token: no token is matched.
- `gold`: TRL's GOLD trainer (trl/experimental/gold/gold_trainer.py, `ULDLoss` with
  `uld_use_hybrid_loss`): the tokens both vocabularies hold (the same string) are compared token by
  token with the stage's divergence, ULD on the rest, weighted by the share of the teacher's
  vocabulary that is matched, w = |M| / Vt:
  GOLD = w * D(p_t[M_t], p_s[M_s]) + (1 - w) * ULD(p_t[not M_t], p_s[not M_s]).
  D is taken on the matched probabilities as they are (not renormalised), as TRL does.

Both sides are soft-maxed in fp32 at the stage's temperature, each over its own tokenizer's rows
(`vocab_rows` for the student, `VocabMap.teacher_rows` for the teacher). Unlike the KL terms there
is no T^2 factor: ULD is an L1 distance of probabilities (neither the paper nor TRL scales it).
Each function returns a sum over the positions given, as `lsd_edge.distill.losses` does.

Shapes: N positions, Vs student rows, Vt teacher rows, M shared tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lsd_edge.distill.losses import DenseTargets, LogProbTargets, divergence, log_probs


def uld_distance(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    """ULD per position: (N, Vs) and (N, Vt) log-probabilities -> (N,) sum_k |sort(p_s)_k - sort(p_t)_k|,
    both sorted in descending order and the narrower padded with zeros to the wider's width."""
    p_s = log_s.exp().sort(dim=-1, descending=True).values
    p_t = log_t.exp().sort(dim=-1, descending=True).values
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s = F.pad(p_s, (0, width - p_s.shape[-1]))
    p_t = F.pad(p_t, (0, width - p_t.shape[-1]))
    return (p_s - p_t).abs().sum(-1)


def gold_distance(
    log_s: torch.Tensor,
    log_t: torch.Tensor,
    shared_s: torch.Tensor,
    shared_t: torch.Tensor,
    *,
    kind: str = "forward",
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
) -> torch.Tensor:
    """GOLD per position: (N, Vs) and (N, Vt) log-probabilities, the M shared tokens' ids on each side
    (`shared_s`, `shared_t`, pairwise) -> (N,) w * D(p_t[M_t], p_s[M_s]) + (1 - w) * ULD(rest), w = M / Vt.

    D is the stage's divergence (`kind`: forward KL(p_t || p_s), reverse, jsd with `jsd_beta`, skew with
    `skew_lambda`; `losses.distill_divergence`) on the matched probabilities as they are; the rest is
    every row of each side outside its matched ones."""
    w = shared_t.numel() / log_t.shape[-1]
    matched = divergence(log_s[:, shared_s], log_t[:, shared_t], kind, jsd_beta, skew_lambda)
    rest_s = torch.ones(log_s.shape[-1], dtype=torch.bool, device=log_s.device)
    rest_t = torch.ones(log_t.shape[-1], dtype=torch.bool, device=log_t.device)
    rest_s[shared_s] = False
    rest_t[shared_t] = False
    return w * matched + (1.0 - w) * uld_distance(log_s[:, rest_s], log_t[:, rest_t])


@dataclass(frozen=True)
class VocabMap:
    """How two vocabularies meet for one stage: the loss (`mode`: uld or gold), the teacher's rows,
    and the tokens both hold (the same string, within both sides' rows), paired by id (M,)."""

    mode: str
    teacher_rows: int
    shared_student: torch.Tensor
    shared_teacher: torch.Tensor

    @staticmethod
    def between(teacher_tok, student_tok, mode: str) -> VocabMap:
        """The map of two tokenizers, each over its own rows (`len(tokenizer)`)."""
        tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
        t_rows, s_rows = len(teacher_tok), len(student_tok)
        pairs = sorted(
            (tv[tok], sv[tok]) for tok in set(tv) & set(sv) if tv[tok] < t_rows and sv[tok] < s_rows
        )
        t_ids = torch.tensor([t for t, _ in pairs], dtype=torch.long)
        s_ids = torch.tensor([s for _, s in pairs], dtype=torch.long)
        return VocabMap(mode, t_rows, s_ids, t_ids)

    def wrap(self, target: DenseTargets | LogProbTargets) -> CrossTargets:
        return CrossTargets(target, self)


def cross_vocab_sum(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | DenseTargets | LogProbTargets,
    vmap: VocabMap,
    *,
    temperature: float = 1.0,
    vocab_rows: int | None = None,
    **divergence_kw,
) -> torch.Tensor:
    """L_res / L_vis across vocabularies, summed over positions: `uld_distance` or `gold_distance`
    (`vmap.mode`) between softmax(z_s / T) over the student's `vocab_rows` rows and the teacher's at T
    over its `vmap.teacher_rows` rows. `teacher`: logits (N, Vt'), `DenseTargets`, or `LogProbTargets`
    (log-probs at T over the teacher's rows already: a mixture pooled onto the student's grid).
    `divergence_kw` (kind, jsd_beta, skew_lambda) is GOLD's divergence on the matched tokens."""
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    log_s = log_probs(student_logits, temperature, vocab_rows)
    if isinstance(teacher, LogProbTargets):
        log_t = teacher.logp.float()
    else:
        logits = teacher.logits(vmap.teacher_rows) if isinstance(teacher, DenseTargets) else teacher
        log_t = log_probs(logits.detach(), temperature, vmap.teacher_rows)
    if vmap.mode == "uld":
        return uld_distance(log_s, log_t).sum()
    if vmap.mode == "gold":
        dev = log_s.device
        shared = vmap.shared_student.to(dev), vmap.shared_teacher.to(dev)
        return gold_distance(log_s, log_t, *shared, **divergence_kw).sum()
    raise ValueError(f"unknown cross-tokenizer loss '{vmap.mode}'")


@dataclass(frozen=True)
class CrossTargets:
    """Teacher targets over another vocabulary than the student's: scored by `cross_vocab_sum`
    wherever a logit loss meets them (`losses.divergence_sum`, the chunked path too)."""

    target: DenseTargets | LogProbTargets
    vmap: VocabMap

    def __len__(self) -> int:
        return len(self.target)

    def rows(self, sl: slice) -> CrossTargets:
        return CrossTargets(self.target.rows(sl), self.vmap)

    def divergence_sum(self, student_logits: torch.Tensor, **kw) -> torch.Tensor:
        return cross_vocab_sum(student_logits, self.target, self.vmap, **kw)
