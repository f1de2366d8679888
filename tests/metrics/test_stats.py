"""curate.metrics.stats: the Student-t interval, paired differences, headroom and Spearman's ρ, each against a plain
transcription of its textbook definition and a hand-checked case."""

from __future__ import annotations

import math

import numpy as np
import pytest

from curate.metrics.stats import (average_ranks, headroom, mean_std_ci, paired_differences, spearman,
                                  student_t_cdf, student_t_quantile)

# Two-sided 95 % critical values t_{0.975, df} from any printed table (e.g. Fisher & Yates, Table III).
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 30: 2.042}


@pytest.mark.parametrize("df, value", sorted(T_TABLE.items()))
def test_t_quantile_matches_the_printed_table(df, value):
    assert student_t_quantile(0.975, df) == pytest.approx(value, abs=6e-4)
    assert student_t_quantile(0.025, df) == pytest.approx(-value, abs=6e-4)


def test_t_cdf_matches_the_closed_forms_of_small_df():
    closed = {1: lambda x: 0.5 + math.atan(x) / math.pi,  # Cauchy
              2: lambda x: 0.5 + x / (2 * math.sqrt(2 + x * x)),
              3: lambda x: 0.5 + (x / (math.sqrt(3) * (1 + x * x / 3)) + math.atan(x / math.sqrt(3))) / math.pi}
    for df, cdf in closed.items():
        for x in (-7.0, -2.5, -0.4, 0.0, 0.3, 1.7, 12.0):
            assert student_t_cdf(x, df) == pytest.approx(cdf(x), abs=1e-7), (df, x)
    assert student_t_cdf(1.0, 1) == pytest.approx(0.75)  # by hand: 1/2 + (π/4)/π


def test_mean_std_ci_hand_case():
    stat = mean_std_ci([1.0, 2.0, 3.0])
    half = 4.3027 / math.sqrt(3)  # t_{0.975, 2} · s / √n with s = 1
    assert stat["mean"] == 2.0 and stat["std"] == pytest.approx(1.0) and stat["n"] == 3
    assert stat["ci95"] == pytest.approx([2.0 - half, 2.0 + half], abs=1e-3)
    assert mean_std_ci([5.0]) == {"mean": 5.0, "std": None, "ci95": None, "n": 1}
    assert mean_std_ci([None, float("nan")]) == {"mean": None, "std": None, "ci95": None, "n": 0}


def test_mean_std_ci_matches_a_loop():
    rng = np.random.default_rng(3)
    values = rng.normal(10, 3, size=7).tolist()
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = student_t_quantile(0.975, n - 1) * std / math.sqrt(n)
    stat = mean_std_ci(values)
    assert stat["mean"] == pytest.approx(mean) and stat["std"] == pytest.approx(std)
    assert stat["ci95"] == pytest.approx([mean - half, mean + half])


def test_paired_differences_and_headroom():
    assert paired_differences({0: 50.0, 1: 60.0, 2: 70.0}, {0: 40.0, 1: 45.0}) == [10.0, 15.0]
    assert headroom(60.0, 40.0, 80.0) == 0.5
    assert headroom(40.0, 40.0, 80.0) == 0.0 and headroom(80.0, 40.0, 80.0) == 1.0
    assert headroom(30.0, 40.0, 80.0) == -0.25
    assert headroom(50.0, 40.0, 40.0) is None and headroom(50.0, None, 60.0) is None


def loop_spearman(x, y):
    def ranks(values):
        out = []
        for v in values:
            below = sum(1 for w in values if w < v)
            equal = sum(1 for w in values if w == v)
            out.append(below + (equal + 1) / 2)
        return out

    rx, ry = ranks(list(x)), ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def test_spearman_matches_a_loop_and_hand_cases():
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    # ties: x ranks 1, 2.5, 2.5, 4; y ranks 1, 2, 3, 4
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(loop_spearman([1, 2, 2, 3], [1, 2, 3, 4]))
    assert average_ranks(np.array([5.0, 1.0, 5.0])).tolist() == [2.5, 1.0, 2.5]
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 6, 40), rng.normal(size=40)
    assert spearman(x, y) == pytest.approx(loop_spearman(x, y))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
