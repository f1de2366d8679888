"""AdaCL, Algorithm 1: salient scores, labelled GDA, potential clones, anchor, margins and the adjusted loss,
each against a plain-numpy transcription of the equations (docs/formulas.md), plus hand examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from curate.metrics.adacl import (
    MarginState,
    adacl_loss,
    adacl_loss_with_margins,
    adjusted_probability,
    alg1_margins,
    discover_clones,
    fit_labelled_gda,
    gda_clone_posterior,
    info_nce_loss,
    labelled_negatives,
    margin_update_problem,
    reason_category,
    row_log_neg_sum,
    salient_scores,
    tune_margins,
)
from adacl_oracles import (
    oracle_adacl_loss,
    oracle_direction_loss,
    oracle_discovery,
    oracle_margins,
    oracle_posterior,
    oracle_probability,
)


def batch(b=24, d=12, seed=0, noise=0.6):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(img + noise * torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    return img, txt


# ---------------------------------------------------------------- the margins (line 5)

def test_hand_example_keeps_the_anchor_at_p_hat_u_and_puts_a_perfect_match_at_1_minus_eps():
    """τ = 0.1; anchor 0.6 with 29 negatives at 0.6: Σ = 29 e^6, p̂_u = 1/30 under plain InfoNCE."""
    scale, anchor, eps = 10.0, 0.6, 0.1
    neg_sum = 29 * math.exp(6.0)
    p_hat_u = oracle_probability(anchor, scale, 0.0, neg_sum)
    assert p_hat_u == pytest.approx(1 / 30, abs=1e-15)
    m1, m2 = alg1_margins(anchor, p_hat_u, neg_sum, eps)
    assert m1 == pytest.approx(math.log(261) / 0.4, abs=1e-12)        # 13.9113
    assert m2 == pytest.approx(0.6 - 6 / m1, abs=1e-12)                # 0.16869
    # after tuning the anchor keeps its probability (1/30, not 0.90) and s = 1 gets 1 - ε
    assert oracle_probability(anchor, m1, m2, neg_sum) == pytest.approx(1 / 30, abs=1e-9)
    assert oracle_probability(1.0, m1, m2, neg_sum) == pytest.approx(0.9, abs=1e-9)


@pytest.mark.parametrize("anchor,p_hat_u,neg_sum,eps", [
    (0.42, 0.3, 75.0, 0.1), (-0.2, 0.05, 3.0, 0.05), (0.9, 0.6, 1e30, 0.3), (0.1, 1e-6, 12.0, 0.01)])
def test_alg1_margins_against_the_formula(anchor, p_hat_u, neg_sum, eps):
    m1, m2 = alg1_margins(anchor, p_hat_u, neg_sum, eps)
    want = oracle_margins(anchor, p_hat_u, neg_sum, eps)
    assert m1 == pytest.approx(want[0], rel=1e-12) and m2 == pytest.approx(want[1], rel=1e-12, abs=1e-12)
    assert m1 > 0
    log_sum = math.log(neg_sum)
    assert float(adjusted_probability(anchor, m1, m2, log_sum)) == pytest.approx(p_hat_u, rel=1e-9)
    assert float(adjusted_probability(1.0, m1, m2, log_sum)) == pytest.approx(1 - eps, abs=1e-9)


@pytest.mark.parametrize("anchor,p_hat_u,neg_sum,eps,match", [
    (1.0, 0.3, 10.0, 0.1, "anchor"),           # no line through (anchor, p̂_u) and (1, 1 - ε)
    (1.2, 0.3, 10.0, 0.1, "anchor"),
    (0.5, 0.0, 10.0, 0.1, "saturated"),        # p̂_u underflowed
    (0.5, 1.0, 10.0, 0.1, "saturated"),
    (0.5, 0.9, 10.0, 0.1, "1 - ε"),            # m1 would be 0
    (0.5, 0.95, 10.0, 0.1, "1 - ε"),           # m1 would be negative
    (0.5, 0.3, 0.0, 0.1, "Σ"),
    (0.5, 0.3, 10.0, 1.0, "eps"),
])
def test_alg1_margins_refuses_degenerate_inputs(anchor, p_hat_u, neg_sum, eps, match):
    with pytest.raises(ValueError, match=match):
        alg1_margins(anchor, p_hat_u, neg_sum, eps)


# ---------------------------------------------------------------- discovery (lines 2-3)

def test_gda_clone_posterior_against_the_formula():
    rng = np.random.default_rng(0)
    clone_set = rng.normal(0.35, 0.08, 40)
    salient_set = rng.normal(0.05, 0.12, 40)
    s = np.linspace(-0.4, 0.8, 61)
    for prior in (0.5, 0.2, 0.9):
        np.testing.assert_allclose(gda_clone_posterior(s, clone_set, salient_set, prior),
                                   oracle_posterior(s, clone_set, salient_set, prior), rtol=1e-12, atol=1e-15)


def test_gda_hand_example():
    """Clone set {0.3, 0.5} (μ 0.4, σ 0.1), salient set {0.0, 0.2} (μ 0.1, σ 0.1), equal priors: equal
    widths make the boundary the midpoint 0.25; at s = 0.4: 1 / (1 + e^{-4.5})."""
    post = gda_clone_posterior(np.array([0.25, 0.4, 0.1]), [0.3, 0.5], [0.0, 0.2])
    assert post[0] == pytest.approx(0.5, abs=1e-12)
    assert post[1] == pytest.approx(1 / (1 + math.exp(-4.5)), abs=1e-12)
    assert post[2] == pytest.approx(1 / (1 + math.exp(4.5)), abs=1e-12)


def test_gda_refuses_sets_without_spread():
    with pytest.raises(ValueError, match="zero spread"):
        fit_labelled_gda([0.3, 0.3, 0.3], [0.1, 0.2])
    with pytest.raises(ValueError, match="at least 2"):
        fit_labelled_gda([0.3], [0.1, 0.2])
    with pytest.raises(ValueError, match="prior"):
        fit_labelled_gda([0.3, 0.4], [0.1, 0.2], prior_clone=1.0)


def test_salient_scores_and_labelled_sets_hand_example():
    S = np.array([[.31, .30, .10], [.12, .28, .27], [.05, .06, .33]])
    np.testing.assert_allclose(salient_scores(S), [.01, .01, .27], atol=1e-15)
    i_plus, i_minus, salient_set, clone_set = labelled_negatives(S)
    assert (i_plus, i_minus) == (2, 0)      # ties (rows 0 and 1) go to the first index
    np.testing.assert_array_equal(salient_set, [.05, .06])
    np.testing.assert_array_equal(clone_set, [.30, .10])


@pytest.mark.parametrize("seed", range(6))
def test_discovery_matches_the_loop_oracle(seed):
    img, txt = batch(b=20, d=8, seed=seed, noise=0.4 + 0.2 * seed)
    S = (img @ txt.T).numpy()
    for matrix in (S, S.T):
        found = discover_clones(matrix)
        i_plus, i_minus, s_bar, pair = oracle_discovery(matrix)
        assert (found.i_plus, found.i_minus) == (i_plus, i_minus)
        assert found.n_potential == len(s_bar)
        assert pair is not None and (found.anchor_row, found.anchor_col) == pair
        assert found.anchor == matrix[pair[0], pair[0]]
        assert found.anchor_gap == pytest.approx(matrix[pair[0], pair[0]] - matrix[pair], abs=1e-15)
        partner = [max((j for j in range(20) if j != i), key=lambda j: matrix[i, j]) for i in range(20)]
        np.testing.assert_array_equal(found.partner, partner)
        np.testing.assert_allclose(found.partner_prob, oracle_posterior(
            [matrix[i, partner[i]] for i in range(20)], [matrix[i_minus, j] for j in range(20) if j != i_minus],
            [matrix[i_plus, j] for j in range(20) if j != i_plus]), rtol=1e-12)


def test_discovery_without_potential_clones_or_without_a_gda():
    # a circulant matrix: every row holds the same values, so i⁺ = i⁻ and both classes are one Gaussian
    c = np.array([0.8, 0.1, 0.3, -0.2, 0.05])
    S = np.array([[c[(j - i) % 5] for j in range(5)] for i in range(5)])
    found = discover_clones(S)
    assert found.anchor is None and found.n_potential == 0 and reason_category(found.reason) == "S̄ empty"
    two = discover_clones(np.array([[0.9, 0.1], [0.2, 0.8]]))     # one negative per row: no spread
    assert two.gda is None and two.anchor is None and "no GDA" in two.reason
    assert np.isnan(two.partner_prob).all()


# ---------------------------------------------------------------- tuning (lines 4-5) on a batch

@pytest.mark.parametrize("seed,eps", [(1, 0.1), (2, 0.05), (3, 0.3)])
def test_tuned_margins_keep_the_anchor_at_p_hat_u_and_a_perfect_match_at_1_minus_eps(seed, eps):
    img, txt = batch(seed=seed)
    S = (img @ txt.T).numpy()
    scale = 20.0
    step = tune_margins(S, scale, (scale, 0.0), eps)
    assert step.updated and step.reason is None
    found = discover_clones(S)
    log_sum = row_log_neg_sum(S, found.anchor_row, scale)
    neg_sum = sum(math.exp(S[found.anchor_row, j] * scale) for j in range(len(S)) if j != found.anchor_row)
    assert step.p_hat_u == pytest.approx(oracle_probability(found.anchor, scale, 0.0, neg_sum), rel=1e-12)
    assert (step.m1, step.m2) == pytest.approx(oracle_margins(found.anchor, step.p_hat_u, neg_sum, eps), rel=1e-9)
    assert float(adjusted_probability(found.anchor, step.m1, step.m2, log_sum)) == pytest.approx(step.p_hat_u, abs=1e-9)
    assert float(adjusted_probability(1.0, step.m1, step.m2, log_sum)) == pytest.approx(1 - eps, abs=1e-9)


def test_degenerate_batches_keep_the_current_margins():
    c = np.array([0.8, 0.1, 0.3, -0.2, 0.05])
    circulant = np.array([[c[(j - i) % 5] for j in range(5)] for i in range(5)])
    step = tune_margins(circulant, 10.0, (7.0, 0.2), 0.1)
    assert (step.m1, step.m2, step.updated) == (7.0, 0.2, False) and reason_category(step.reason) == "S̄ empty"
    # positives at exactly 1: the anchor is 1
    rng = np.random.default_rng(4)
    S = rng.uniform(-0.3, 0.6, (8, 8))
    np.fill_diagonal(S, 1.0)
    step = tune_margins(S, 10.0, (10.0, 0.0), 0.1)
    assert not step.updated and step.anchor == 1.0 and reason_category(step.reason) == "anchor >= 1"
    # margins under which the anchor is already above 1 - ε
    img, txt = batch(seed=5)
    S = (img @ txt.T).numpy()
    step = tune_margins(S, 20.0, (400.0, -0.5), 0.1)
    assert not step.updated and (step.m1, step.m2) == (400.0, -0.5)
    assert step.p_hat_u >= 0.9 and reason_category(step.reason) in ("p̂_u >= 1 - ε", "p̂_u saturated")
    assert margin_update_problem(0.5, 0.3, 2.0, 0.1) is None


# ---------------------------------------------------------------- the loss (line 6)

def test_unit_margins_are_plain_infonce_with_its_gradients():
    img, txt = batch(b=12, d=8, seed=6)
    img32, txt32 = img.float().requires_grad_(True), txt.float().requires_grad_(True)
    log_scale = torch.tensor(math.log(14.0), requires_grad=True)
    unit = float(log_scale.detach().exp())        # m1 = 1/τ, m2 = 0
    a = adacl_loss_with_margins(img32, txt32, log_scale.exp(), (unit, 0.0), (unit, 0.0))
    grads_a = torch.autograd.grad(a, (img32, txt32, log_scale))
    b = info_nce_loss(img32, txt32, log_scale.exp())
    grads_b = torch.autograd.grad(b, (img32, txt32, log_scale))
    assert torch.equal(a, b)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)
    S = (img @ txt.T).numpy()
    want = 0.5 * (oracle_direction_loss(S, 14.0, 14.0, 0.0) + oracle_direction_loss(S.T, 14.0, 14.0, 0.0))
    assert float(b.detach()) == pytest.approx(want, rel=1e-5)


def test_adjusted_loss_with_margins_against_the_oracle():
    img, txt = batch(b=10, d=8, seed=7)
    S = (img @ txt.T).numpy()
    got = float(adacl_loss_with_margins(img, txt, 30.0, (9.0, -0.4), (22.0, 0.3)))
    want = 0.5 * (oracle_direction_loss(S, 30.0, 9.0, -0.4) + oracle_direction_loss(S.T, 30.0, 22.0, 0.3))
    assert got == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("seed,scale,eps", [(8, 20.0, 0.1), (9, 50.0, 0.1), (10, 10.0, 0.2)])
def test_adacl_loss_runs_algorithm_1_on_each_direction(seed, scale, eps):
    """The whole algorithm from a fresh start (m1 = 1/τ, m2 = 0) against the loop oracle."""
    img, txt = batch(seed=seed)
    S = (img @ txt.T).numpy()
    state = MarginState()
    got = float(adacl_loss(img, txt, scale, eps, state))
    assert got == pytest.approx(oracle_adacl_loss(S, scale, eps), rel=1e-9)
    assert state.last["i2t"].updated and state.last["t2i"].updated
    assert state.margins["i2t"] != state.margins["t2i"]
    # the next step starts from these margins (p̂_u under them), not from 1/τ, 0
    current = dict(state.margins)
    img2, txt2 = batch(seed=seed + 100)
    got2 = float(adacl_loss(img2, txt2, scale, eps, state))
    S2 = (img2 @ txt2.T).numpy()
    assert got2 == pytest.approx(oracle_adacl_loss(S2, scale, eps, current), rel=1e-9)
    assert got2 != pytest.approx(oracle_adacl_loss(S2, scale, eps), rel=1e-6)


def test_gradients_flow_to_embeddings_and_scale_but_not_through_margins():
    img, txt = batch(b=16, d=8, seed=11)
    img = img.float().requires_grad_(True)
    log_scale = torch.tensor(math.log(20.0), requires_grad=True)
    loss = adacl_loss(img, txt.float(), log_scale.exp(), 0.1)
    loss.backward()
    assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
    assert torch.isfinite(log_scale.grad)


def test_bad_inputs():
    img, txt = batch(b=4)
    with pytest.raises(ValueError):
        adacl_loss(img[:1], txt[:1], 10.0)
    with pytest.raises(ValueError):
        salient_scores(np.zeros((3, 2)))
