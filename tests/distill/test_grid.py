"""Unequal visual grids: P against counted areas, each pooled term against a plain loop reference in
float64, equal grids giving today's terms bit for bit, and gradients on the student side only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lsd_edge.distill import grid, losses

KINDS = ["forward", "reverse", "jsd", "skew"]
SHAPES = [((27, 27), (12, 12)), ((4, 4), (2, 2)), ((4, 4), (3, 3)), ((3, 5), (2, 2)), ((2, 3), (5, 4))]


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def rasterized_overlap(teacher_grid, student_grid):
    """Brute force: paint both grids on a common (Hs*Ht) x (Ws*Wt) raster, whose lines include every
    cell edge of both, and count the raster cells each (student, teacher) pair of cells shares."""
    (ht, wt), (hs, ws) = teacher_grid, student_grid
    counts = torch.zeros(hs * ws, ht * wt, dtype=torch.float64)
    for y in range(hs * ht):
        for x in range(ws * wt):
            student = (y // ht) * ws + x // wt  # a student row is Ht raster rows high
            teacher = (y // hs) * wt + x // ws
            counts[student, teacher] += 1
    return counts / counts.sum(-1, keepdim=True)


@pytest.mark.parametrize(("teacher_grid", "student_grid"), SHAPES)
def test_overlap_matrix_is_the_area_fraction(teacher_grid, student_grid):
    p = grid.overlap_matrix(teacher_grid, student_grid, dtype=torch.float64)
    assert p.shape == (student_grid[0] * student_grid[1], teacher_grid[0] * teacher_grid[1])
    assert torch.allclose(p, rasterized_overlap(teacher_grid, student_grid), rtol=0, atol=1e-12)
    assert torch.allclose(p.sum(-1), torch.ones(p.shape[0], dtype=torch.float64), rtol=0, atol=1e-12)
    p32 = grid.overlap_matrix(teacher_grid, student_grid)
    assert p32.dtype == torch.float32 and torch.allclose(p32.sum(-1), torch.ones(p.shape[0]), atol=1e-6)


def test_overlap_matrix_known_values_and_identity():
    # 4 x 4 -> 2 x 2: each student cell is the mean of a 2 x 2 block, numbered row-major
    p = grid.overlap_matrix((4, 4), (2, 2))
    assert torch.equal(
        p[1].view(4, 4), torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0.0]]) / 4
    )
    for g in [(1, 1), (5, 7), (27, 27)]:
        assert torch.equal(grid.overlap_matrix(g, g), torch.eye(g[0] * g[1]))
    with pytest.raises(ValueError, match="positive sizes"):
        grid.overlap_matrix((0, 3), (2, 2))


# ------------------------------------------------------------------------------------ plain references


def ref_kl(p, q):
    return (p * (p.log() - q.log())).sum(-1)


def ref_pooled_divergence(s, t, p, kind, T=1.0, beta=0.5, lam=0.1):
    """float64, loop by loop: each student position against the probability mixture of the teacher's
    distributions, weighted by P. s (I*Ks, V), t (I*Kt, V)."""
    ks, kt = p.shape
    total = 0.0
    for img in range(s.shape[0] // ks):
        pt_all = torch.softmax(t[img * kt : (img + 1) * kt].double() / T, -1)
        for i in range(ks):
            mix = sum(p[i, j].double() * pt_all[j] for j in range(kt))
            ps = torch.softmax(s[img * ks + i].double() / T, -1)
            if kind == "forward":
                d = ref_kl(mix, ps)
            elif kind == "reverse":
                d = ref_kl(ps, mix)
            elif kind == "jsd":
                m = beta * mix + (1 - beta) * ps
                d = beta * ref_kl(mix, m) + (1 - beta) * ref_kl(ps, m)
            else:
                d = ref_kl(mix, lam * mix + (1 - lam) * ps)
            total = total + d * T * T
    return total


def ref_pool(t, p):
    """(I, Kt, D) -> (I, Ks, D) float64: sum_j P_ij t_j by loops."""
    ks, kt = p.shape
    out = torch.zeros(t.shape[0], ks, t.shape[-1], dtype=torch.float64)
    for img in range(t.shape[0]):
        for i in range(ks):
            for j in range(kt):
                out[img, i] += p[i, j].double() * t[img, j].double()
    return out


def ref_relation(s, t):
    total = 0.0
    for si, ti in zip(s.double(), t.double(), strict=True):
        sn = si / si.norm(dim=-1, keepdim=True)
        tn = ti / ti.norm(dim=-1, keepdim=True)
        rs, rt = (sn @ sn.T).flatten(), (tn @ tn.T).flatten()
        total = total + 1 - (rs @ rt) / (rs.norm() * rt.norm())
    return total


def _visual(n_img=2, teacher_grid=(4, 4), student_grid=(3, 3), v=13, pad=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = grid.overlap_matrix(teacher_grid, student_grid)
    ks, kt = p.shape
    s = torch.randn(n_img * ks, v + pad, generator=g, requires_grad=True)
    t = torch.randn(n_img * kt, v + pad + 2, generator=g) * 2
    return p, s, t


# -------------------------------------------------------------------------------------------- visual KL


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_pooled_divergence_matches_loop_reference_values_and_grads(kind, T):
    p, s, t = _visual()
    rows = 13
    got = grid.pooled_divergence_sum(s, t, p, kind=kind, temperature=T, vocab_rows=rows)
    s64 = s.detach().double()[:, :rows].requires_grad_(True)
    want = ref_pooled_divergence(s64, t[:, :rows], p, kind, T)
    assert _rel(got.detach(), want.detach()) <= 1e-5
    got.backward()
    want.backward()
    assert _rel(s.grad[:, :rows], s64.grad) <= 1e-4
    assert torch.all(s.grad[:, rows:] == 0), "padded rows get no gradient"


@pytest.mark.parametrize(("teacher_grid", "student_grid"), [((4, 4), (2, 2)), ((3, 5), (2, 2))])
def test_pooled_divergence_takes_logits_dense_targets_or_log_probs(teacher_grid, student_grid):
    p, s, t = _visual(teacher_grid=teacher_grid, student_grid=student_grid)
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(t.shape[0], 6, generator=g), torch.randn(18, 6, generator=g)
    kw = dict(kind="jsd", temperature=1.5, vocab_rows=13)
    from_logits = grid.pooled_divergence_sum(s, F.linear(hidden, weight), p, **kw)
    from_dense = grid.pooled_divergence_sum(s, losses.DenseTargets(hidden, weight), p, **kw)
    log_t = losses.log_probs(F.linear(hidden, weight), 1.5, 13)
    from_logp = grid.pooled_divergence_sum(s, losses.LogProbTargets(log_t), p, **kw)
    assert _rel(from_dense, from_logits) <= 1e-6 and _rel(from_logp, from_logits) <= 1e-6
    want = ref_pooled_divergence(s.detach()[:, :13], F.linear(hidden, weight)[:, :13], p, "jsd", 1.5)
    assert _rel(from_logits.detach(), want) <= 1e-5


def test_pooled_targets_stay_finite_where_probabilities_underflow():
    """Teacher log-probs far below fp32's smallest normal: mixing in log space keeps them."""
    p, s, t = _visual(v=9, pad=0)
    t = t[:, :9] * 100  # gaps of hundreds of nats
    pooled = grid.pooled_log_probs(t, p)
    assert torch.isfinite(pooled).all() and pooled.min() < -200
    for kind in KINDS:
        assert torch.isfinite(grid.pooled_divergence_sum(s[:, :9], t, p, kind=kind))


def test_pooled_top_k_cache_path_and_refusal():
    """A cache stores the top-k of the pooled log-probs; with k = V it is the dense pooled term."""
    p, s, t = _visual()
    kw = dict(kind="forward", temperature=2.0, vocab_rows=13)
    pooled = grid.pooled_log_probs(t, p, temperature=2.0, vocab_rows=13)
    assert torch.allclose(pooled.double().exp().sum(-1), torch.ones(pooled.shape[0], dtype=torch.float64))
    cached = losses.top_k_of_log_probs(pooled, 13)
    dense = grid.pooled_divergence_sum(s, t, p, **kw)
    assert _rel(losses.divergence_sum(s, cached, **kw), dense) <= 1e-5
    with pytest.raises(ValueError, match="pool the teacher's log-probs when the cache is built"):
        grid.pooled_divergence_sum(s, losses.top_k_of_log_probs(pooled, 4), p, **kw)


def test_chunked_path_takes_pooled_log_prob_targets():
    """The chunked logit path reads LogProbTargets like the others: same values and gradients."""
    g = torch.Generator().manual_seed(5)
    p = grid.overlap_matrix((4, 4), (3, 3))
    hs = torch.randn(18, 8, generator=g, requires_grad=True)
    ws = torch.randn(16, 8, generator=g, requires_grad=True)
    target = losses.LogProbTargets(grid.pooled_log_probs(torch.randn(32, 16, generator=g), p, vocab_rows=13))
    kw = dict(kind="skew", vocab_rows=13)
    plain = losses.divergence_sum(F.linear(hs, ws), target, **kw)
    g_plain = torch.autograd.grad(plain, (hs, ws))
    chunked = losses.chunked_logit_sums(hs, ws, teacher=target, chunk=4, **kw)[1]
    g_chunked = torch.autograd.grad(chunked, (hs, ws))
    assert _rel(chunked, plain) <= 1e-5
    assert all(_rel(a, b) <= 1e-5 for a, b in zip(g_chunked, g_plain, strict=True))


# ---------------------------------------------------------------------------------- RDist and latents


@pytest.mark.parametrize(("teacher_grid", "student_grid"), SHAPES[1:])
def test_pooled_relation_matches_loop_reference(teacher_grid, student_grid):
    p = grid.overlap_matrix(teacher_grid, student_grid)
    ks, kt = p.shape
    s = torch.randn(3, ks, 8, requires_grad=True)
    t = torch.randn(3, kt, 16)
    got = grid.pooled_relation_sum(s, t, p)
    want_fn = lambda x: ref_relation(x, ref_pool(t, p))  # noqa: E731
    assert _rel(got.detach(), want_fn(s.detach())) <= 1e-5
    got.backward()
    s64 = s.detach().double().requires_grad_(True)
    want_fn(s64).backward()
    assert _rel(s.grad, s64.grad) <= 1e-3
    cached = losses.relation_sum_to(s.detach(), grid.pooled_relation_matrix(t, p))
    assert _rel(cached, got.detach()) <= 1e-6
    assert grid.pooled_relation_sum(torch.zeros(0, ks, 8), torch.zeros(0, kt, 16), p).item() == 0.0


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_pooled_features_and_latent_match_loop_reference(kind):
    p = grid.overlap_matrix((4, 4), (3, 3))
    t = torch.randn(2, 16, 6, dtype=torch.float64)
    pooled = grid.pool_features(t.float(), p)
    assert pooled.shape == (2, 9, 6) and _rel(pooled, ref_pool(t, p)) <= 1e-6
    s = torch.randn(2, 9, 6, dtype=torch.float64)
    got = grid.pooled_latent_sum(s.float(), t.float(), p, kind)
    ref_t = ref_pool(t, p)
    if kind == "mse":
        want = ((s - ref_t) ** 2).mean(-1).sum()
    else:
        want = (1 - (s * ref_t).sum(-1) / (s.norm(dim=-1) * ref_t.norm(dim=-1))).sum()
    assert _rel(got, want) <= 1e-5
    assert grid.pooled_latent_sum(torch.zeros(0, 9, 6), torch.zeros(0, 16, 6), p).item() == 0.0


def test_vision_tower_term_through_a_projection():
    """The vision-tower feature term: the student tower's features through the caller's nn.Linear to the
    teacher tower's width, against the pooled teacher tower features; the projection and the student
    features get gradients."""
    torch.manual_seed(0)
    p = grid.overlap_matrix((6, 6), (4, 4))
    proj = torch.nn.Linear(5, 7)
    s = torch.randn(2, 16, 5, requires_grad=True)
    t = torch.randn(2, 36, 7)
    got = grid.pooled_latent_sum(proj(s), t, p, "mse")
    want = ((proj(s).detach().double() - ref_pool(t, p)) ** 2).mean(-1).sum()
    assert _rel(got.detach(), want) <= 1e-5
    got.backward()
    assert s.grad.abs().sum() > 0 and proj.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------- equal grids: today's


@pytest.mark.parametrize("kind", KINDS)
def test_equal_grids_give_todays_terms_exactly(kind):
    g = torch.Generator().manual_seed(2)
    p = grid.overlap_matrix((3, 4), (3, 4))
    s = torch.randn(2 * 12, 16, generator=g)
    hidden, weight = torch.randn(2 * 12, 6, generator=g), torch.randn(18, 6, generator=g)
    kw = dict(kind=kind, temperature=2.0, vocab_rows=13)
    dense = losses.DenseTargets(hidden, weight)
    assert torch.equal(grid.pooled_divergence_sum(s, dense, p, **kw), losses.divergence_sum(s, dense, **kw))
    logits = F.linear(hidden, weight)
    assert torch.equal(
        grid.pooled_divergence_sum(s, logits, p, kind=kind), losses.kd_sum(s, logits, kind=kind)
    )
    top = losses.top_k_targets(logits, 5, 2.0, 13)
    assert torch.equal(grid.pooled_divergence_sum(s, top, p, **kw), losses.divergence_sum(s, top, **kw))
    assert torch.equal(
        losses.divergence_sum(
            s,
            losses.top_k_of_log_probs(grid.pooled_log_probs(logits, p, temperature=2.0, vocab_rows=13), 5),
            **kw,
        ),
        losses.divergence_sum(s, top, **kw),
    )

    sv, tv = torch.randn(2, 12, 8, generator=g), torch.randn(2, 12, 10, generator=g)
    assert torch.equal(grid.pooled_relation_sum(sv, tv, p), losses.relation_sum(sv, tv))
    assert torch.equal(grid.pooled_relation_matrix(tv, p), losses.relation_matrix(tv))
    tl = torch.randn(2, 12, 8, generator=g)
    for latent in ("mse", "cosine"):
        assert torch.equal(
            grid.pooled_latent_sum(sv, tl, p, latent),
            losses.latent_sum(sv.flatten(0, 1), tl.flatten(0, 1), latent),
        )


# -------------------------------------------------------------------------------- student side only


def test_gradients_reach_the_student_only():
    p = grid.overlap_matrix((4, 4), (2, 2))
    s_logits = torch.randn(2 * 4, 11, requires_grad=True)
    t_logits = torch.randn(2 * 16, 11, requires_grad=True)
    s_tok = torch.randn(2, 4, 8, requires_grad=True)
    t_tok = torch.randn(2, 16, 8, requires_grad=True)
    total = (
        grid.pooled_divergence_sum(s_logits, t_logits, p, kind="jsd")
        + grid.pooled_relation_sum(s_tok, t_tok, p)
        + grid.pooled_latent_sum(s_tok, t_tok, p, "mse")
    )
    total.backward()
    assert s_logits.grad.abs().sum() > 0 and s_tok.grad.abs().sum() > 0
    assert t_logits.grad is None and t_tok.grad is None
    assert not grid.pool_features(t_tok, p).requires_grad
    assert not grid.pooled_log_probs(t_logits, p).requires_grad


def test_shape_mismatches_are_named():
    p = grid.overlap_matrix((4, 4), (2, 2))
    with pytest.raises(ValueError, match="not a whole number of images of 16 positions"):
        grid.pooled_log_probs(torch.randn(20, 5), p)
    with pytest.raises(ValueError, match="8 student visual rows against 4 pooled ones"):
        grid.pooled_divergence_sum(torch.randn(8, 5), torch.randn(16, 5), p)
    with pytest.raises(ValueError, match="12 positions per image, P maps 16"):
        grid.pool_features(torch.randn(1, 12, 3), p)
