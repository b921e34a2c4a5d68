"""Losses against plain float64 references: values, gradients, zero at equality, masks, padded rows."""

from __future__ import annotations

import math

import pytest
import torch

from lsd_edge import losses

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
