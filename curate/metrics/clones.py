"""Pool-wide clone statistics (our extension of AdaCL to a whole pool), tier-0 uncertainty, near-duplicates.

AdaCL's own discovery works on batches (curate.metrics.adacl: salient scores, labelled GDA, anchor). Here the
same salient score is computed against the whole pool, exactly, with s_ij = <v_i, t_j> (image i, text j,
unit vectors):

  gap_i2t(i)   = s_ii - max_{j != i} s_ij          (the "salient score"; small or negative => clone negative)
  gap_t2i(i)   = s_ii - max_{j != i} s_ji
  partner(i)   = argmax_{j != i} s_ij
  count(i)     = #{j != i : s_ij >= s_ii - margin}

Two ways to get them, with identical results up to float32 rounding:
  * `dense_clone_stats(S)` on an explicit N x N matrix: small inputs, tests, the paper's hand example;
  * `knn_search` + `neighbour_stats`: exact blocked k-NN (FAISS IndexFlatIP, or torch on CUDA), never an
    N x N matrix; memory is (query block x database block). The max over j != i is the best non-self entry
    of a (k+1)-NN list. Counts are exact: a query whose k non-self neighbours all pass the threshold (the
    k-NN list is saturated) is recounted against the whole database by `count_at_least`.

Everything here is pure math on arrays (numpy, FAISS, torch); reading the pool is the stage's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

# Rows of the database converted to float32 at a time (bounded memory: 256 MiB for D = 512).
DEFAULT_DB_BLOCK_BYTES = 256 * 2**20


# ---------------------------------------------------------------- dense reference (small N)

@dataclass
class CloneStats:
    """Per-sample clone statistics in both directions (arrays of length N)."""

    positive: np.ndarray        # s_ii
    gap_i2t: np.ndarray         # s_ii - max_{j!=i} s_ij
    partner_i2t: np.ndarray     # argmax_{j!=i} s_ij (int64 pool index)
    count_i2t: np.ndarray       # #{j != i : s_ij >= s_ii - margin}
    gap_t2i: np.ndarray         # s_ii - max_{j!=i} s_ji
    partner_t2i: np.ndarray
    count_t2i: np.ndarray


def dense_clone_stats(S: np.ndarray, margin: float = 0.0) -> CloneStats:
    """Salient gaps, partners and counts from a full similarity matrix S[i, j] = <v_i, t_j>.

    AdaCL (Pan et al., ICLR 2025), Sec. 3 / Alg. 1 line 2: salient score = s_ii - max_{j != i} s_ij.
    """
    S = np.asarray(S, dtype=np.float64)
    n = S.shape[0]
    if S.shape != (n, n) or n < 2:
        raise ValueError(f"need a square similarity matrix with N >= 2, got {S.shape}")
    pos = np.diag(S).copy()
    off = S.copy()
    np.fill_diagonal(off, -np.inf)
    p_i2t = off.argmax(axis=1)
    p_t2i = off.argmax(axis=0)
    thr = pos - margin
    return CloneStats(
        positive=pos,
        gap_i2t=pos - off[np.arange(n), p_i2t],
        partner_i2t=p_i2t.astype(np.int64),
        count_i2t=(off >= thr[:, None]).sum(axis=1).astype(np.int64),
        gap_t2i=pos - off[p_t2i, np.arange(n)],
        partner_t2i=p_t2i.astype(np.int64),
        count_t2i=(off >= thr[None, :]).sum(axis=0).astype(np.int64),
    )


# ---------------------------------------------------------------- blocked exact k-NN

def _db_block_rows(n: int, dim: int, db_block: int | None) -> int:
    if db_block is not None:
        return max(1, int(db_block))
    return max(1, min(n, DEFAULT_DB_BLOCK_BYTES // max(1, 4 * dim)))


def knn_search(queries: np.ndarray, database: np.ndarray, k: int, *, query_block: int = 8192,
               db_block: int | None = None, device: str = "cpu",
               backend: str = "auto") -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Exact maximum-inner-product k-NN, blocked on both sides. Yields (start, sims (b, k), ids (b, k)).

    Inner product search (FAISS IndexFlatIP; Johnson et al. 2019, exact brute force). `queries` and
    `database` may be memory-mapped fp16 arrays: only one block of each is ever converted to float32.
    Results are sorted by decreasing similarity. backend "auto": FAISS on CPU, torch (matmul + topk) on any
    other device; "faiss" or "torch" force one (both exact).
    """
    n_db, dim = database.shape
    k = int(min(k, n_db))
    if k < 1:
        raise ValueError("k must be >= 1 and the database non-empty")
    rows = _db_block_rows(n_db, dim, db_block)
    starts = list(range(0, n_db, rows))
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"unknown k-NN backend {backend!r}")
    if backend == "torch" or (backend == "auto" and device != "cpu"):
        yield from _knn_search_torch(queries, database, k, query_block, starts, rows, device)
        return
    import faiss

    single_index = None
    if len(starts) == 1:  # the whole database fits in one block: build its index once
        single_index = faiss.IndexFlatIP(dim)
        single_index.add(np.ascontiguousarray(database[:], dtype=np.float32))
    for q0 in range(0, len(queries), query_block):
        q = np.ascontiguousarray(queries[q0:q0 + query_block], dtype=np.float32)
        if single_index is not None:
            sims, ids = single_index.search(q, k)
        else:
            heap = faiss.ResultHeap(len(q), k, keep_max=True)
            for d0 in starts:
                index = faiss.IndexFlatIP(dim)
                index.add(np.ascontiguousarray(database[d0:d0 + rows], dtype=np.float32))
                kk = min(k, index.ntotal)
                s, i = index.search(q, kk)
                heap.add_result(s, i + d0)
            heap.finalize()
            sims, ids = heap.D, heap.I
        yield q0, sims, ids


def _knn_search_torch(queries, database, k, query_block, starts, rows, device):
    import torch

    dev = torch.device(device)
    single = None
    if len(starts) == 1:
        single = torch.as_tensor(np.asarray(database[:], dtype=np.float32), device=dev)
    for q0 in range(0, len(queries), query_block):
        q = torch.as_tensor(np.asarray(queries[q0:q0 + query_block], dtype=np.float32), device=dev)
        best_s = best_i = None
        for d0 in starts:
            db = single if single is not None else torch.as_tensor(
                np.asarray(database[d0:d0 + rows], dtype=np.float32), device=dev)
            s = q @ db.T
            kk = min(k, s.shape[1])
            s, i = torch.topk(s, kk, dim=1)
            i = i + d0
            if best_s is None:
                best_s, best_i = s, i
            else:
                s = torch.cat([best_s, s], 1)
                i = torch.cat([best_i, i], 1)
                best_s, pos = torch.topk(s, min(k, s.shape[1]), dim=1)
                best_i = torch.gather(i, 1, pos)
        yield q0, best_s.cpu().numpy(), best_i.cpu().numpy().astype(np.int64)


def drop_self(sims: np.ndarray, ids: np.ndarray, self_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From (k+1)-NN lists keep the k best entries whose id differs from the query's own index.

    Where the query's own index is absent (its positive ranks below k+1), the last entry is dropped instead.
    """
    is_self = ids == np.asarray(self_ids)[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]  # non-self first, rank order kept
    return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)


def count_at_least(queries: np.ndarray, thresholds: np.ndarray, database: np.ndarray,
                   exclude_ids: np.ndarray, *, db_block: int | None = None, query_block: int = 1024) -> np.ndarray:
    """Exact #{j != exclude_ids[q] : <queries[q], database[j]> >= thresholds[q]}, blocked, float32."""
    n_db, dim = database.shape
    rows = _db_block_rows(n_db, dim, db_block)
    out = np.zeros(len(queries), dtype=np.int64)
    exclude_ids = np.asarray(exclude_ids, dtype=np.int64)
    thresholds = np.asarray(thresholds, dtype=np.float32)
    for q0 in range(0, len(queries), query_block):
        q = np.asarray(queries[q0:q0 + query_block], dtype=np.float32)
        thr = thresholds[q0:q0 + query_block, None]
        ex = exclude_ids[q0:q0 + query_block]
        for d0 in range(0, n_db, rows):
            s = q @ np.asarray(database[d0:d0 + rows], dtype=np.float32).T
            local = ex - d0
            inside = (local >= 0) & (local < s.shape[1])
            s[np.nonzero(inside)[0], local[inside]] = -np.inf
            out[q0:q0 + len(q)] += (s >= thr).sum(axis=1)
    return out


def row_similarities(query: np.ndarray, database: np.ndarray, exclude: int, *,
                     db_block: int | None = None) -> np.ndarray:
    """<query, database[j]> for every j != exclude (float64, the database read in float32 blocks): the M
    negative similarities of one sample against the whole pool."""
    q = np.asarray(query, dtype=np.float32).ravel()
    n, dim = database.shape
    rows = _db_block_rows(n, dim, db_block)
    sims = np.concatenate([np.asarray(database[d0:d0 + rows], dtype=np.float32) @ q for d0 in range(0, n, rows)])
    return np.delete(sims.astype(np.float64), int(exclude))


# ---------------------------------------------------------------- per-query statistics from k-NN lists

def softmax_over_candidates(positive: np.ndarray, negatives: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probability of the positive among {positive} U top-k negatives at temperature tau, and the
    entropy of that softmax.

    InfoNCE's softmax (CLIP, Radford et al. 2021, Eq. in Fig. 3): p = exp(s_ii/τ) / Σ_c exp(s_ic/τ),
    H = -Σ_c p_c log p_c, restricted to the k+1 candidates. Computed with log-sum-exp (no overflow).
    """
    logits = np.concatenate([np.asarray(positive, np.float64)[:, None], np.asarray(negatives, np.float64)], 1) / tau
    logits -= logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(logits).sum(axis=1, keepdims=True))
    log_p = logits - log_z
    p = np.exp(log_p)
    entropy = -(p * log_p).sum(axis=1)
    return p[:, 0], entropy


@dataclass
class NeighbourStats:
    gap: np.ndarray          # positive - best non-self similarity
    best: np.ndarray         # the best non-self similarity, max_{j != i} s_ij
    partner: np.ndarray      # index of the best non-self neighbour (ties: smallest index)
    count: np.ndarray        # #{non-self in top-k with sim >= positive - margin}
    saturated: np.ndarray    # bool: count == k, the true count may be larger (recount with count_at_least)
    p_match: np.ndarray      # softmax of the positive among positive + top-k non-self
    entropy: np.ndarray      # entropy of that softmax
    nearest: np.ndarray      # nearest neighbour including self (for hubness)


def neighbour_stats(positive: np.ndarray, sims: np.ndarray, ids: np.ndarray, self_ids: np.ndarray,
                    k: int, margin: float, tau: float) -> NeighbourStats:
    """Per-query clone statistics from (k+1)-NN lists sorted by decreasing similarity.

    AdaCL (Pan et al., ICLR 2025) salient score s_ii - max_{j != i} s_ij, computed from the k-NN list.
    """
    positive = np.asarray(positive, dtype=np.float32)
    neg_s, neg_i = drop_self(sims, ids, self_ids, k)
    count = (neg_s >= (positive - np.float32(margin))[:, None]).sum(axis=1).astype(np.int64)
    p, h = softmax_over_candidates(positive, neg_s, tau)
    # exact ties (e.g. copies of one image) go to the smallest index, as the dense argmax does
    tied = neg_s == neg_s[:, :1]
    partner = np.where(tied, neg_i, np.iinfo(np.int64).max).min(axis=1)
    return NeighbourStats(gap=positive - neg_s[:, 0], best=neg_s[:, 0].copy(), partner=partner.astype(np.int64), count=count,
                          saturated=count >= neg_s.shape[1], p_match=p, entropy=h,
                          nearest=np.where(sims == sims[:, :1], ids, np.iinfo(np.int64).max).min(axis=1))


def hubness(nearest: np.ndarray, n: int) -> np.ndarray:
    """k-occurrence N_1(x): how many queries have x as their nearest neighbour.

    Radovanović et al., "Hubs in Space", JMLR 2010, Eq. (1) with k = 1.
    """
    return np.bincount(np.asarray(nearest, dtype=np.int64), minlength=n).astype(np.int64)


# ---------------------------------------------------------------- duplicates

def first_duplicate(sims: np.ndarray, ids: np.ndarray, self_ids: np.ndarray, threshold: float) -> np.ndarray:
    """For each query, the smallest index j < self with similarity >= threshold among its neighbours, else -1.

    Near-duplicate detection by embedding similarity (SemDeDup, Abbas et al. 2023, Sec. 3: pairs with
    cosine >= 1 - ε are duplicates; the earliest item is kept).
    """
    self_ids = np.asarray(self_ids, dtype=np.int64)[:, None]
    ok = (sims >= threshold) & (ids < self_ids) & (ids >= 0)
    cand = np.where(ok, ids, np.iinfo(np.int64).max)
    best = cand.min(axis=1)
    return np.where(best == np.iinfo(np.int64).max, -1, best).astype(np.int64)


def resolve_duplicate_roots(dup: np.ndarray) -> np.ndarray:
    """Follow duplicate_of chains (always to smaller indices) to the first occurrence, by pointer jumping."""
    dup = np.asarray(dup, dtype=np.int64).copy()
    while True:
        has = dup >= 0
        parent = np.where(has, dup, 0)
        grand = np.where(has, dup[parent], -1)
        step = has & (grand >= 0)
        if not step.any():
            return dup
        dup[step] = grand[step]


# ---------------------------------------------------------------- detection quality

def precision_recall_f1(predicted: np.ndarray, actual: np.ndarray) -> dict:
    """Precision TP/(TP+FP), recall TP/(TP+FN), F1 = 2PR/(P+R) (van Rijsbergen 1979)."""
    predicted = np.asarray(predicted, bool)
    actual = np.asarray(actual, bool)
    tp = int((predicted & actual).sum())
    fp = int((predicted & ~actual).sum())
    fn = int((~predicted & actual).sum())
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f1, "tp": tp, "fp": fp, "fn": fn}
