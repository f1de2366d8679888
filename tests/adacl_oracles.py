"""Plain-Python transcriptions of AdaCL's Algorithm 1 (docs/formulas.md, "AdaCL (Algorithm 1)"), written from the equations with
loops, for the tests of curate.metrics.adacl and `curate clones`."""

from __future__ import annotations

import math
import statistics


def oracle_posterior(s, clone_set, salient_set, prior_clone=0.5):
    """p(C|s) = 1 / (1 + (π_c̄/π_c)(σ_c/σ_c̄) exp[(s-μ_c)²/(2σ_c²) - (s-μ_c̄)²/(2σ_c̄²)])."""
    mu_c, sd_c = statistics.fmean(clone_set), statistics.pstdev(clone_set)
    mu_n, sd_n = statistics.fmean(salient_set), statistics.pstdev(salient_set)
    ratio = (1 - prior_clone) / prior_clone * sd_c / sd_n
    return [1 / (1 + ratio * math.exp((x - mu_c) ** 2 / (2 * sd_c ** 2) - (x - mu_n) ** 2 / (2 * sd_n ** 2)))
            for x in s]


def oracle_discovery(S, prior_clone=0.5):
    """Lines 2-3 with loops: (i⁺, i⁻, S̄ as a list of (i, j), anchor pair (u, v))."""
    n = len(S)
    g = [S[i][i] - max(S[i][j] for j in range(n) if j != i) for i in range(n)]
    i_plus = max(range(n), key=lambda i: (g[i], -i))     # the first index on ties
    i_minus = min(range(n), key=lambda i: (g[i], i))
    salient_set = [S[i_plus][j] for j in range(n) if j != i_plus]
    clone_set = [S[i_minus][j] for j in range(n) if j != i_minus]
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    probs = oracle_posterior([S[i][j] for i, j in pairs], clone_set, salient_set, prior_clone)
    s_bar = [p for p, prob in zip(pairs, probs) if prob > 1 - prob]
    if not s_bar:
        return i_plus, i_minus, s_bar, None
    gaps = sorted(S[i][i] - S[i][j] for i, j in s_bar)
    median = gaps[(len(gaps) - 1) // 2]
    anchor_pair = next((i, j) for i, j in s_bar if S[i][i] - S[i][j] == median)
    return i_plus, i_minus, s_bar, anchor_pair


def oracle_margins(anchor, p_hat_u, neg_sum, eps):
    m1 = math.log(eps * p_hat_u / ((1 - eps) * (1 - p_hat_u))) / (anchor - 1)
    m2 = anchor + math.log((1 - p_hat_u) / (p_hat_u * neg_sum)) / m1
    return m1, m2


def oracle_probability(s, m1, m2, neg_sum):
    """p̂ = exp[m1(s - m2)] / (exp[m1(s - m2)] + Σ)."""
    return math.exp(m1 * (s - m2)) / (math.exp(m1 * (s - m2)) + neg_sum)


def oracle_direction_loss(S, scale, m1, m2):
    """Mean over rows of -log p̂_i with p̂_i = exp[m1(s_ii - m2)] / (exp[m1(s_ii - m2)] + Σ_{j≠i} exp(s_ij/τ))."""
    n = len(S)
    losses = []
    for i in range(n):
        neg_sum = sum(math.exp(S[i][j] * scale) for j in range(n) if j != i)
        losses.append(-math.log(oracle_probability(S[i][i], m1, m2, neg_sum)))
    return sum(losses) / n


def oracle_adacl_loss(S, scale, eps, current=None):
    """Lines 2-6 for both directions, each starting from current[direction] (default m1 = 1/τ, m2 = 0)."""
    n = len(S)
    total = 0.0
    for direction, matrix in (("i2t", S), ("t2i", S.T)):
        m1, m2 = (current or {}).get(direction) or (scale, 0.0)
        _, _, _, pair = oracle_discovery(matrix)
        if pair is not None:
            u = pair[0]
            neg_sum = sum(math.exp(matrix[u][j] * scale) for j in range(n) if j != u)
            p_hat_u = oracle_probability(matrix[u][u], m1, m2, neg_sum)
            m1, m2 = oracle_margins(matrix[u][u], p_hat_u, neg_sum, eps)
        total += oracle_direction_loss(matrix, scale, m1, m2)
    return total / 2
