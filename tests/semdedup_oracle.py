"""SemDeDup's rule within one cluster as a plain loop, for the tests of curate.metrics.semdedup and `curate dedup`:
a member is dropped when its cosine to an earlier member exceeds 1 − ε, where "earlier member" is an earlier kept
member (against="kept", the paper's rule) or any earlier member (against="all", the reference code's)."""

from __future__ import annotations

import numpy as np


def oracle(x: np.ndarray, eps: float, against: str):
    n = len(x)
    keep = [True] * n
    dup = [-1] * n
    sim = [-np.inf] * n
    for j in range(1, n):
        best, best_i = -np.inf, -1
        for i in range(j):
            if against == "kept" and not keep[i]:
                continue
            s = float(np.dot(x[i].astype(np.float64), x[j].astype(np.float64)))
            if s > best:
                best, best_i = s, i
        sim[j] = best
        if best > 1 - eps:
            keep[j], dup[j] = False, best_i
    return np.array(keep), np.array(dup), np.array(sim)
