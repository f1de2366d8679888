"""SemDeDup within a cluster against plain loops written from the paper's rule (a member is dropped when its
cosine to an earlier kept member exceeds 1 − ε) and from the reference code's (to any earlier member), plus a
hand-checkable chain."""

from __future__ import annotations

import numpy as np
import pytest

from curate.metrics.semdedup import keep_order, semdedup_cluster
from semdedup_oracle import oracle


def unit(rows):
    rows = np.asarray(rows, dtype=np.float64)
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_hand_chain_kept_rule_keeps_the_far_end_and_the_reference_rule_drops_it():
    # a, b, c on a circle, 20 degrees apart: a~b and b~c (cos 20° = 0.9397), a and c apart (cos 40° = 0.766)
    angles = np.radians([0, 20, 40])
    x = unit(np.stack([np.cos(angles), np.sin(angles)], axis=1))
    keep, dup, sim = semdedup_cluster(x, eps=0.1)  # threshold 0.9
    assert keep.tolist() == [True, False, True] and dup.tolist() == [-1, 0, -1]
    assert sim[2] == pytest.approx(np.cos(np.radians(40)), abs=1e-6)  # c against the kept a only
    keep, dup, _ = semdedup_cluster(x, eps=0.1, against="all")
    assert keep.tolist() == [True, False, False] and dup.tolist() == [-1, 0, 1]


@pytest.mark.parametrize("against", ["kept", "all"])
@pytest.mark.parametrize("seed", range(6))
def test_matches_the_loop_oracle(seed, against):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((8, 16))
    # 8 groups of 1-5 near copies of a random direction: duplicates within groups, chains at larger eps
    x = unit(np.concatenate([b + 0.25 * rng.standard_normal((k, 16)) for b, k in zip(base, rng.integers(1, 6, 8))]))
    x = x[rng.permutation(len(x))]
    for eps in (0.02, 0.1, 0.3):
        want = oracle(x, eps, against)
        for block in (1, 3, 1024):
            keep, dup, sim = semdedup_cluster(x, eps, against, block=block)
            np.testing.assert_array_equal(keep, want[0])
            np.testing.assert_array_equal(dup, want[1])
            np.testing.assert_allclose(sim[1:], want[2][1:], atol=1e-5)


def test_keep_orders():
    centroid = np.array([0.9, 0.2, 0.5, 0.2])
    assert keep_order(centroid, "centroid").tolist() == [1, 3, 2, 0]  # farthest first (the paper's keep hard)
    assert keep_order(centroid, "centroid_nearest").tolist() == [0, 2, 1, 3]
    assert keep_order(centroid, "score", np.array([0.1, np.nan, 0.7, 0.3])).tolist() == [2, 3, 0, 1]
    a = keep_order(centroid, "random", rng=np.random.default_rng(5))
    assert sorted(a.tolist()) == [0, 1, 2, 3] and a.tolist() == keep_order(
        centroid, "random", rng=np.random.default_rng(5)).tolist()
    with pytest.raises(ValueError):
        keep_order(centroid, "best")
