"""negCLIPLoss: CLIPScore minus the CLIP loss's normalisation term, averaged over K random batchings (pure math).

negCLIPLoss_i = s_ii - (τ / 2K) · Σ_{k=1..K} [ LSE_{j∈B_k(i)}(s_ij/τ) + LSE_{j∈B_k(i)}(s_ji/τ) ]

(Wang et al., "CLIPLoss and Norm-Based Data Selection Methods for Multimodal Contrastive Learning",
NeurIPS 2024, Eq. 2), with s_ij = <v_i, t_j> of L2-normalised image (v) and text (t) embeddings and
τ = 1 / logit_scale of the teacher. Since i ∈ B_k(i), each LSE is >= s_ii/τ, hence negCLIPLoss_i <= 0.

Partition and seed scheme (exact; the same seed gives identical partitions for a given numpy version):

* N = pool size (pool order = files sorted by name, rows in file order), b = min(B, N) the batch size.
* Partition k (k = 0..K-1) uses its own generator ``rng = numpy.random.default_rng([seed, k])``, so any
  partition can be rebuilt on its own (map/reduce: one task per (k, batch), a sum as the reduce).
* ``perm = rng.permutation(N)``. With F = N // b full batches, batch m (m < F) is ``perm[m*b:(m+1)*b]``.
* If r = N - F*b > 0, the last batch holds the r samples ``perm[F*b:]`` ("own" members) plus b - r
  "fill" samples ``perm[:F*b][rng.choice(F*b, b - r, replace=False)]`` drawn next from the same rng:
  distinct, and none of them already in that batch. Every normalisation term thus sums over exactly b terms.
  Fill samples only serve as negatives there; their own term of partition k comes from their own full batch.
* Within a batch the member order does not matter (LSE is a sum), so members are sorted, which makes the
  gather from a memory-mapped pool sequential.

Numerics: logits s/τ reach ±100 for OpenAI's teachers, so exp() is never taken of fp16 and never without
max-subtraction: each batch is computed in float32 with ``torch.logsumexp`` (max-subtracted), in row tiles
of at most `tile_elements` logits; column LSEs of the tiles are merged with ``torch.logaddexp``. Peak memory
per batch is O(b·D + tile), never O(b²) unless the tile is b², and never O(N²). Per-sample sums of the 2K
terms are kept in float64.

Map/reduce (distributed runs, curate/stages/score/tasks.py): the K·⌈N/b⌉ (partition, batch) pairs, in flat order
p = partition·⌈N/b⌉ + batch, are cut into T contiguous spans (`task_spans`). A map task computes its
span's terms (`span_terms`: the float32 row+column LSE of every *own* member, batch by batch, members in
sorted order); the members themselves are rebuilt from the seed, so only the terms are stored. The reduce
(`reduce_span_terms`) walks the batches in the same flat order as `negclip_lse_sum` and adds the terms in
float64, so each sample's sum sees the same additions in the same order: the result is bitwise equal to
the in-process sum (the float32 → float64 conversion is exact). Measured on CPU (MKL sgemm, 1 to 16
threads, b up to 8192, D up to 1024): `batch_lse` gives bitwise identical terms for every thread count,
so map tasks may run with any number of torch threads. (Not measured on GPU; terms from different
devices agree only to float tolerance.)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from curate.metrics.clipscore import clipscore

# Logits per tile: 2^24 float32 = 64 MiB (torch.logsumexp needs about twice that as scratch).
DEFAULT_TILE_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Batch:
    """One batch of one partition: sorted pool indices, and which of them take their term from this batch."""

    members: np.ndarray  # (b,) int64, sorted
    own: np.ndarray  # (b,) bool; False only for fill samples of the ragged last batch


def effective_batch_size(n: int, batch_size: int) -> int:
    """b = min(B, N): a batch size larger than the pool means one batch of the whole pool."""
    return min(int(batch_size), int(n))


def batches_per_partition(n: int, batch_size: int) -> int:
    """⌈N/b⌉: F full batches, plus the ragged one when b does not divide N."""
    b = effective_batch_size(n, batch_size)
    return -(-int(n) // b) if b > 0 else 0


def partition_batches(n: int, batch_size: int, seed: int, partition: int, first: int = 0,
                      stop: int | None = None) -> Iterator[Batch]:
    """The batches of partition `partition` of a pool of `n` samples (scheme in the module docstring).

    `first`, `stop`: only batches first..stop-1 of the partition (a map task's share); the others are not built.
    """
    b = effective_batch_size(n, batch_size)
    if n <= 0 or b <= 0:
        return
    rng = np.random.default_rng([int(seed), int(partition)])
    perm = rng.permutation(n)
    full = n // b
    stop = batches_per_partition(n, batch_size) if stop is None else int(stop)
    for m in range(max(0, int(first)), min(full, stop)):
        members = np.sort(perm[m * b:(m + 1) * b])
        yield Batch(members, np.ones(b, dtype=bool))
    ragged = n - full * b
    if ragged and first <= full < stop:
        own = perm[full * b:]
        fill = perm[:full * b][rng.choice(full * b, b - ragged, replace=False)]
        members = np.concatenate([own, fill])
        is_own = np.concatenate([np.ones(ragged, dtype=bool), np.zeros(b - ragged, dtype=bool)])
        order = np.argsort(members, kind="stable")
        yield Batch(members[order], is_own[order])


def batch_lse(image: torch.Tensor, text: torch.Tensor, logit_scale: float,
              tile_elements: int = DEFAULT_TILE_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column log-sum-exps of the batch logits L = logit_scale · V Tᵀ, in float32.

    Returns (row, col) with row_i = LSE_j(s_ij/τ) and col_i = LSE_j(s_ji/τ) (the two terms of Eq. 2).
    `image`, `text`: (b, D) tensors on the compute device, any float dtype.
    """
    # Scaling the b×D rows once is cheaper than scaling every b×b tile.
    image = image.float() * float(logit_scale)
    text_t = text.float().t()
    b = image.shape[0]
    rows_per_tile = max(1, int(tile_elements) // max(b, 1))
    row = torch.empty(b, dtype=torch.float32, device=image.device)
    col = torch.full((text_t.shape[1],), float("-inf"), dtype=torch.float32, device=image.device)
    for start in range(0, b, rows_per_tile):
        logits = image[start:start + rows_per_tile] @ text_t
        row[start:start + rows_per_tile] = torch.logsumexp(logits, dim=1)
        col = torch.logaddexp(col, torch.logsumexp(logits, dim=0))
        del logits
    return row, col


def lse_terms(image, text, batches: Iterable[Batch], logit_scale: float, device: str | torch.device = "cpu",
              tile_elements: int = DEFAULT_TILE_ELEMENTS,
              on_batch: Callable[[int], None] | None = None) -> Iterator[tuple[Batch, np.ndarray]]:
    """(batch, float32 row+column LSE term of every member) for each batch, in the given order.

    `image`, `text`: (N, D) arrays indexable by sorted integer arrays (numpy arrays, memmaps or PoolRows;
    fp16 is fine, rows are converted to float32 on `device`). Rows of the next batch are gathered in a
    background thread while the current batch computes. `on_batch(n)` is called after each batch with the
    number of samples whose term it gives (a ragged batch's fill rows not counted: K partitions count K·N).
    """
    device = torch.device(device)

    def gather(batch: Batch):
        v = torch.from_numpy(np.ascontiguousarray(image[batch.members]))
        t = torch.from_numpy(np.ascontiguousarray(text[batch.members]))
        return batch, v, t

    with ThreadPoolExecutor(max_workers=1) as prefetch:
        batches = iter(batches)
        pending = None
        first = next(batches, None)
        if first is not None:
            pending = prefetch.submit(gather, first)
        while pending is not None:
            batch, v, t = pending.result()
            following = next(batches, None)
            pending = prefetch.submit(gather, following) if following is not None else None
            row, col = batch_lse(v.to(device), t.to(device), logit_scale, tile_elements)
            yield batch, (row + col).cpu().numpy()
            if on_batch is not None:
                on_batch(int(batch.own.sum()))  # the samples whose term this batch gives (fill rows excluded)


def negclip_lse_sum(image, text, logit_scale: float, k: int, batch_size: int, seed: int,
                    device: str | torch.device = "cpu", tile_elements: int = DEFAULT_TILE_ELEMENTS,
                    on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """Σ_k [row LSE + column LSE] per sample (float64, pool order): the map+reduce core of negCLIPLoss.

    In one process: every batch of every partition in flat order (see `lse_terms` for the arguments).
    """
    n = len(image)
    if len(text) != n:
        raise ValueError(f"image and text have different row counts: {n} vs {len(text)}")
    sums = np.zeros(n, dtype=np.float64)
    all_batches = span_batches(n, batch_size, seed, 0, k * batches_per_partition(n, batch_size))
    for batch, terms in lse_terms(image, text, all_batches, logit_scale, device, tile_elements, on_batch):
        # Members are distinct within a batch, so plain fancy-index accumulation is exact.
        sums[batch.members[batch.own]] += terms[batch.own].astype(np.float64)
    return sums


# ---------------------------------------------------------------- map/reduce over spans of batches

def task_spans(n: int, batch_size: int, k: int, tasks: int) -> list[tuple[int, int]]:
    """The K·⌈N/b⌉ flat (partition, batch) indices cut into min(tasks, K·⌈N/b⌉) contiguous [start, stop) spans.

    Sizes differ by at most one batch; the same arguments give the same spans on every machine.
    """
    pairs = int(k) * batches_per_partition(n, batch_size)
    count = max(1, min(int(tasks), pairs)) if pairs else 0
    bounds = [pairs * t // count for t in range(count + 1)]
    return [(bounds[t], bounds[t + 1]) for t in range(count)]


def span_batches(n: int, batch_size: int, seed: int, start: int, stop: int) -> Iterator[Batch]:
    """The batches with flat index start..stop-1 (p = partition·⌈N/b⌉ + batch), in that order."""
    per = batches_per_partition(n, batch_size)
    if per == 0:
        return
    for partition in range(start // per, -(-stop // per)):
        first = max(start - partition * per, 0)
        last = min(stop - partition * per, per)
        yield from partition_batches(n, batch_size, seed, partition, first, last)


def span_own_count(n: int, batch_size: int, start: int, stop: int) -> int:
    """How many own terms the batches start..stop-1 hold (b per full batch, N mod b for the ragged one)."""
    b = effective_batch_size(n, batch_size)
    per = batches_per_partition(n, batch_size)
    ragged = n - (n // b) * b if b > 0 else 0
    if not ragged:
        return (stop - start) * b
    # the ragged batches are the flat indices p with p + 1 a multiple of per
    ragged_batches = stop // per - start // per
    return (stop - start - ragged_batches) * b + ragged_batches * ragged


def span_terms(image, text, logit_scale: float, batch_size: int, seed: int, start: int, stop: int,
               device: str | torch.device = "cpu", tile_elements: int = DEFAULT_TILE_ELEMENTS,
               on_batch: Callable[[int], None] | None = None) -> Iterator[np.ndarray]:
    """Map: per batch of the span (in order), the float32 terms of its own members (sorted member order)."""
    n = len(image)
    batches = span_batches(n, batch_size, seed, start, stop)
    for batch, terms in lse_terms(image, text, batches, logit_scale, device, tile_elements, on_batch):
        yield np.ascontiguousarray(terms[batch.own], dtype=np.float32)


def reduce_span_terms(n: int, batch_size: int, seed: int, spans: Sequence[tuple[int, int]],
                      open_span: Callable[[int], Callable[[int], np.ndarray]]) -> np.ndarray:
    """Reduce: Σ of every sample's terms (float64, pool order) from the spans' stored terms.

    `open_span(t)` returns `take(count)`, which gives the next `count` stored terms of span t (all of them
    concatenated as `span_terms` produced them). The batches are walked in the flat order of
    `negclip_lse_sum` and added the same way, so the sums are bitwise equal to it.
    """
    sums = np.zeros(n, dtype=np.float64)
    for index, (start, stop) in enumerate(spans):
        take = open_span(index)
        for batch in span_batches(n, batch_size, seed, start, stop):
            owners = batch.members[batch.own]
            terms = take(len(owners))
            if len(terms) != len(owners):
                raise ValueError(f"span {index}: fewer stored terms than the partition scheme's batches hold")
            sums[owners] += terms.astype(np.float64)
        if len(take(1)):
            raise ValueError(f"span {index}: more stored terms than the partition scheme's batches hold")
    return sums


def negclip_from_lse_sum(s_ii: np.ndarray, lse_sum: np.ndarray, logit_scale: float, k: int) -> np.ndarray:
    """negCLIPLoss_i = s_ii - (τ/2K) · lse_sum_i (Eq. 2), as float32."""
    tau = 1.0 / float(logit_scale)
    return (np.asarray(s_ii, dtype=np.float64) - tau / (2 * k) * lse_sum).astype(np.float32)


def negclip(image, text, logit_scale: float, k: int = 10, batch_size: int = 32768, seed: int = 0,
            device: str | torch.device = "cpu", tile_elements: int = DEFAULT_TILE_ELEMENTS) -> np.ndarray:
    """negCLIPLoss of every sample (Wang et al. 2024, Eq. 2), float32 in pool order; see module docstring."""

    if k < 1 or batch_size < 1:
        raise ValueError(f"negclip needs k >= 1 and batch_size >= 1, got k={k}, batch_size={batch_size}")
    n = len(image)
    s_ii = np.empty(n, dtype=np.float32)
    step = 1 << 16
    for start in range(0, n, step):
        s_ii[start:start + step] = clipscore(image[start:start + step], text[start:start + step])
    sums = negclip_lse_sum(image, text, logit_scale, k, batch_size, seed, device, tile_elements)
    return negclip_from_lse_sum(s_ii, sums, logit_scale, k)
