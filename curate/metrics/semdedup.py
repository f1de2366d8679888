"""SemDeDup within one cluster (Abbas et al. 2023, *SemDeDup: Data-efficient learning at web-scale through
semantic deduplication*, Sec. 3): pure math on arrays, no I/O.

The members of a cluster are visited in a keep order (the policy: by distance to the centroid as the paper's
"keep hard", by a score, or seeded random); a member is a semantic duplicate when its cosine similarity to an
earlier *kept* member exceeds 1 − ε, and is then dropped. The reference code (facebookresearch/SemDeDup,
`semdedup.py`) compares with every earlier member, dropped ones included (`max(triu(S, 1), dim=0) > 1 − ε`):
on a chain a ~ b ~ c with a, c apart, it drops both b and c where a kept-member rule keeps c. Both are here:
`against="kept"` (the default: the paper's "keep one representative per group of duplicates") and
`against="all"` (the reference code's rule).
"""

from __future__ import annotations

import numpy as np

AGAINST = ("kept", "all")


def semdedup_cluster(embeddings: np.ndarray, eps: float, against: str = "kept",
                     block: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SemDeDup of one cluster whose rows are already in keep order (row 0 is kept first).

    Returns (keep: bool (n,), duplicate_of: int64 (n,) the row a dropped member duplicates, else -1,
    similarity: float32 (n,) its largest cosine to an earlier member compared against (kept ones for
    `against="kept"`, every earlier one for "all"; -inf for row 0)).

    `embeddings`: (n, D) L2-normalised rows (any float dtype; products in float32). Time O(n² D), memory
    O(block · n): the similarities are computed `block` rows at a time, never the whole n × n matrix.
    """
    if against not in AGAINST:
        raise ValueError(f"against must be one of {AGAINST}, got {against!r}")
    if not 0.0 <= eps <= 2.0:
        raise ValueError(f"eps must be in [0, 2], got {eps}")
    x = np.asarray(embeddings, dtype=np.float32)
    n = len(x)
    keep = np.ones(n, dtype=bool)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    similarity = np.full(n, -np.inf, dtype=np.float32)
    threshold = np.float32(1.0 - eps)
    for start in range(0, n, block):
        stop = min(n, start + block)
        sims = x[start:stop] @ x[:stop].T  # (b, stop): the block's rows against every row up to its end
        rows = np.arange(start, stop)
        earlier = np.arange(stop)[None, :] < rows[:, None]
        sims = np.where(earlier, sims, -np.inf)
        above = sims > threshold
        if against == "all":
            keep[start:stop] = ~above.any(axis=1)
        else:
            # a row with no earlier member above the threshold is kept whatever is dropped; only the rows with
            # candidates depend on the decisions before them, in order
            for offset in np.flatnonzero(above.any(axis=1)).tolist():
                keep[start + offset] = not (above[offset] & keep[:stop]).any()
            sims = np.where(keep[None, :stop], sims, -np.inf)  # compared against kept members only
        best = np.argmax(sims, axis=1)
        similarity[start:stop] = sims[np.arange(stop - start), best]
        dropped = ~keep[start:stop]
        duplicate_of[start:stop][dropped] = best[dropped]
    return keep, duplicate_of, similarity


def keep_order(centroid_similarity: np.ndarray, policy: str, scores: np.ndarray | None = None,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """The visiting order of a cluster's members (indices into it) for a keep policy:
    `centroid`: by cosine to the centroid ascending, i.e. the farthest first (the paper's default, "keep
    hard": descending distance); `centroid_nearest`: nearest first ("keep easy"); `score`: by `scores`
    descending (e.g. negCLIPLoss: the best pair of a group is kept); `random`: a seeded permutation.
    Ties in the first three keep the input order (stable sorts)."""
    n = len(centroid_similarity)
    if policy == "centroid":
        return np.argsort(np.asarray(centroid_similarity), kind="stable")
    if policy == "centroid_nearest":
        return np.argsort(-np.asarray(centroid_similarity), kind="stable")
    if policy == "score":
        if scores is None:
            raise ValueError("policy 'score' needs scores")
        values = np.asarray(scores, dtype=np.float64)
        values = np.where(np.isnan(values), -np.inf, values)  # a NaN score is kept last
        return np.argsort(-values, kind="stable")
    if policy == "random":
        return (rng or np.random.default_rng(0)).permutation(n)
    raise ValueError(f"unknown keep policy {policy!r}")
