"""Losses against plain float64 references: values, gradients, zero at equality, masks, padded rows."""

from __future__ import annotations

import math

import pytest
import torch

from lsd_edge.distill import losses

torch.manual_seed(0)


def ref_divergence(s, t, kind, T=1.0, beta=0.5, lam=0.1):
    """Loop-free but plain float64 reference, written from the formulas in METHOD.md."""
    s, t = s.double() / T, t.double() / T
    ps, pt = torch.softmax(s, -1), torch.softmax(t, -1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if kind == "forward":
        d = kl(pt, ps)
    elif kind == "reverse":
        d = kl(ps, pt)
    elif kind == "jsd":
        m = beta * pt + (1 - beta) * ps
        d = beta * kl(pt, m) + (1 - beta) * kl(ps, m)
    else:
        d = kl(pt, lam * pt + (1 - lam) * ps)
    return d * T * T


KINDS = ["forward", "reverse", "jsd", "skew"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_divergence_matches_reference_values_and_grads(kind, T):
    s = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randn(7, 11, dtype=torch.float64)
    got = losses.kd_sum(s.float(), t.float(), kind=kind, temperature=T)
    want = ref_divergence(s, t, kind, T).sum()
    assert math.isclose(got.item(), want.item(), rel_tol=1e-5)
    s32 = s.detach().float().requires_grad_(True)
    losses.kd_sum(s32, t.float(), kind=kind, temperature=T).backward()
    s64 = s.detach().clone().requires_grad_(True)
    ref_divergence(s64, t, kind, T).sum().backward()
    assert torch.allclose(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_divergence_zero_when_equal(kind):
    x = torch.randn(5, 9)
    assert losses.kd_sum(x, x.clone(), kind=kind, temperature=1.5).abs().item() < 1e-6


def test_padded_vocab_rows_ignored():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    s_pad = torch.cat([s, torch.full((4, 6), 50.0)], -1)  # junk in padded rows
    t_pad = torch.cat([t, torch.randn(4, 3)], -1)  # teacher padded differently
    a = losses.kd_sum(s, t)
    b = losses.kd_sum(s_pad, t_pad, vocab_rows=10)
    assert torch.allclose(a, b)
    targets = torch.tensor([1, 2, 3, 4])
    assert torch.allclose(
        losses.cross_entropy_sum(s_pad, targets, vocab_rows=10), losses.cross_entropy_sum(s, targets)
    )


def test_temperature_scaling_is_t_squared():
    s, t = torch.randn(3, 8), torch.randn(3, 8)
    T = 3.0
    got = losses.kd_sum(s, t, temperature=T)
    want = ref_divergence(s / T, t / T, "forward", 1.0).sum() * T * T
    assert math.isclose(got.item(), want.item(), rel_tol=1e-5)


def test_cross_entropy_reference_and_mask():
    logits = torch.randn(6, 12, dtype=torch.float64)
    targets = torch.tensor([3, -100, 0, 11, -100, 5])
    got = losses.cross_entropy_sum(logits.float(), targets)
    valid = targets != -100
    want = -torch.log_softmax(logits[valid], -1).gather(-1, targets[valid, None]).sum()
    assert math.isclose(got.item(), want.item(), rel_tol=1e-5)
    # masked rows truly ignored: changing them changes nothing, and they get no gradient
    lg = logits.float().clone().requires_grad_(True)
    losses.cross_entropy_sum(lg, targets).backward()
    assert (lg.grad[~valid] == 0).all() and (lg.grad[valid] != 0).any()
    lg2 = logits.float().clone()
    lg2[~valid] = 1e4
    assert math.isclose(losses.cross_entropy_sum(lg2, targets).item(), got.item(), rel_tol=1e-6)
    assert losses.cross_entropy_sum(logits.float(), torch.full((6,), -100)).item() == 0.0


def ref_relation(s, t):
    out = 0.0
    for si, ti in zip(s.double(), t.double(), strict=True):
        sn = si / si.norm(dim=-1, keepdim=True)
        tn = ti / ti.norm(dim=-1, keepdim=True)
        rs, rt = (sn @ sn.T).flatten(), (tn @ tn.T).flatten()
        out = out + 1 - (rs @ rt) / (rs.norm() * rt.norm())
    return out


def test_relation_matches_reference_across_widths():
    s = torch.randn(3, 5, 8, requires_grad=True)
    t = torch.randn(3, 5, 16)
    got = losses.relation_sum(s, t)
    assert math.isclose(got.item(), ref_relation(s.detach(), t).item(), rel_tol=1e-5)
    got.backward()
    s64 = s.detach().double().requires_grad_(True)
    ref_relation(s64, t).backward()
    assert torch.allclose(s.grad.double(), s64.grad, rtol=1e-3, atol=1e-6)


def test_relation_zero_when_same_geometry():
    t = torch.randn(2, 6, 16)
    rot, _ = torch.linalg.qr(torch.randn(16, 16))
    assert losses.relation_sum(t @ rot, t).abs().item() < 1e-5  # a rotation keeps every cosine
    assert losses.relation_sum(torch.zeros(0, 6, 8), torch.zeros(0, 6, 16)).item() == 0.0


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_latent_matches_reference(kind):
    s = torch.randn(9, 6, dtype=torch.float64)
    t = torch.randn(9, 6, dtype=torch.float64)
    got = losses.latent_sum(s.float(), t.float(), kind)
    if kind == "mse":
        want = ((s - t) ** 2).mean(-1).sum()
    else:
        want = (1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))).sum()
    assert math.isclose(got.item(), want.item(), rel_tol=1e-5)
    assert losses.latent_sum(t.float(), t.float(), kind).abs().item() < 1e-5


def test_softmax_in_fp32_for_half_inputs():
    s = torch.randn(4, 32).to(torch.bfloat16)
    t = torch.randn(4, 32).to(torch.bfloat16)
    got = losses.kd_sum(s, t)
    assert got.dtype == torch.float32
    assert math.isclose(
        got.item(), ref_divergence(s.float(), t.float(), "forward").sum().item(), rel_tol=1e-4
    )


def test_empty_positions_give_zero_with_grad():
    s = torch.zeros(0, 5, requires_grad=True)
    out = losses.kd_sum(s, torch.zeros(0, 5))
    assert out.item() == 0.0
    out.backward()


# ------------------------------------------------------------------ chunked and top-k (cached) paths

import torch.nn.functional as F  # noqa: E402


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _inputs(n=23, ds=8, dt=12, rows=19, pad_s=5, pad_t=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, ds, generator=g, requires_grad=True)
    ws = torch.randn(rows + pad_s, ds, generator=g).requires_grad_(True)
    with torch.no_grad():
        ws[rows:] = 30.0  # junk padded rows: must never enter a distribution
    ht = torch.randn(n, dt, generator=g)
    wt = torch.randn(rows + pad_t, dt, generator=g) * 2
    targets = torch.randint(0, rows, (n,), generator=g)
    targets[[1, 7]] = -100
    return hs, ws, ht, wt, targets


def _grads(fn, hs, ws):
    hs.grad = ws.grad = None
    value = fn()
    value.backward()
    return value.detach(), hs.grad.clone(), ws.grad.clone()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_chunked_matches_plain_values_and_grads(kind, T):
    """CE + KD from hidden states chunk by chunk == from whole logits: values and both gradients, with
    temperature, padded rows and any weighting of the two terms afterwards (fp32, rel <= 1e-5)."""
    hs, ws, ht, wt, targets = _inputs()
    rows = 19
    kw = dict(kind=kind, temperature=T, vocab_rows=rows)

    def plain():
        logits = F.linear(hs, ws)
        ce = losses.cross_entropy_sum(logits, targets, rows)
        kd = losses.kd_sum(logits, F.linear(ht, wt), **kw)
        return 0.3 * ce / 21 + 1.7 * kd / 23

    def chunked():
        ce, kd = losses.chunked_logit_sums(
            hs, ws, targets=targets, teacher=losses.DenseTargets(ht, wt), chunk=5, **kw
        )
        return 0.3 * ce / 21 + 1.7 * kd / 23

    for a, b in zip(_grads(chunked, hs, ws), _grads(plain, hs, ws), strict=True):
        assert _rel(a, b) <= 1e-5
    assert torch.all(ws.grad[rows:] == 0), "padded rows get no gradient"


def test_chunked_single_terms_and_chunk_sizes():
    hs, ws, ht, wt, targets = _inputs(n=17)
    want_ce = _grads(lambda: losses.cross_entropy_sum(F.linear(hs, ws), targets, 19), hs, ws)
    want_kd = _grads(lambda: losses.kd_sum(F.linear(hs, ws), F.linear(ht, wt), vocab_rows=19), hs, ws)
    for chunk in (1, 4, 17, 100):
        ce, kd = losses.chunked_logit_sums(
            hs.detach(), ws.detach(), targets=targets, chunk=chunk, vocab_rows=19
        )
        assert kd is None
        got = _grads(
            lambda c=chunk: losses.chunked_logit_sums(hs, ws, targets=targets, chunk=c, vocab_rows=19)[0],
            hs,
            ws,
        )
        assert all(_rel(a, b) <= 1e-5 for a, b in zip(got, want_ce, strict=True))
        got = _grads(
            lambda c=chunk: losses.chunked_logit_sums(
                hs, ws, teacher=losses.DenseTargets(ht, wt), chunk=c, vocab_rows=19
            )[1],
            hs,
            ws,
        )
        assert all(_rel(a, b) <= 1e-5 for a, b in zip(got, want_kd, strict=True))


def test_chunked_empty_no_grad_and_one_backward():
    ws = torch.randn(7, 4, requires_grad=True)
    hs = torch.zeros(0, 4, requires_grad=True)
    ce, kd = losses.chunked_logit_sums(
        hs,
        ws,
        targets=torch.zeros(0, dtype=torch.long),
        teacher=losses.DenseTargets(torch.zeros(0, 3), torch.randn(7, 3)),
    )
    assert ce.item() == 0.0 and kd.item() == 0.0
    (ce + kd).backward()
    assert ws.grad.abs().sum().item() == 0.0
    hs = torch.randn(5, 4, requires_grad=True)
    with torch.no_grad():
        ce, _ = losses.chunked_logit_sums(hs, ws, targets=torch.tensor([1, 2, 3, 4, 5]), chunk=2)
    assert not ce.requires_grad
    ce, _ = losses.chunked_logit_sums(hs, ws, targets=torch.tensor([1, 2, 3, 4, 5]), chunk=2)
    ce.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        ce.backward()


def ref_bucket_divergence(s_logits, ids, t_logits, kind, T, beta=0.5, lam=0.1):
    """float64 reference: both distributions lumped into the teacher's top-k ids + one tail bucket."""
    ps, pt = torch.softmax(s_logits.double() / T, -1), torch.softmax(t_logits.double() / T, -1)
    mask = torch.zeros_like(ps, dtype=torch.bool).scatter(-1, ids, True)
    bs = torch.cat([ps.gather(-1, ids), (ps * ~mask).sum(-1, keepdim=True)], -1)
    bt = torch.cat([pt.gather(-1, ids), (pt * ~mask).sum(-1, keepdim=True)], -1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if kind == "forward":
        d = kl(bt, bs)
    elif kind == "reverse":
        d = kl(bs, bt)
    elif kind == "jsd":
        m = beta * bt + (1 - beta) * bs
        d = beta * kl(bt, m) + (1 - beta) * kl(bs, m)
    else:
        d = kl(bt, lam * bt + (1 - lam) * bs)
    return (d * T * T).sum()


def test_top_k_targets_are_a_proper_distribution():
    t = torch.randn(6, 30) * 3
    tk = losses.top_k_targets(t, 5, temperature=2.0)
    full = torch.log_softmax(t.double() / 2.0, -1)
    assert torch.equal(tk.ids, full.topk(5, -1).indices)
    assert torch.allclose(tk.logp.double(), full.topk(5, -1).values, atol=1e-6)
    total = tk.logp.double().exp().sum(-1) + tk.tail.double().exp()
    assert torch.allclose(total, torch.ones(6, dtype=torch.float64), atol=1e-6)
    assert torch.isinf(losses.top_k_targets(t, 99).tail).all(), "k >= V: no tail bucket"


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_kd_matches_bucket_reference_and_dense_at_full_k(kind):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(9, 26, generator=g, requires_grad=True)
    t = torch.randn(9, 26, generator=g) * 2
    T = 1.5
    target = losses.top_k_targets(t, 4, T, vocab_rows=20)
    got = losses.sparse_kd_sum(s, target, kind=kind, temperature=T, vocab_rows=20)
    s64 = s.detach().double()[:, :20].requires_grad_(True)
    want = ref_bucket_divergence(s64, target.ids, t[:, :20], kind, T)
    assert _rel(got.detach(), want.detach()) <= 1e-5
    got.backward()
    want.backward()
    assert _rel(s.grad[:, :20], s64.grad) <= 1e-4 and torch.all(s.grad[:, 20:] == 0)
    # with k covering every row the buckets are the whole distribution: the dense divergence
    full = losses.top_k_targets(t, 20, T, vocab_rows=20)
    dense = losses.kd_sum(s, t, kind=kind, temperature=T, vocab_rows=20)
    assert _rel(losses.sparse_kd_sum(s, full, kind=kind, temperature=T, vocab_rows=20), dense) <= 1e-5


@pytest.mark.parametrize("kind", ["forward", "jsd"])
def test_chunked_sparse_matches_plain_sparse(kind):
    hs, ws, ht, wt, targets = _inputs(n=13)
    target = losses.top_k_targets(F.linear(ht, wt), 6, 2.0, vocab_rows=19)
    kw = dict(kind=kind, temperature=2.0, vocab_rows=19)
    want = _grads(lambda: losses.sparse_kd_sum(F.linear(hs, ws), target, **kw), hs, ws)
    got = _grads(lambda: losses.chunked_logit_sums(hs, ws, teacher=target, chunk=4, **kw)[1], hs, ws)
    assert all(_rel(a, b) <= 1e-5 for a, b in zip(got, want, strict=True))


def test_relation_sum_to_matches_relation_sum():
    s, t = torch.randn(3, 5, 8), torch.randn(3, 5, 16)
    assert torch.allclose(
        losses.relation_sum_to(s, losses.relation_matrix(t)), losses.relation_sum(s, t), rtol=1e-6
    )


# --------------------------------------------------------------- the trainer's loss step, both paths


def test_loss_terms_chunked_equals_plain(processor, shapes_dir, tiny_teacher, tiny_student):
    import copy

    from lsd_edge.data.dataset import BatchLoader, LlavaDataset
    from lsd_edge.distill.objective import Counts, LatentProjector, loss_terms
    from lsd_edge.distill.teacher import OnlineTeacher
    from lsd_edge.recipe.schema import StageConfig

    ds = LlavaDataset(shapes_dir / "instruct.json", shapes_dir / "images", processor)
    batch = BatchLoader(ds, processor.tokenizer.pad_token_id).batch(list(range(8)))
    counts = Counts.of([batch], 4)
    vocab = len(processor.tokenizer)

    def step(chunk):
        stage = StageConfig.model_validate(
            dict(
                name="x",
                kind="dft",
                max_steps=1,
                loss={"latent": 0.5, "temperature": 2.0, "kl": "jsd", "chunk_size": chunk},
            )
        )
        student = copy.deepcopy(tiny_student)
        torch.manual_seed(0)
        latent = LatentProjector(stage.loss.latent_pairs, 16, 32)
        terms = loss_terms(student, OnlineTeacher(tiny_teacher), batch, stage, counts, vocab, latent)
        sum(w * v for w, v in zip((1.0, 0.7, 1.3, 0.5, 0.2), terms.values(), strict=True)).backward()
        grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
        return {k: v.detach() for k, v in terms.items()}, grads

    plain, g_plain = step(0)
    chunked, g_chunked = step(7)
    assert plain.keys() == chunked.keys() == {"ce", "response_kl", "visual_kl", "relation", "latent"}
    for k in plain:
        assert _rel(chunked[k], plain[k]) <= 1e-5, k
    assert _rel(g_chunked, g_plain) <= 1e-5


def test_chunked_refuses_an_lm_head_with_a_bias():
    """The chunked path multiplies by lm_head.weight alone; a bias would be silently dropped."""
    from types import SimpleNamespace

    from lsd_edge.distill.forward import output_weight
    from lsd_edge.errors import TrainingError

    with pytest.raises(TrainingError, match="lm_head has a bias; set chunk_size = 0"):
        output_weight(SimpleNamespace(lm_head=torch.nn.Linear(4, 9)))
    assert output_weight(SimpleNamespace(lm_head=torch.nn.Linear(4, 9, bias=False))).shape == (9, 4)


def test_stage_trained_chunked_gives_the_same_losses(tmp_path, recipe_dict):
    """A whole run with chunk_size set logs the same losses, step by step, as the plain run."""
    import json

    from lsd_edge.recipe.load import parse_recipe
    from lsd_edge.train.pipeline import DistillOptions, distill

    plain = parse_recipe(recipe_dict)
    distill(plain)
    chunked = parse_recipe(
        recipe_dict,
        overrides=[f"stages[{i}].loss.chunk_size=5" for i in range(3)] + [f"run.output_dir={tmp_path / 'c'}"],
    )
    distill(chunked, DistillOptions(teacher_dir=plain.output_dir / "teacher"))

    def log(root):
        return [json.loads(x) for x in (root / "log.jsonl").read_text().splitlines()]

    a = [r for r in log(plain.output_dir) if not r["stage"].startswith("teacher/")]
    b = log(tmp_path / "c")
    assert [(r["stage"], r["step"]) for r in a] == [(r["stage"], r["step"]) for r in b] and len(a) == 10
    for ra, rb in zip(a, b, strict=True):
        for term in ("loss", "ce", "response_kl", "visual_kl", "relation"):
            if term in ra:
                assert math.isclose(ra[term], rb[term], rel_tol=1e-4, abs_tol=1e-7), (ra, rb)
