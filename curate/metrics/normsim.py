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
* NormSim_2-D (no target): the pool itself is the target, refined iteratively (see `normsim_2d`).
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
    n = len(scores)
    count = keep_count(n, fraction)
    mask = np.zeros(n, dtype=bool)
    if count == 0:
        return mask
    threshold = np.partition(scores, n - count)[n - count]
    mask = scores > threshold
    ties = np.flatnonzero(scores == threshold)[: count - int(mask.sum())]
    mask[ties] = True
    return mask


def normsim_2d_fractions(iterations: int, final_fraction: float) -> list[float]:
    """Kept fraction before each scoring round: 1, then final^(1/(T-1)), ..., final (geometric)."""
    if iterations == 1:
        return [1.0]
    return [final_fraction ** (t / (iterations - 1)) for t in range(iterations)]


def normsim_2d(v, iterations: int = 4, final_fraction: float = 0.3, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """NormSim_2-D: NormSim_2 with the pool as its own target, refined iteratively (paper Sec. 3.3, "2-D" proxy).

    Round t = 0..T-1 scores every sample with C_t = Σ_{x∈S_t} x xᵀ, where S_0 is the whole pool and S_t
    (t >= 1) the top ⌈f_t·N⌉ samples by round t-1's scores, f_t = final_fraction^(t/(T-1)) (geometric, so
    S_{T-1} is the final fraction). Returns the last round's scores, float32 in pool order. Passes over
    `v`: 1 (C_0) + for each later round 1 (score) + 1 (C_t), + 1 final score: 2T in all.
    `v`: (N, D) array-like (numpy array or memmap), read `chunk_rows` rows at a time.
    """
    if iterations < 1:
        raise ValueError(f"normsim_2d needs iterations >= 1, got {iterations}")
    if not 0.0 < final_fraction <= 1.0:
        raise ValueError(f"normsim_2d needs 0 < final_fraction <= 1, got {final_fraction}")
    n = len(v)
    scores = np.empty(n, dtype=np.float32)
    for round_index, fraction in enumerate(normsim_2d_fractions(iterations, final_fraction)):
        kept = None if round_index == 0 else top_fraction_mask(scores, fraction)
        moment = np.zeros((v.shape[1], v.shape[1]), dtype=np.float64)
        for part in _chunks(n, chunk_rows):
            rows = np.asarray(v[part], dtype=np.float32)
            second_moment(rows if kept is None else rows[kept[part]], moment)
        score = QuadraticForm(moment)  # once per round, not per chunk
        for part in _chunks(n, chunk_rows):
            scores[part] = score(v[part])
    return scores
