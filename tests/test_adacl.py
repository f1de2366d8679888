"""AdaCL loss: the closed-form margins put the anchor at 1 - ε; m1 = 1, m2 = 0 is plain InfoNCE."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from curate.metrics.adacl import (GDA_STEP_ITERS, GDA_STEP_TOL, AdaCLBank, adacl_logits, adacl_loss, adacl_margins,
                                  info_nce_loss)


def _batch(b=32, d=16, seed=0, noise=0.6, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=1)
    txt = torch.nn.functional.normalize(img + noise * torch.randn(b, d, generator=g, dtype=dtype), dim=1)
    return img, txt


def _anchor_probability(img, txt, scale, info):
    logits = adacl_logits(img, txt, scale, info["m1"], info["m2"])
    u = info["anchor_index"]
    row = logits[u] if info["anchor_direction"] == "i2t" else logits[:, u]
    return float(torch.softmax(row.double(), dim=0)[u])


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.3])
def test_anchor_reaches_target_probability(eps):
    img, txt = _batch()
    scale = 20.0
    bank = AdaCLBank()
    loss = adacl_loss(img, txt, scale, eps, bank)
    info = bank.last
    assert torch.isfinite(loss) and info["anchor_index"] >= 0 and not info["clamped"]
    assert _anchor_probability(img, txt, scale, info) == pytest.approx(1 - eps, abs=1e-5)
    # the anchor is the pair whose gap is closest to the median gap of the GDA's potential clones
    assert info["n_potential_clones"] > 0


def test_closed_form_matches_a_numeric_solve():
    """Bisection on m1 with the pivot m2 = (m1 - 1)/τ, independent of the closed form."""
    a, neg_lse, scale, eps = 0.42, 9.3, 25.0, 0.1
    m1, m2, clamped = adacl_margins(a, neg_lse, scale, eps)
    tau = 1 / scale

    def p_hat(m):
        logit = m * a / tau - (m - 1) / tau
        return 1 / (1 + math.exp(neg_lse - logit))

    lo, hi = 1e-6, 50.0  # p_hat decreases with m1 when a < 1
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if p_hat(mid) > 1 - eps else (lo, mid)
    assert m1 == pytest.approx(0.5 * (lo + hi), rel=1e-9)
    assert m2 == pytest.approx((m1 - 1) / tau)
    assert not clamped
    # an anchor already at the target needs no change
    at_target = neg_lse + math.log((1 - eps) / eps)
    m1, m2, _ = adacl_margins(at_target * tau, neg_lse, scale, eps)
    assert m1 == pytest.approx(1.0) and m2 == pytest.approx(0.0, abs=1e-9)


def test_unit_margins_are_plain_infonce_exactly():
    img, txt = _batch(b=12, d=8, seed=1)
    scale = torch.tensor(14.0)
    a = adacl_loss(img, txt, scale, margins=(1.0, 0.0))
    b = info_nce_loss(img, txt, scale)
    assert torch.equal(a, b)
    # and InfoNCE itself against a plain loop over rows and columns
    s = (img.double() @ txt.double().T).numpy() * 14.0
    rows = [-(s[i, i] - np.log(np.exp(s[i]).sum())) for i in range(12)]
    cols = [-(s[i, i] - np.log(np.exp(s[:, i]).sum())) for i in range(12)]
    assert float(b) == pytest.approx(0.5 * (np.mean(rows) + np.mean(cols)), rel=1e-5)


def test_adacl_loss_with_margins_against_a_loop():
    img, txt = _batch(b=10, d=8, seed=2)
    scale, m1, m2 = 30.0, 0.7, -4.0
    got = float(adacl_loss(img, txt, scale, margins=(m1, m2)))
    s = (img.double() @ txt.double().T).numpy() * scale
    adj = s.copy()
    for i in range(10):
        adj[i, i] = m1 * s[i, i] - m2
    rows = [-(adj[i, i] - np.log(np.exp(adj[i]).sum())) for i in range(10)]
    cols = [-(adj[i, i] - np.log(np.exp(adj[:, i]).sum())) for i in range(10)]
    assert got == pytest.approx(0.5 * (np.mean(rows) + np.mean(cols)), rel=1e-5)


def test_gradients_flow_to_embeddings_and_scale():
    img, txt = _batch(b=16, d=8, seed=3)
    img.requires_grad_(True)
    log_scale = torch.tensor(math.log(20.0), requires_grad=True)
    loss = adacl_loss(img, txt, log_scale.exp(), 0.1, AdaCLBank())
    loss.backward()
    assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
    assert torch.isfinite(log_scale.grad)


def test_bank_fifo_momentum_and_state_roundtrip():
    bank = AdaCLBank(size=5, momentum=0.9)
    bank.push(np.arange(3.0))
    bank.push(np.arange(3.0, 7.0))
    assert sorted(bank.gaps().tolist()) == [2.0, 3.0, 4.0, 5.0, 6.0]  # the oldest two were dropped
    assert bank.update_anchor(1.0) == 1.0
    assert bank.update_anchor(2.0) == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)
    buf = io.BytesIO()
    torch.save(bank.state_dict(), buf)
    buf.seek(0)
    other = AdaCLBank()
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert sorted(other.gaps().tolist()) == sorted(bank.gaps().tolist())
    assert other.anchor_gap == bank.anchor_gap and other.size == 5


def _loop_gaps(img, txt):
    s = (img.double() @ txt.double().T).numpy()
    b = len(s)
    rows = [s[i, i] - max(s[i, j] for j in range(b) if j != i) for i in range(b)]
    cols = [s[i, i] - max(s[j, i] for j in range(b) if j != i) for i in range(b)]
    return np.array(rows + cols)


def test_momentum_smooths_the_anchor_across_batches():
    from curate.metrics.clones import fit_gda

    bank = AdaCLBank(size=4096, momentum=0.99)
    img, txt = _batch(seed=4)
    adacl_loss(img, txt, 20.0, 0.1, bank)
    first, first_fit = bank.anchor_gap, bank.gda
    g1 = _loop_gaps(img, txt)
    np.testing.assert_allclose(np.sort(bank.gaps()), np.sort(g1), atol=1e-5)
    fit1 = fit_gda(g1, max_iter=GDA_STEP_ITERS, tol=GDA_STEP_TOL)
    post1 = fit1.posterior_clone(g1)
    assert first == pytest.approx(float(np.median(g1[post1 > 0.5])), abs=1e-5)

    img2, txt2 = _batch(seed=5, noise=0.3)
    adacl_loss(img2, txt2, 20.0, 0.1, bank)
    pooled = np.concatenate([_loop_gaps(img2, txt2), g1])
    fit2 = fit_gda(pooled, max_iter=GDA_STEP_ITERS, tol=GDA_STEP_TOL, init=first_fit)
    batch_anchor = float(np.median(pooled[fit2.posterior_clone(pooled) > 0.5]))
    assert bank.anchor_gap == pytest.approx(0.99 * first + 0.01 * batch_anchor, abs=1e-5)
    assert bank.count == 128
    info = bank.last
    assert info["anchor_gap"] == pytest.approx(bank.anchor_gap)
    # the chosen pair is the one whose own gap is closest to the smoothed anchor gap
    g2 = _loop_gaps(img2, txt2)
    u = int(np.argmin(np.abs(g2 - bank.anchor_gap)))
    assert (u % 32, "i2t" if u < 32 else "t2i") == (info["anchor_index"], info["anchor_direction"])


def test_bad_inputs():
    img, txt = _batch(b=4)
    with pytest.raises(ValueError):
        adacl_loss(img[:1], txt[:1], 10.0)
    with pytest.raises(ValueError):
        adacl_margins(0.3, 2.0, 10.0, 0.0)
