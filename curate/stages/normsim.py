"""`curate normsim`: NormSim_∞ / NormSim_2 / NormSim_2-D of a pool's image embeddings -> Parquet table.

Passes over the pool:
* p = inf and p = 2: one streaming pass in bounded blocks (`EmbeddingPool.iter_chunks`), or from the pool's
  fp16 `.npy` image cache when `curate score` already built one in the cache directory. The target
  is small: for inf the (M, D) matrix on the device (exact, tiled V Xᵀ with a max-|.| reduction) or a
  FAISS IVF index over ±X (`--index ivf`); for 2 the D×D second moment.
* p = 2d: the pool is its own target, refined over T rounds (curate.metrics.normsim.normsim_2d), which reads
  the fp16 memory-mapped image column 2T times (one second-moment pass and one scoring pass per round).
  This is a global step; distributed, each second moment is a per-shard partial sum (map) added up (reduce),
  and the keep threshold between rounds needs the global score column (or a quantile sketch).
Output: `uid` + `normsim_inf` | `normsim_2` | `normsim_2d` (float32), one row group per input table.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from curate.errors import CurateError
from curate.io.prefetch import prefetch
from curate.io.tables import READ_BATCH_ROWS, EmbeddingPool, to_float32
from curate.stages.score import PoolRows, check_finite, default_cache_dir, write_score_table

P_VALUES = ("inf", "2", "2d")
INDEX_KINDS = ("flat", "ivf")
DEFAULT_ITERATIONS = 4
DEFAULT_FINAL_FRACTION = 0.3


def parse_p(p) -> str:
    """'inf' | '2' | '2d' (also accepts 2, float('inf'), '∞')."""
    text = str(p).strip().lower()
    text = {"∞": "inf", "infinity": "inf", "2.0": "2", "2-d": "2d"}.get(text, text)
    if text not in P_VALUES:
        raise CurateError(f"--p must be one of inf, 2, 2d, got {p!r}")
    return text


def column_name(p: str) -> str:
    return f"normsim_{parse_p(p)}"


def _check_options(p: str, target_spec, index: str, iterations: int, final_fraction: float) -> None:
    if p == "2d":
        if target_spec not in (None, "none"):
            raise CurateError(f"--p 2d uses the pool itself as target; pass --target none (got {target_spec!r})")
        if int(iterations) < 1:
            raise CurateError(f"--iterations must be >= 1, got {iterations}")
        if not 0.0 < float(final_fraction) <= 1.0:
            raise CurateError(f"--final-fraction must be in (0, 1], got {final_fraction}")
    elif target_spec in (None, "none"):
        raise CurateError(f"--p {p} needs a target: an embedding directory, a .npy/.parquet matrix, or imagenet "
                          "(only --p 2d works without one)")
    if index not in INDEX_KINDS:
        raise CurateError(f"--index must be flat or ivf, got {index!r}")


def normsim_scores(pool: EmbeddingPool, target_spec, p, index: str = "flat", nlist: int | None = None,
                   nprobe: int | None = None, iterations: int = DEFAULT_ITERATIONS,
                   final_fraction: float = DEFAULT_FINAL_FRACTION, device: str = "auto",
                   cache_dir: str | Path | None = None, templates: str = "openai",
                   progress: Callable[[int], None] | None = None, info: dict | None = None,
                   memmap_dir: str | Path | None = None) -> np.ndarray:
    """NormSim_p of every pool row against `target_spec`, float32 in pool order (for `curate filter` too).

    `cache_dir`: where the imagenet target is cached (default ~/.cache/curate or $CURATE_CACHE).
    `memmap_dir`: where p=2d keeps the pool's fp16 memmap (default: cache_dir, else `<pool dir>/.curate-cache`).
    `info`, when given, receives what was used (target rows and hash, index parameters) for metadata.
    """
    from curate.io.targets import load_target
    from curate.metrics import normsim as ns

    p = parse_p(p)
    _check_options(p, target_spec, index, iterations, final_fraction)
    info = {} if info is None else info
    n = pool.n_rows
    if n == 0:
        raise CurateError(f"{pool.files[0].parent}: the pool has no rows; nothing to score")
    if p == "2d":
        memmap_dir = memmap_dir or cache_dir or pool.files[0].parent / ".curate-cache"
        rows = PoolRows(pool, "image_embedding", memmap_dir)
        scores = ns.normsim_2d(rows, int(iterations), float(final_fraction))
        info.update({"target": "none", "iterations": int(iterations), "final_fraction": float(final_fraction),
                     "kept_fractions": ns.normsim_2d_fractions(int(iterations), float(final_fraction))})
        if progress:
            progress(n)
        return scores

    from curate.stages.score import resolve_device

    # torch (and a device) only where needed: the exact p=inf product and embedding the imagenet prompts.
    needs_device = (p == "inf" and index == "flat") or str(target_spec) == "imagenet"
    torch_device = resolve_device(device) if needs_device else None
    target = load_target(target_spec, pool.teacher, device=str(torch_device or "cpu"), cache_dir=cache_dir,
                         templates=templates)
    info.update({"target": str(target_spec), "target_rows": int(len(target)),
                 "target_sha256": hashlib.sha256(target.tobytes()).hexdigest()[:16]})
    if str(target_spec) == "imagenet":
        info["templates"] = templates
    if p == "inf" and index == "flat":
        import torch

        score_chunk = ns.MaxAbsInnerProduct(torch.from_numpy(target).to(torch_device))
        info.update({"index": "flat", "device": torch_device.type})
    elif p == "inf":
        try:
            faiss_index = ns.build_ivf_index(target, nlist, nprobe)
        except ValueError as exc:
            raise CurateError(f"--index ivf: {exc}") from None
        info.update({"index": "ivf", "nlist": int(faiss_index.nlist), "nprobe": int(faiss_index.nprobe)})
        score_chunk = lambda rows: ns.normsim_inf(rows, faiss_index)  # noqa: E731
    elif len(target) < pool.dim:  # Σ_x <v,x>² straight from V Xᵀ costs M < D products per row
        info["route"] = "direct"
        score_chunk = lambda rows: ns.normsim_2_direct(rows, target)  # noqa: E731
    else:
        info["route"] = "second moment"
        moment = ns.second_moment(target).astype(np.float32)
        score_chunk = lambda rows: ns.normsim_2(rows, moment)  # noqa: E731

    scores = np.empty(n, dtype=np.float32)
    row = 0
    for rows in prefetch(_image_blocks(pool, memmap_dir)):
        scores[row:row + len(rows)] = score_chunk(rows)
        row += len(rows)
        if progress:
            progress(len(rows))
    return scores


def _image_blocks(pool: EmbeddingPool, memmap_dir: str | Path | None) -> Iterator[np.ndarray]:
    """The pool's image embeddings as float32 blocks in pool order, each checked (finite, non-zero).

    From the fp16 `.npy` cache when one for this pool version already exists in `memmap_dir` (e.g. built by
    `curate score` for negclip): sequential reads, far cheaper than decoding the Parquet list column.
    Otherwise streamed from the tables; no cache is built for this one pass. Blocks are converted into a
    ring of 3 reused buffers (the caller's block, the next one, the one being read ahead by `prefetch`):
    a block is valid until the caller asks for the block after the next.
    """
    ring = [np.empty((READ_BATCH_ROWS, pool.dim), dtype=np.float32) for _ in range(3)]
    if memmap_dir is not None and pool.cache_file("image_embedding", memmap_dir).exists():
        rows = PoolRows(pool, "image_embedding", memmap_dir)  # checks every read
        # the same blocks as streaming the tables (per table, READ_BATCH_ROWS each): a BLAS product's
        # rounding can depend on the block's row count, and both sources must give the same bytes
        starts = np.cumsum([0] + pool.file_rows[:-1])
        blocks = [(int(first) + offset, min(READ_BATCH_ROWS, rows_in_file - offset))
                  for first, rows_in_file in zip(starts, pool.file_rows)
                  for offset in range(0, rows_in_file, READ_BATCH_ROWS)]
        for number, (start, count) in enumerate(blocks):
            yield to_float32(rows[start:start + count], out=ring[number % 3])
        rows.close()
        return
    row = 0
    for number, (_, chunk) in enumerate(pool.iter_chunks(["image_embedding"], dtype=np.float16)):
        block = chunk["image_embedding"]
        check_finite(pool, block, row, "image_embedding")
        row += len(block)
        yield to_float32(block, out=ring[number % 3])


def normsim(emb_dir: str | Path, target: str | None, p, out: str | Path, index: str = "flat",
            nlist: int | None = None, nprobe: int | None = None, iterations: int = DEFAULT_ITERATIONS,
            final_fraction: float = DEFAULT_FINAL_FRACTION, device: str = "auto",
            cache_dir: str | Path | None = None, templates: str = "openai",
            progress: Callable[[int], None] | None = None) -> dict:
    """Compute one NormSim column for the pool in `emb_dir` and write `out`; returns a summary."""
    started = time.perf_counter()
    p = parse_p(p)
    pool = EmbeddingPool(emb_dir)
    info: dict = {}
    scores = normsim_scores(pool, target, p, index, nlist, nprobe, iterations, final_fraction, device,
                            cache_dir, templates, progress, info,
                            memmap_dir=cache_dir if cache_dir is not None else default_cache_dir(out))
    name = column_name(p)
    params = {"p": p, **info}
    meta = {"stage": "normsim", "teacher": pool.teacher.to_dict(), "source": str(emb_dir),
            "n_rows": pool.n_rows, "params": params}
    write_score_table(pool, {name: scores}, out, meta)
    seconds = time.perf_counter() - started
    return {"out": str(out), "rows": pool.n_rows, "column": name, "seconds": seconds,
            "rows_per_s": pool.n_rows / seconds if seconds > 0 else float("inf"), "params": params,
            "missing": int(np.isnan(scores).sum())}
