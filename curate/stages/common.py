"""What several stages share: reading a pool's fp16 caches (PoolRows), the checks on embedding rows, the
score-table writer, where a stage keeps its caches, and per-row fields of a pool named `column:NAME` or
`json:PATH` (`--labels`, `--truth`, `--group-by`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.errors import CurateError
from curate.io.atomic import atomic_path, sweep_stale_temps
from curate.io.tables import EmbeddingPool, with_meta
from curate.metrics.clipscore import clipscore


def pool_cache_dir(out: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where a stage keeps the pool's fp16 `.npy` caches: `cache_dir` when given, else beside its output (so
    that score, normsim, clones and pcme writing into one directory share them)."""
    return Path(cache_dir) if cache_dir is not None else Path(out).parent / ".curate-cache"


def open_nonempty_pool(emb, what: str, progress=None) -> EmbeddingPool:
    """The embedding pool at `emb`; a pool without rows is an error ("nothing to `what`"); a progress bar that
    takes a total gets the pool's row count."""
    pool = EmbeddingPool(emb)
    if pool.n_rows == 0:
        raise CurateError(f"{emb}: the pool has no rows; nothing to {what}")
    if hasattr(progress, "set_total"):
        progress.set_total(pool.n_rows)
    return pool


def pool_location(pool: EmbeddingPool, row: int) -> tuple[Path, int, str]:
    """(file, row within file, uid) of a pool row, for error messages."""
    ends = np.cumsum(pool.file_rows)
    index = int(np.searchsorted(ends, row, side="right"))
    within = row - (int(ends[index - 1]) if index else 0)
    uid = pq.read_table(pool.files[index], columns=["uid"]).column("uid")[within].as_py()
    return pool.files[index], within, uid


def usable_rows(rows: np.ndarray) -> np.ndarray:
    """Per row of an (n, D) block: finite and not all zeros.

    For fp16 one integer pass instead of isfinite + any (14x faster: numpy's fp16 ufuncs convert every
    value): the magnitude bits of an fp16 are >= 0x7C00 exactly for inf and NaN, and a row whose largest
    magnitude is 0 is all (±)zeros.
    """
    if rows.dtype == np.float16 and rows.ndim == 2:
        magnitude = np.bitwise_and(rows.view(np.uint16), 0x7FFF).max(axis=1, initial=0)
        return (magnitude < 0x7C00) & (magnitude > 0)
    return np.isfinite(rows).all(axis=1) & rows.any(axis=1)


def check_finite(pool: EmbeddingPool, rows: np.ndarray, first_row: int, column: str) -> None:
    """A non-finite or zero-norm embedding is a user error naming the table and uid (re-embed it or drop the table).

    Zero-norm rows are finite but not L2-normalised: every score of them would be a silent 0.
    """
    if usable_rows(rows).all():  # the usual case, checked cheaply; the messages below need the details
        return
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
        return self.read(index)

    def read(self, index, out: np.ndarray | None = None) -> np.ndarray:
        """Rows `index` (a step-1 slice or an index array), read into `out` (reused: a fresh array of a few MiB
        costs more in page faults than its reads) or a new array; returns the filled rows."""
        if isinstance(index, slice):
            start, stop, step = index.indices(self.shape[0])
            if step != 1:
                raise ValueError("PoolRows slices must have step 1")
            rows = np.arange(start, max(start, stop))
        else:
            rows = np.asarray(index, dtype=np.int64)
        if out is None:
            out = np.empty((len(rows),) + tuple(self.shape[1:]), self.dtype)
        else:
            out = out[:len(rows)]
            if out.dtype != self.dtype or out.shape[1:] != tuple(self.shape[1:]) or not out.flags.c_contiguous:
                raise ValueError(f"out must be C-contiguous {self.dtype} rows of shape {self.shape[1:]}")
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
        usable = usable_rows(out)
        if not usable.all():
            bad = int(np.flatnonzero(~usable)[0])
            check_finite(self.pool, out[bad:bad + 1], int(rows[bad]), self.column)
        return out


def write_score_table(pool: EmbeddingPool, columns: dict[str, np.ndarray], out: str | Path, meta: dict) -> Path:
    """`uid` + float32 columns, one row group per input table (uids read one table at a time), atomically."""
    out = Path(out)
    fields = [pa.field("uid", pa.string())] + [pa.field(name, pa.float32()) for name in columns]
    schema = with_meta(pa.table({f.name: pa.array([], f.type) for f in fields}), meta).schema
    sweep_stale_temps(out.parent)  # a table write killed earlier
    start = 0
    with atomic_path(out) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd", write_statistics=False, use_dictionary=False) as writer:
            for file, n in zip(pool.files, pool.file_rows):
                uids = pq.read_table(file, columns=["uid"]).column("uid")
                arrays = [uids] + [pa.array(np.asarray(col[start:start + n], dtype=np.float32)) for col in columns.values()]
                writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
                start += n
    return out




def clipscore_blocks(image: np.ndarray, text: np.ndarray, block: int = 65536) -> np.ndarray:
    """CLIPScore s_ii of every row of two (N, D) arrays (memory maps included), `block` rows at a time."""

    out = np.empty(len(image), dtype=np.float32)
    for start in range(0, len(image), block):
        out[start:start + block] = clipscore(image[start:start + block], text[start:start + block])
    return out


def scores_in_pool_order(pool: EmbeddingPool, table: str | Path, column: str) -> np.ndarray:
    """A score table's `column` aligned to the pool's rows by uid (float64; NaN for pool rows it lacks)."""
    try:
        scores = pq.read_table(table, columns=["uid", column])
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise CurateError(f"{table}: cannot read columns uid and {column} ({exc})") from None
    index = {uid: i for i, uid in enumerate(scores.column("uid").to_pylist())}
    values = scores.column(column).cast(pa.float64()).to_numpy(zero_copy_only=False)
    rows = np.array([index.get(u, -1) for u in pool.uid_array().to_pylist()], dtype=np.int64)
    return np.where(rows >= 0, values[np.maximum(rows, 0)], np.nan)


# ---------------------------------------------------------------- per-row fields: column:NAME, json:PATH

def field_spec_parts(spec: str) -> tuple[str, str]:
    """("column" | "json", NAME or PATH) of a field spec, or a CurateError saying how one is written."""
    kind, sep, name = spec.partition(":")
    if not sep or kind not in ("column", "json") or not name:
        raise CurateError(f"{spec!r}: a field is written column:NAME or json:PATH (e.g. json:labels)")
    return kind, name


def json_path_value(doc, path: str):
    """The value at a dotted path of a JSON document (list items by index), or None when it is absent."""
    for part in path.split("."):
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return None
    return doc


def pool_field(pool: EmbeddingPool, spec: str) -> list:
    """Per-row values (pool order) of `column:NAME` (a column of the embedding tables) or `json:PATH` (a
    dotted path inside the `json` column, the sample's raw .json, e.g. json:truth); missing values are None."""
    kind, name = field_spec_parts(spec)
    column = name if kind == "column" else "json"
    for f in pool.files:
        if column not in pq.read_schema(f).names:
            hint = "" if kind == "column" else " (tables embedded from shards with a .json member carry it)"
            raise CurateError(f"{f}: no `{column}` column for {spec!r}{hint}")
    values: list = []
    for f in pool.files:
        col = pq.read_table(f, columns=[column]).column(column).to_pylist()
        if kind == "column":
            values.extend(col)
            continue
        for row, raw in enumerate(col):
            if raw is None:
                values.append(None)
                continue
            try:
                values.append(json_path_value(json.loads(raw), name))
            except json.JSONDecodeError as exc:
                raise CurateError(f"{f} row {row}: the json column is not valid JSON ({exc})") from None
    return values
