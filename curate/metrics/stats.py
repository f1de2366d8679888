"""Statistics of a closed-loop comparison (pure math on arrays): means over seeds with a Student-t interval, paired
differences, headroom, Spearman's rank correlation.

Every function names the textbook definition it follows in its docstring.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

CONFIDENCE = 0.95


def student_t_cdf(x: float, df: int) -> float:
    """P(T <= x) of Student's t with `df` degrees of freedom: 1/2 + ∫₀ˣ f(u) du with the density
    f(u) = Γ((ν+1)/2) / (√(νπ) Γ(ν/2)) · (1 + u²/ν)^(-(ν+1)/2) (Student 1908), by Simpson's rule."""
    if df < 1:
        raise ValueError("df must be >= 1")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    steps = 4000  # even; the integrand is smooth, the error is far below the 1e-9 the quantile bisects to
    u = np.linspace(0.0, abs(x), steps + 1)
    f = np.exp(log_norm - (df + 1) / 2 * np.log1p(u * u / df))
    h = abs(x) / steps
    integral = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return 0.5 + math.copysign(integral, x)


def student_t_quantile(p: float, df: int) -> float:
    """The x with student_t_cdf(x, df) = p, by bisection (p in (0, 1))."""
    if not 0 < p < 1:
        raise ValueError("p must be in (0, 1)")
    lo, hi = -1.0, 1.0
    while student_t_cdf(lo, df) > p:
        lo *= 2
    while student_t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mean_std_ci(values: Sequence[float | None], confidence: float = CONFIDENCE) -> dict:
    """Mean, sample standard deviation s (ddof = 1) and the Student-t interval mean ± t_{(1+c)/2, n-1} · s / √n
    of the finite values; std and ci95 are None for fewer than two values, everything None for none."""
    vals = np.asarray([float(v) for v in values if v is not None and math.isfinite(float(v))], dtype=np.float64)
    n = len(vals)
    if n == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    mean = float(vals.mean())
    if n < 2:
        return {"mean": mean, "std": None, "ci95": None, "n": 1}
    std = float(vals.std(ddof=1))
    half = student_t_quantile((1 + confidence) / 2, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "n": int(n)}


def paired_differences(method: dict[int, float], baseline: dict[int, float]) -> list[float]:
    """method_s − baseline_s for every seed s both have (a paired comparison: the seed's randomness cancels)."""
    return [method[s] - baseline[s] for s in sorted(set(method) & set(baseline))
            if method[s] is not None and baseline[s] is not None]


def headroom(method: float, random: float, oracle: float) -> float | None:
    """Headroom recovered (method − random) / (oracle − random): 0 at random, 1 at the oracle; None when the oracle
    is not above random (no headroom to recover)."""
    if None in (method, random, oracle) or oracle <= random:
        return None
    return (method - random) / (oracle - random)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.r_[0, np.nonzero(np.diff(sorted_values))[0] + 1]
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ: the Pearson correlation of the average ranks of x and of y (Spearman 1904); NaN when either is
    constant or fewer than two pairs."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError("x and y need the same length")
    if len(x) < 2:
        return float("nan")
    rx, ry = average_ranks(x), average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")
