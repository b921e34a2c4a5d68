"""Cross-vocabulary losses (ULD, GOLD) against plain per-row references and against TRL's formula.

TRL's formula, restated from trl/experimental/gold/gold_trainer.py (huggingface/trl at
f2cd57710ae345ea6428ae95363267fcf38a3dc8), `ULDLoss._compute_distillation_loss` and
`ULDLoss._compute_hybrid_uld_loss`, per sample of n aligned positions, p = softmax(z / T):

- ULD: l1_loss(sort_desc(p_s) padded, sort_desc(p_t) padded, reduction="sum") / n
- hybrid (GOLD): w * JSD_beta(p_s[M_s], p_t[M_t]) + (1 - w) * l1_loss(sorted unmatched, "sum") / n,
  w = |M| / Vt, JSD_beta = `GOLDTrainer.generalized_jsd_loss(..., logits_are_probs=True,
  reduction="batchmean")`: log p clamped at 1e-8, beta = 0 gives KL(p_t || p_s), beta = 1
  KL(p_s || p_t), otherwise beta * KL(p_t || m) + (1 - beta) * KL(p_s || m), m = beta p_t + (1 - beta) p_s,
  summed over the matched tokens and divided by n.

lsd-edge's losses are sums over positions (the trainer divides by the batch's count), so each is
compared with n times TRL's per-sample value.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lsd_edge.distill import losses
from lsd_edge.distill.cross_vocab import (
    CrossTargets,
    VocabMap,
    cross_vocab_sum,
    gold_distance,
    uld_distance,
)
from lsd_edge.models.bpe import bpe_tokenizer, word_tokenizer

torch.manual_seed(0)

# TRL's beta of generalized_jsd_loss against lsd-edge's KL kinds (and jsd_beta)
TRL_BETA = {"forward": 0.0, "reverse": 1.0, "jsd": 0.3}


def ref_uld(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    """ULD by a loop over rows, in float64 Python lists: sort each row, pad with zeros, sum |a - b|."""
    out = []
    for rs, rt in zip(log_s.double().exp().tolist(), log_t.double().exp().tolist(), strict=True):
        a, b = sorted(rs, reverse=True), sorted(rt, reverse=True)
        width = max(len(a), len(b))
        a, b = a + [0.0] * (width - len(a)), b + [0.0] * (width - len(b))
        out.append(sum(abs(x - y) for x, y in zip(a, b, strict=True)))
    return torch.tensor(out, dtype=torch.float64)


def trl_generalized_jsd(student_probs, teacher_probs, beta: float) -> torch.Tensor:
    """GOLDTrainer.generalized_jsd_loss with logits_are_probs=True, reduction='batchmean'."""
    s_log = torch.log(student_probs.clamp_min(1e-8))
    t_log = torch.log(teacher_probs.clamp_min(1e-8))
    if beta == 0:
        jsd = F.kl_div(s_log, t_log, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t_log, s_log, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s_log.dtype)
        mix = torch.logsumexp(torch.stack([s_log + torch.log1p(-b), t_log + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(mix, t_log, reduction="none", log_target=True) + (1 - b) * F.kl_div(
            mix, s_log, reduction="none", log_target=True
        )
    return jsd.sum() / jsd.size(0)


def trl_uld(student_probs, teacher_probs) -> torch.Tensor:
    """The non-hybrid branch of ULDLoss._compute_distillation_loss for one sample."""
    s = student_probs.sort(dim=-1, descending=True).values
    t = teacher_probs.sort(dim=-1, descending=True).values
    width = max(s.size(-1), t.size(-1))
    s, t = F.pad(s, (0, width - s.size(-1))), F.pad(t, (0, width - t.size(-1)))
    return F.l1_loss(s, t, reduction="sum") / student_probs.size(0)


def trl_hybrid(student_probs, teacher_probs, t_ids, s_ids, beta: float) -> torch.Tensor:
    """ULDLoss._compute_hybrid_uld_loss with adaptive weights (uld_hybrid_matched_weight = None)."""
    matched = trl_generalized_jsd(student_probs[:, s_ids], teacher_probs[:, t_ids], beta)
    t_mask = torch.zeros(teacher_probs.size(-1), dtype=torch.bool)
    s_mask = torch.zeros(student_probs.size(-1), dtype=torch.bool)
    t_mask[t_ids], s_mask[s_ids] = True, True
    unmatched = trl_uld(student_probs[:, ~s_mask], teacher_probs[:, ~t_mask])
    w = len(t_ids) / teacher_probs.size(-1)
    return w * matched + (1 - w) * unmatched


def _logs(n=5, vs=11, vt=17, scale=2.0):
    zs, zt = torch.randn(n, vs) * scale, torch.randn(n, vt) * scale
    return zs, zt, F.log_softmax(zs.double(), -1), F.log_softmax(zt.double(), -1)


def test_uld_matches_a_loop_over_rows_and_trl():
    zs, zt, log_s, log_t = _logs()
    got = uld_distance(log_s, log_t)
    assert torch.allclose(got, ref_uld(log_s, log_t), atol=1e-12)
    n = zs.shape[0]
    trl = trl_uld(log_s.exp(), log_t.exp()) * n
    assert torch.allclose(got.sum(), trl, atol=1e-12)
    # the teacher wider or narrower than the student: padded either way
    assert torch.allclose(uld_distance(log_t, log_s), got, atol=1e-12)


def test_uld_ignores_which_token_and_is_zero_only_for_one_shape():
    _, _, log_s, _ = _logs(vs=13)
    perm = log_s[:, torch.randperm(13)]
    assert torch.allclose(uld_distance(log_s, perm), torch.zeros(log_s.shape[0], dtype=log_s.dtype))
    # extra zero-probability rows change nothing; another shape does
    wider = torch.cat([log_s, torch.full((log_s.shape[0], 4), float("-inf"), dtype=log_s.dtype)], -1)
    assert torch.allclose(uld_distance(log_s, wider), torch.zeros(log_s.shape[0], dtype=log_s.dtype))
    assert (uld_distance(log_s, F.log_softmax(2 * log_s, -1)) > 1e-3).all()


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_gold_matches_trls_hybrid_loss(kind):
    zs, zt, log_s, log_t = _logs(scale=1.0)  # no probability near TRL's 1e-8 clamp
    t_ids = torch.tensor([0, 3, 4, 9, 12])
    s_ids = torch.tensor([2, 0, 7, 1, 10])
    beta = TRL_BETA[kind]
    got = gold_distance(log_s, log_t, s_ids, t_ids, kind=kind, jsd_beta=beta if kind == "jsd" else 0.5)
    trl = trl_hybrid(log_s.exp(), log_t.exp(), t_ids, s_ids, beta) * zs.shape[0]
    assert torch.allclose(got.sum(), trl, atol=1e-9)


def test_gold_matches_a_loop_over_rows():
    _, _, log_s, log_t = _logs(n=3, vs=6, vt=8)
    t_ids, s_ids = torch.tensor([1, 5]), torch.tensor([4, 0])
    got = gold_distance(log_s, log_t, s_ids, t_ids, kind="forward")
    for r in range(3):
        ps, pt = log_s[r].exp().tolist(), log_t[r].exp().tolist()
        kl = sum(
            pt[t] * (log_t[r, t].item() - log_s[r, s].item()) for t, s in zip([1, 5], [4, 0], strict=True)
        )
        rest_s = [p for i, p in enumerate(ps) if i not in (4, 0)]
        rest_t = [p for i, p in enumerate(pt) if i not in (1, 5)]
        uld = ref_uld(
            torch.tensor([rest_s], dtype=torch.float64).log(),
            torch.tensor([rest_t], dtype=torch.float64).log(),
        ).item()
        w = 2 / 8
        assert got[r].item() == pytest.approx(w * kl + (1 - w) * uld, abs=1e-12)


def _vmap(mode="uld", vt=17, shared=((0, 0), (3, 5))):
    return VocabMap(mode, vt, torch.tensor([s for _, s in shared]), torch.tensor([t for t, _ in shared]))


@pytest.mark.parametrize("mode", ["uld", "gold"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_cross_vocab_sum_softmaxes_each_side_over_its_own_rows(mode, T):
    zs, zt, _, _ = _logs()
    vmap = _vmap(mode)
    # padded embedding rows past each tokenizer's length never enter a distribution
    zs_pad = torch.cat([zs, torch.full((zs.shape[0], 3), 50.0)], -1)
    zt_pad = torch.cat([zt, torch.full((zt.shape[0], 7), 50.0)], -1)
    got = cross_vocab_sum(zs_pad, zt_pad, vmap, temperature=T, vocab_rows=11)
    log_s, log_t = F.log_softmax(zs.double() / T, -1), F.log_softmax(zt.double() / T, -1)
    if mode == "uld":
        want = ref_uld(log_s, log_t).sum()
    else:
        want = gold_distance(log_s, log_t, vmap.shared_student, vmap.shared_teacher).sum()
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    assert cross_vocab_sum(zs[:0], zt[:0], vmap).item() == 0.0


@pytest.mark.parametrize("mode", ["uld", "gold"])
def test_cross_targets_through_the_chunked_path_match_whole_logits(mode):
    hs = torch.randn(9, 8, requires_grad=True)
    ws = torch.randn(13, 8, requires_grad=True)
    th, tw = torch.randn(9, 6), torch.randn(19, 6)
    target = CrossTargets(losses.DenseTargets(th, tw), _vmap(mode, vt=17))

    def chunked():
        return losses.chunked_logit_sums(hs, ws, teacher=target, chunk=4, vocab_rows=11, temperature=1.5)[1]

    def plain():
        return losses.divergence_sum(hs @ ws.T, target, vocab_rows=11, temperature=1.5)

    a = chunked()
    ga = torch.autograd.grad(a, [hs, ws])
    b = plain()
    gb = torch.autograd.grad(b, [hs, ws])
    assert torch.allclose(a, b, atol=1e-5)
    for x, y in zip(ga, gb, strict=True):
        assert torch.allclose(x, y, atol=1e-5)
    # a pooled visual target (log-probs over the teacher's rows) is read as it is
    logp = F.log_softmax(th @ tw[:17].T / 1.5, -1)
    pooled = CrossTargets(losses.LogProbTargets(logp), _vmap(mode, vt=17))
    c = losses.divergence_sum(hs @ ws.T, pooled, vocab_rows=11, temperature=1.5)
    assert torch.allclose(c, b, atol=1e-5)


def test_vocab_map_pairs_the_tokens_both_vocabularies_hold():
    texts = ["red circle left", "blue square"]
    bpe, word = bpe_tokenizer(texts), word_tokenizer(texts)
    vmap = VocabMap.between(bpe, word, "gold")
    assert vmap.teacher_rows == len(bpe)
    tv, sv = bpe.get_vocab(), word.get_vocab()
    pairs = set(zip(vmap.shared_teacher.tolist(), vmap.shared_student.tolist(), strict=True))
    assert pairs == {(tv[t], sv[t]) for t in set(tv) & set(sv)}
    assert (tv["<image>"], sv["<image>"]) in pairs and "Ġred" in tv and "Ġred" not in sv
