"""NormSim: how well a sample's image embedding aligns with a target set (pure math, no file I/O).

NormSim_p(v) = ( Σ_{x∈X} |<v, x>|^p )^{1/p}   (Wang et al., NeurIPS 2024, Eq. 3: a sum over the target, not a mean)

* p = ∞: max_x |<v, x>|. The paper's code takes max_x <v, x>; the two agree whenever the best match is
  positively aligned, which is the usual case for CLIP image embeddings. We implement |.| as defined.
  Exact ("flat"): the tiled float32 product V Xᵀ (the same sgemm FAISS's IndexFlatIP runs) reduced with
  max(max_x <v,x>, -min_x <v,x>) in one pass, in torch so it runs on the GPU when present. A FAISS
  IndexFlatIP top-1 search cannot take |.| and would need X and -X indexed: twice the work for the same
  numbers (the tests check both agree). Approximate ("ivf"): FAISS IndexIVFFlat over [X; -X]
  (nlist clusters, nprobe probed), whose top-1 is max(max <v,x>, max <v,-x>).
* p = 2: sqrt(vᵀ (XᵀX) v) through the D×D second moment C = XᵀX (accumulated in float64): no N×M product.
* NormSim_2-D (no target): the pool itself is the target, as the reference code's VAS-D loop runs it
  (ypwang61/negCLIPLoss_NormSim, baselines/vas2.py `load_uids_with_vas_d_filter`): T iterations remove equal
  chunks of the lowest scores, so S_{i+1} ⊂ S_i, each scoring against the second moment of a 10 % random
  subsample of the current subset (see `normsim_2d`; seeded here, unseeded there).
"""

from __future__ import annotations

import math
import threading
from fractions import Fraction
from typing import Iterator

import numpy as np

CHUNK_ROWS = 1 << 16


def _chunks(n: int, chunk_rows: int) -> Iterator[slice]:
    for start in range(0, n, chunk_rows):
        yield slice(start, min(start + chunk_rows, n))


def second_moment(x: np.ndarray, moment: np.ndarray | None = None, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """C = Σ_x x xᵀ = XᵀX (D×D float64), added onto `moment` when given, so it can be built chunk by chunk.

    Each chunk's product runs in float32 BLAS (fast); the running total across chunks is float64.
    """
    d = x.shape[1]
    if moment is None:
        moment = np.zeros((d, d), dtype=np.float64)
    for part in _chunks(len(x), chunk_rows):
        rows = np.asarray(x[part], dtype=np.float32)
        moment += rows.T @ rows
    return moment


class _ThreadBuffers:
    """One reused float32 work buffer per calling thread (a fresh 16 MiB array per block costs its page faults
    every time; a scorer may be called from several threads at once)."""

    def __init__(self):
        self._local = threading.local()

    def get(self, rows: int, columns: int) -> np.ndarray:
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != columns:
            buffer = self._local.buffer = np.empty((rows, columns), dtype=np.float32)
        return buffer[:rows]


class QuadraticForm:
    """NormSim_2(v) = sqrt(Σ_x <v,x>²) = sqrt(vᵀ C v) with C = XᵀX (Eq. 3, p = 2), for many calls: C is
    converted to float32 once and the (n, D) product goes into a reused buffer per thread."""

    def __init__(self, moment: np.ndarray):
        self.moment = np.ascontiguousarray(moment, dtype=np.float32)
        self._buffers = _ThreadBuffers()

    def __call__(self, v) -> np.ndarray:
        """(n, D) -> (n,) float32."""
        v = np.asarray(v, dtype=np.float32)
        products = np.matmul(v, self.moment, out=self._buffers.get(len(v), self.moment.shape[1]))
        quad = np.einsum("nd,nd->n", products, v, dtype=np.float32)
        return np.sqrt(np.maximum(quad, 0.0, out=quad), out=quad)


def normsim_2(v: np.ndarray, moment: np.ndarray) -> np.ndarray:
    """NormSim_2(v) = sqrt(vᵀ C v) (Eq. 3, p = 2), one call; see QuadraticForm. (n, D) -> (n,) float32."""
    return QuadraticForm(moment)(v)


def default_nlist(n_target: int) -> int:
    """IVF cluster count for 2·M indexed vectors: ~4·sqrt, but at least 39 training points per cluster."""
    n_indexed = 2 * n_target
    return int(max(1, min(round(4 * math.sqrt(n_indexed)), n_indexed // 39)))


def default_nprobe(nlist: int) -> int:
    return int(max(1, min(nlist, round(nlist / 8))))


class MaxAbsInnerProduct:
    """NormSim_∞(v) = max_x |<v, x>| (Eq. 3, p → ∞), exact, with the target prepared once for many calls.

    float32 V Xᵀ in row tiles into a reused buffer (per thread), then |.| in place and a row max (two passes over
    the tile, as FAISS's top-1 scan after its sgemm). `target`: (M, D) numpy array or torch tensor; a
    tensor on the GPU computes there (torch, aminmax), in tiles of 2^24 products; on the CPU numpy
    tiles of 2^22 products (16 MiB, cache-resident).
    """

    def __init__(self, target, tile_elements: int | None = None):
        import torch

        self.on_gpu = isinstance(target, torch.Tensor) and target.device.type != "cpu"
        if self.on_gpu:
            self.x_t = target.float().t().contiguous()
        else:
            x = target.float().numpy() if isinstance(target, torch.Tensor) else target
            self.x_t = np.ascontiguousarray(np.asarray(x, dtype=np.float32).T)
        if tile_elements is None:
            tile_elements = 1 << 24 if self.on_gpu else 1 << 22
        self.step = max(1, int(tile_elements) // max(1, self.x_t.shape[1]))
        self._buffers = _ThreadBuffers()

    def __call__(self, v) -> np.ndarray:
        """(n, D) -> (n,) float32."""
        rows = np.asarray(v, dtype=np.float32)
        out = np.empty(len(rows), dtype=np.float32)
        if self.on_gpu:
            import torch

            for start in range(0, len(rows), self.step):
                products = torch.from_numpy(rows[start:start + self.step]).to(self.x_t.device) @ self.x_t
                low, high = torch.aminmax(products, dim=1)
                out[start:start + self.step] = torch.maximum(high, -low).cpu().numpy()
            return out
        buffer = self._buffers.get(min(self.step, len(rows)), self.x_t.shape[1])
        for start in range(0, len(rows), self.step):
            block = rows[start:start + self.step]
            products = np.matmul(block, self.x_t, out=buffer[:len(block)])
            np.abs(products, out=products).max(axis=1, out=out[start:start + len(block)])
        return out


def normsim_inf_exact(v, target, tile_elements: int | None = None) -> np.ndarray:
    """NormSim_∞(v) = max_x |<v, x>| (Eq. 3, p → ∞), exact; see MaxAbsInnerProduct. (n, D) -> (n,) float32."""
    return MaxAbsInnerProduct(target, tile_elements)(v)


def normsim_2_direct(v: np.ndarray, target: np.ndarray) -> np.ndarray:
    """NormSim_2(v) = sqrt(Σ_x <v,x>²) (Eq. 3, p = 2) as written, from V Xᵀ: cheaper than the D×D route when M < D."""
    products = np.asarray(v, dtype=np.float32) @ np.asarray(target, dtype=np.float32).T
    quad = np.einsum("nm,nm->n", products, products, dtype=np.float32)
    return np.sqrt(quad, out=quad)


def build_ivf_index(target: np.ndarray, nlist: int | None = None, nprobe: int | None = None, seed: int = 0):
    """FAISS IndexIVFFlat (inner product) over [X; -X], k-means seeded; top-1 search gives ≈ max_x |<v, x>|."""
    import faiss

    x = np.ascontiguousarray(target, dtype=np.float32)
    both = np.ascontiguousarray(np.concatenate([x, -x]))
    nlist = default_nlist(len(x)) if nlist is None else int(nlist)
    if not 1 <= nlist <= len(both):
        raise ValueError(f"nlist must be between 1 and 2·M = {len(both)}, got {nlist}")
    quantizer = faiss.IndexFlatIP(x.shape[1])
    index = faiss.IndexIVFFlat(quantizer, x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = int(seed)
    index.train(both)
    index.nprobe = default_nprobe(nlist) if nprobe is None else int(min(max(1, nprobe), nlist))
    index.add(both)
    return index


def normsim_inf(v: np.ndarray, index) -> np.ndarray:
    """NormSim_∞(v) ≈ max_x |<v, x>| (Eq. 3, p → ∞) by top-1 search of a FAISS index over ±X (`build_ivf_index`)."""
    v = np.ascontiguousarray(v, dtype=np.float32)
    if len(v) == 0:
        return np.empty(0, dtype=np.float32)
    distances, _ = index.search(v, 1)
    # IVF may find no candidate in the probed lists (-inf sentinel); NaN marks "no estimate" honestly.
    out = distances[:, 0].astype(np.float32)
    out[~np.isfinite(out)] = np.nan
    return out


def keep_count(n: int, fraction: float) -> int:
    """⌈fraction·n⌉ with the fraction read as its decimal literal (0.3·10 = 3, not 3.0000000000000004 -> 4)."""
    return min(n, math.ceil(Fraction(repr(float(fraction))) * n))


def top_fraction_mask(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Exactly ⌈fraction·n⌉ highest scores kept; ties at the threshold broken by lower pool index."""
    return top_count_mask(scores, keep_count(len(scores), fraction))


def top_count_mask(scores: np.ndarray, count: int) -> np.ndarray:
    """Exactly `count` highest scores kept; ties at the threshold broken by lower pool index."""
    n = len(scores)
    mask = np.zeros(n, dtype=bool)
    if count <= 0:
        return mask
    threshold = np.partition(scores, n - count)[n - count]
    mask = scores > threshold
    ties = np.flatnonzero(scores == threshold)[: count - int(mask.sum())]
    mask[ties] = True
    return mask


# ---------------------------------------------------------------- NormSim_2-D (the reference's VAS-D loop)

SPLITMIX_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment (Steele et al. 2014; Java's SplittableRandom)
MAX_ITERATIONS = 10_000  # levels 0..T+1 are stored as int16 and encoded exactly in the float32 column


def splitmix64_mix(z) -> np.ndarray:
    """splitmix64's output function (uint64 in, uint64 out, arithmetic mod 2^64); mix(γ) = 0xE220A8397B1DCDAF."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):  # wrapping is the point (numpy warns only on scalars)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def subsample_draws(rows: np.ndarray, seed: int, iteration: int) -> np.ndarray:
    """A uniform uint64 per pool row for iteration t: output `row` of a splitmix64 generator whose state starts at
    output t of a splitmix64 generator seeded with `seed` (counter-based: any row, any task, the same draw)."""
    stream = int(splitmix64_mix(np.uint64((int(seed) + (int(iteration) + 1) * SPLITMIX_GAMMA) % 2**64)))
    rows = np.asarray(rows, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return splitmix64_mix(np.uint64(stream) + (rows + np.uint64(1)) * np.uint64(SPLITMIX_GAMMA))


def subsample_mask(rows: np.ndarray, seed: int, iteration: int, fraction: float) -> np.ndarray:
    """Which of `rows` are in iteration t's subsample: draw < ⌊fraction·2^64⌋ (fraction as its decimal
    literal), a Bernoulli(fraction) sample that needs no other row to decide (in place of the reference's
    unseeded np.random.choice(n, int(0.1·n)) in vas2.py `cal_target_variance`)."""
    if fraction >= 1.0:
        return np.ones(len(rows), dtype=bool)
    threshold = math.floor(Fraction(repr(float(fraction))) * 2**64)
    return subsample_draws(rows, seed, iteration) < np.uint64(threshold)


def nested_sizes(pool_rows: int, candidates: int, final_fraction: float, iterations: int) -> list[int]:
    """|S_0|, ..., |S_T| of the reference's schedule: S_0 = the candidates (the pre-filter's subset), then equal
    chunks c = ⌈(|S_0| − F_N)/T⌉ removed per iteration and the last one down to F_N = ⌈F·N⌉ of the pool
    (vas2.py `load_uids_with_vas_d_filter`: chunk_size and topk; its F_N is int(F·N)).

    The reference computes topk = |S_i| − c without a floor, which undershoots F_N (and fails in torch.topk)
    when (T−1)·c > |S_0| − F_N; here no iteration goes below F_N."""
    target = keep_count(pool_rows, final_fraction)
    if candidates < target:
        raise ValueError(f"the pre-filter keeps {candidates} rows, fewer than the final fraction's {target} "
                         f"(⌈{final_fraction}·{pool_rows}⌉)")
    chunk = -(-(candidates - target) // iterations)
    sizes = [candidates]
    for i in range(iterations):
        sizes.append(target if i == iterations - 1 else max(sizes[-1] - chunk, target))
    return sizes


def normsim_2d_column(levels: np.ndarray, last_scores: np.ndarray) -> np.ndarray:
    """The table's normsim_2d value: level + ½·min(s, 1), float32, so that the top ⌈F·N⌉ rows are the reference's
    subset. Level 0: removed by the pre-filter; i+1: removed in iteration i; T+1: kept to the end. s: the RMS
    inner product sqrt(vᵀ C v / k) with the last subsample target the row was scored against (in [0, 1] for
    unit vectors), which orders rows within a level."""
    last = np.clip(np.asarray(last_scores, dtype=np.float64), 0.0, 1.0)
    return (np.asarray(levels, dtype=np.float64) + 0.5 * last).astype(np.float32)


def normsim_2d(v, iterations: int = 100, final_fraction: float = 0.3, subsample: float = 0.1, seed: int = 0,
               candidates: np.ndarray | None = None, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """NormSim_2-D in memory: the reference's nested VAS-D loop (Wang et al. 2024, Sec. 3.3 and App.; Eq. 3 with
    p = 2 against the pool's own subsample), returning the `normsim_2d_column` values, float32 in pool order.

    C_0 from subsample 0 of the whole pool; S_0 = `candidates` (a bool mask: the pre-filter's subset) or every
    row. Iteration i = 0..T-1: score S_i by sqrt(vᵀ C_i v) with C_i = (1/k) Σ x xᵀ over the k rows of subsample i
    (`subsample_mask`), keep the top |S_{i+1}| (`nested_sizes`; ties by lower pool index), then C_{i+1} from
    subsample i+1 of S_{i+1}. `v`: (N, D) array-like, read `chunk_rows` rows at a time.
    """
    n, dim = v.shape
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"normsim_2d needs 1 <= iterations <= {MAX_ITERATIONS}, got {iterations}")
    if not 0.0 < final_fraction <= 1.0 or not 0.0 < subsample <= 1.0:
        raise ValueError(f"normsim_2d needs fractions in (0, 1], got {final_fraction} and {subsample}")
    alive = np.ones(n, dtype=bool) if candidates is None else np.asarray(candidates, dtype=bool).copy()
    sizes = nested_sizes(n, int(alive.sum()), final_fraction, iterations)
    levels = np.where(alive, iterations + 1, 0).astype(np.int16)
    last = np.zeros(n, dtype=np.float32)
    rows = np.arange(n)
    scored = np.ones(n, dtype=bool)  # iteration 0 scores every row: the removed ones get their level-0 order
    for i in range(iterations):
        moment = np.zeros((dim, dim), dtype=np.float64)
        picked = subsample_mask(rows, seed, i, subsample) & (scored if i == 0 else alive)
        for part in _chunks(n, chunk_rows):
            block = np.asarray(v[part], dtype=np.float32)
            second_moment(block[picked[part]], moment)
        count = int(picked.sum())
        score = QuadraticForm(moment / count if count else moment)
        for part in _chunks(n, chunk_rows):
            chosen = np.flatnonzero((scored if i == 0 else alive)[part]) + part.start
            if len(chosen):
                last[chosen] = score(np.asarray(v[chosen], dtype=np.float32))
        kept = top_count_mask(np.where(alive, last, -np.inf).astype(np.float32), sizes[i + 1]) & alive
        levels[alive & ~kept] = i + 1
        alive = kept
    return normsim_2d_column(levels, last)
