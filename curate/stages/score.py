"""`curate score`: CLIPScore and negCLIPLoss of a whole embedding pool -> one Parquet score table.

Passes over the pool (pool order = files sorted by name, rows in file order):
1. s_ii (clipscore) per row, and a check that every embedding is finite and non-zero (one NaN row would
   poison the LSE of its whole batch): streamed from the tables row group by row group, or, when negclip
   is asked for, read back sequentially from its caches (step 2), which is much cheaper than decoding
   the Parquet list columns a second time.
2. negclip only: the image and text columns as fp16 `.npy` caches (`EmbeddingPool.matrix`, built once
   per pool version). For each of K partitions and each of its ⌈N/b⌉ batches, the batch's rows are
   gathered with sorted indices, moved to the device, and the row/column LSE terms computed in float32
   tiles (curate.metrics.negclip). Rows are read with positional reads, not through a memory map (see
   PoolRows), so RSS stays O(b·D + tile) beyond the O(N) output columns: the pool never sits in RAM.
   This is the one global pass; distributed, each (partition, batch) is an independent map task whose
   per-sample terms a reduce sums (see the partition scheme in curate/metrics/negclip.py).
3. Write `uid` + float32 score columns, one row group per input table, atomically, with the parameters
   and the teacher in the `curate` metadata.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.errors import CurateError
from curate.io.atomic import atomic_path
from curate.io.tables import EmbeddingPool, with_meta

METRICS = ("clipscore", "negclip")


def resolve_device(device: str):
    """'auto' -> cuda when present, else cpu (the teachers' rule, curate.models.resolve_device)."""
    from curate.models.teacher import resolve_device as teacher_device

    return teacher_device(device or "auto")


def parse_metrics(metrics: str | Sequence[str]) -> list[str]:
    names = [m.strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics)]
    names = list(dict.fromkeys(m for m in names if m))
    if not names:
        raise CurateError(f"no metric given; use one or more of {', '.join(METRICS)}")
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise CurateError(f"unknown metric {', '.join(unknown)}; `curate score` computes {', '.join(METRICS)} "
                          "(NormSim is `curate normsim`)")
    return names


def pool_location(pool: EmbeddingPool, row: int) -> tuple[Path, int, str]:
    """(file, row within file, uid) of a pool row, for error messages."""
    ends = np.cumsum(pool.file_rows)
    index = int(np.searchsorted(ends, row, side="right"))
    within = row - (int(ends[index - 1]) if index else 0)
    uid = pq.read_table(pool.files[index], columns=["uid"]).column("uid")[within].as_py()
    return pool.files[index], within, uid


def check_finite(pool: EmbeddingPool, rows: np.ndarray, first_row: int, column: str) -> None:
    """A non-finite or zero-norm embedding is a user error naming the table and uid (re-embed it or drop the table).

    Zero-norm rows are finite but not L2-normalised: every score of them would be a silent 0.
    """
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        file, within, uid = pool_location(pool, first_row + bad)
        raise CurateError(f"{file}: {column} of row {within} (uid {uid}) is not finite "
                          f"({int((~finite).sum())} non-finite rows in this block); re-embed that shard or remove the table")
    zero = ~np.any(rows, axis=1)
    if zero.any():
        bad = int(np.flatnonzero(zero)[0])
        file, within, uid = pool_location(pool, first_row + bad)
        raise CurateError(f"{file}: {column} of row {within} (uid {uid}) is all zeros (norm 0, not L2-normalised); "
                          f"{int(zero.sum())} such rows in this chunk; re-embed that shard or remove the table")


class PoolRows:
    """An (N, D) fp16 column of a pool, read from its `.npy` cache by slices or sorted index arrays.

    Rows are read with positional reads (preadv) straight into the output array, one call per run of
    consecutive rows, not through a memory map: gathering random rows from a mapping faults in whole
    page-cache folios (up to 2 MiB each) around every row and RSS would grow to the file's size. Here RSS
    holds only what a read returns; the file's pages stay in the OS page cache. Every read is checked
    for non-finite and all-zero rows.
    """

    _fd = None  # set last in __init__; __del__ must not fail when __init__ did

    def __init__(self, pool: EmbeddingPool, column: str, cache_dir: str | Path):
        self.pool, self.column = pool, column
        cached = pool.matrix(column, cache_dir)
        self.path = Path(cached.filename)
        self.shape, self.dtype, self._offset = cached.shape, cached.dtype, int(cached.offset)
        del cached
        self._row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(self.shape[0])
            if step != 1:
                raise ValueError("PoolRows slices must have step 1")
            rows = np.arange(start, max(start, stop))
        else:
            rows = np.asarray(index, dtype=np.int64)
        out = np.empty((len(rows),) + tuple(self.shape[1:]), self.dtype)
        if len(rows):
            buffer, fd, preadv = memoryview(out).cast("B"), self._fd, os.preadv
            # runs of consecutive rows: file offsets and output byte ranges computed in numpy, so that the
            # Python loop (one iteration per run, ~1 per row for random batches) only issues the reads
            breaks = np.flatnonzero(np.diff(rows) != 1) + 1
            starts = np.concatenate(([0], breaks)) * self._row_bytes
            ends = np.concatenate((breaks, [len(rows)])) * self._row_bytes
            offsets = self._offset + rows[np.concatenate(([0], breaks))] * self._row_bytes
            for offset, a, b in zip(offsets.tolist(), starts.tolist(), ends.tolist()):
                if preadv(fd, [buffer[a:b]], offset) != b - a:
                    raise CurateError(f"{self.path}: cache file is shorter than expected; delete it and rerun")
        if out.dtype == np.float16 and out.ndim == 2:
            # one integer pass instead of isfinite + any (25x faster): the magnitude bits of an fp16 are
            # >= 0x7C00 exactly for inf and NaN, and a row whose largest magnitude is 0 is all (±)zeros
            magnitude = np.bitwise_and(out.view(np.uint16), 0x7FFF).max(axis=1, initial=0)
            usable = (magnitude < 0x7C00) & (magnitude > 0)
        else:
            usable = np.isfinite(out).all(axis=1) & out.any(axis=1)
        if not usable.all():
            bad = int(np.flatnonzero(~usable)[0])
            check_finite(self.pool, out[bad:bad + 1], int(rows[bad]), self.column)
        return out


def write_score_table(pool: EmbeddingPool, columns: dict[str, np.ndarray], out: str | Path, meta: dict) -> Path:
    """`uid` + float32 columns, one row group per input table (uids read one table at a time), atomically."""
    out = Path(out)
    fields = [pa.field("uid", pa.string())] + [pa.field(name, pa.float32()) for name in columns]
    schema = with_meta(pa.table({f.name: pa.array([], f.type) for f in fields}), meta).schema
    start = 0
    with atomic_path(out) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd", write_statistics=False) as writer:
            for file, n in zip(pool.files, pool.file_rows):
                uids = pq.read_table(file, columns=["uid"]).column("uid")
                arrays = [uids] + [pa.array(np.asarray(col[start:start + n], dtype=np.float32)) for col in columns.values()]
                writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
                start += n
    return out


def clipscore_pass(pool: EmbeddingPool) -> np.ndarray:
    """Pass 1: s_ii of every row, streamed; also rejects non-finite embeddings."""
    from curate.metrics.clipscore import clipscore

    s_ii = np.empty(pool.n_rows, dtype=np.float32)
    row = 0
    for _, chunk in pool.iter_chunks(["image_embedding", "text_embedding"], dtype=np.float16):
        image, text = chunk["image_embedding"], chunk["text_embedding"]
        check_finite(pool, image, row, "image_embedding")
        check_finite(pool, text, row, "text_embedding")
        s_ii[row:row + len(image)] = clipscore(image, text)
        row += len(image)
    return s_ii


def clipscore_from_rows(image: PoolRows, text: PoolRows, chunk_rows: int = 1 << 13) -> np.ndarray:
    """s_ii of every row from the `.npy` caches, read in sequential slices (every read is checked by PoolRows).

    When negclip builds the caches anyway, this replaces the Parquet pass: decoding the Parquet list
    columns costs far more than reading the same rows back from the cache.
    """
    from curate.metrics.clipscore import clipscore

    s_ii = np.empty(len(image), dtype=np.float32)
    for start in range(0, len(image), chunk_rows):
        s_ii[start:start + chunk_rows] = clipscore(image[start:start + chunk_rows], text[start:start + chunk_rows])
    return s_ii


def default_cache_dir(out: str | Path) -> Path:
    """The fp16 memmap caches live beside the output unless told otherwise."""
    return Path(out).parent / ".curate-cache"


def score(emb_dir: str | Path, metrics: str | Sequence[str] = METRICS, out: str | Path = "scores.parquet",
          k: int = 10, batch_size: int = 32768, seed: int = 0, device: str = "auto",
          cache_dir: str | Path | None = None, progress: Callable[[int], None] | None = None) -> dict:
    """Score a pool and write `out`; returns a summary {rows, seconds, rows_per_s, out, metrics, ...}."""
    from curate.metrics.negclip import effective_batch_size, negclip_from_lse_sum, negclip_lse_sum

    started = time.perf_counter()
    names = parse_metrics(metrics)
    if "negclip" in names:
        if int(k) < 1:
            raise CurateError(f"--k must be >= 1 (number of random partitions), got {k}")
        if int(batch_size) < 1:
            raise CurateError(f"--batch-size must be >= 1, got {batch_size}")
    torch_device = resolve_device(device)
    pool = EmbeddingPool(emb_dir)
    n = pool.n_rows
    if n == 0:
        raise CurateError(f"{emb_dir}: the pool has no rows; nothing to score")

    if "negclip" in names:
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(out)
        image = PoolRows(pool, "image_embedding", cache)
        text = PoolRows(pool, "text_embedding", cache)
        s_ii = clipscore_from_rows(image, text)
    else:
        s_ii = clipscore_pass(pool)
    if progress:
        progress(n)
    columns: dict[str, np.ndarray] = {}
    params: dict = {"metrics": names}
    if "clipscore" in names:
        columns["clipscore"] = s_ii
    if "negclip" in names:
        b = effective_batch_size(n, batch_size)
        lse_sum = negclip_lse_sum(image, text, pool.teacher.logit_scale, int(k), int(batch_size), int(seed),
                                  torch_device, on_batch=progress)
        columns["negclip"] = negclip_from_lse_sum(s_ii, lse_sum, pool.teacher.logit_scale, int(k))
        del lse_sum
        params.update({"k": int(k), "batch_size": int(batch_size), "effective_batch_size": b, "seed": int(seed),
                       "batches_per_partition": -(-n // b),
                       "partition_scheme": "numpy default_rng([seed, k]).permutation; ragged batch filled by "
                                           "rng.choice (curate.metrics.negclip)",
                       "numpy": np.__version__})
    params["device"] = torch_device.type
    meta = {"stage": "score", "teacher": pool.teacher.to_dict(), "source": str(emb_dir), "n_rows": n,
            "params": params}
    write_score_table(pool, columns, out, meta)
    seconds = time.perf_counter() - started
    return {"out": str(out), "rows": n, "metrics": names, "seconds": seconds,
            "rows_per_s": n / seconds if seconds > 0 else float("inf"), "params": params,
            "teacher": pool.teacher.to_dict()}
