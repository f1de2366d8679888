"""Parquet tables: the embedding tables written by `curate embed` and read by every later stage.

Embedding table (one per input shard, same stem): columns
  uid (string, 32 lowercase hex), key (string), caption (string),
  image_embedding, text_embedding (fixed_size_binary(2·D): D little-endian IEEE float16 values per row,
  L2-normalised; `vectors_to_numpy` turns a column into an (N, D) array).
Binary vectors, not Parquet lists: Parquet stores a list with a repetition level per value, and decoding
a 512-d fp16 list costs ~1.2 µs per row against ~0.12 µs for the same bytes as one binary value (same file
size; bench/results.md). Tables written as fixed_size_list<float>[D] by earlier versions still read.
Schema metadata key `curate` holds JSON: {"teacher": {model, pretrained, embed_dim, logit_scale},
"version": code version, "shard": input shard, ...}.
Pool order (used by every pool-wide step) is: files sorted by name, rows in file order.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate import __version__
from curate.errors import CurateError
from curate.io.atomic import atomic_path, sweep_stale_temps

META_KEY = b"curate"
ERRORS_SUFFIX = ".errors.parquet"
EMBEDDING_COLUMNS = ("image_embedding", "text_embedding")
READ_BATCH_ROWS = 1 << 13  # rows per block when streaming tables (8k x 512 fp16 = 8 MiB per column)
VECTOR_ROW_GROUP_ROWS = 1 << 13  # default row group of tables with vector columns: small, fast reads
VECTOR_DTYPE = np.dtype("<f2")  # the element type of binary vector columns
VECTOR_FIELD_META = b"curate.vector"  # field metadata naming a binary column's element type, for other readers


@dataclass(frozen=True)
class TeacherInfo:
    """What a table's embeddings came from; tables of different teachers must never be mixed."""

    model: str
    pretrained: str
    embed_dim: int
    logit_scale: float

    @property
    def tau(self) -> float:
        """Temperature τ = 1 / logit_scale."""
        return 1.0 / self.logit_scale

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TeacherInfo":
        try:
            return cls(str(d["model"]), str(d["pretrained"]), int(d["embed_dim"]), float(d["logit_scale"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CurateError(f"teacher metadata is incomplete ({exc}): {d!r}") from None


# ---------------------------------------------------------------- writing

def vector_field(name: str, dim: int) -> pa.Field:
    """A binary vector column of `dim` float16 values; its field metadata says so to other readers."""
    return pa.field(name, pa.binary(VECTOR_DTYPE.itemsize * dim),
                    metadata={VECTOR_FIELD_META: f"float16[{dim}] little-endian".encode()})


def embedding_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [("uid", pa.string()), ("key", pa.string()), ("caption", pa.string()),
         vector_field("image_embedding", dim), vector_field("text_embedding", dim)]
    )


def numpy_to_vectors(matrix: np.ndarray) -> pa.FixedSizeBinaryArray:
    """(N, D) array -> a binary vector column (float16, D values per row) without a Python loop."""
    matrix = np.ascontiguousarray(np.asarray(matrix).astype(VECTOR_DTYPE, copy=False))
    n, d = matrix.shape
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(VECTOR_DTYPE.itemsize * d), n,
                                                [None, pa.py_buffer(matrix)])


def numpy_to_fixed_list(matrix: np.ndarray, dtype=pa.float16()) -> pa.FixedSizeListArray:
    """(N, D) array -> Arrow fixed_size_list<dtype>[D] (the list form other tools write; targets may be
    given in it) without a Python loop."""
    matrix = np.ascontiguousarray(matrix)
    n, d = matrix.shape
    np_dtype = {pa.float16(): np.float16, pa.float32(): np.float32}[dtype]
    flat = pa.array(matrix.astype(np_dtype, copy=False).reshape(-1), type=dtype)
    return pa.FixedSizeListArray.from_arrays(flat, d)


def is_vector_type(field_type: pa.DataType) -> bool:
    """A vector column: binary vectors (ours) or a fixed_size_list of floats (earlier tables, other tools)."""
    return (pa.types.is_fixed_size_binary(field_type) and field_type.byte_width % VECTOR_DTYPE.itemsize == 0
            or pa.types.is_fixed_size_list(field_type) and pa.types.is_floating(field_type.value_type))


def vector_dim(field_type: pa.DataType) -> int:
    """The number of values per row of a vector column type."""
    if pa.types.is_fixed_size_binary(field_type):
        return field_type.byte_width // VECTOR_DTYPE.itemsize
    return field_type.list_size


def with_meta(table: pa.Table, meta: dict) -> pa.Table:
    """Attach our JSON metadata under the `curate` key (merged with what is there)."""
    existing = dict(table.schema.metadata or {})
    existing[META_KEY] = json.dumps({"version": __version__, **meta}, sort_keys=True).encode()
    return table.replace_schema_metadata(existing)


def write_table_atomic(table: pa.Table, path: str | Path, meta: dict | None = None,
                       row_group_size: int | None = None) -> Path:
    """Write a Parquet file via temp file + rename. Deterministic bytes for identical input.

    Vector columns are written plain: no dictionary and no compression. Embedding values
    barely repeat: a dictionary made reading and writing an fp16 column ~4x slower, and zstd saved 9 % of
    its bytes but tripled the time to read it (164 vs 57 ms per 50k x 512 column; bench/results.md). Both are
    standard Parquet options, so every reader reads either. Their row groups default to
    VECTOR_ROW_GROUP_ROWS rows, so that no reader has to hold a huge one. Other columns: zstd, and a
    dictionary for those whose values may repeat.
    """
    if meta is not None:
        table = with_meta(table, meta)
    path = Path(path)
    other_columns = [f.name for f in table.schema if not is_vector_type(f.type)]
    if row_group_size is None and len(other_columns) < len(table.schema):
        row_group_size = VECTOR_ROW_GROUP_ROWS
    compression = {name: "zstd" if name in other_columns else "none" for name in table.schema.names}
    # values that never repeat (uids, continuous scores) gain nothing from a dictionary: without one a
    # 50k-row uid + float32 score table writes in 4.6 instead of 7.8 ms and is 12 % smaller
    dictionary = [f.name for f in table.schema
                  if f.name in other_columns and f.name != "uid" and not pa.types.is_floating(f.type)]
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size, compression=compression,
                       write_statistics=False, use_dictionary=dictionary)
    return path


def build_embedding_table(uids: Sequence[str], keys: Sequence[str], captions: Sequence[str],
                          image_emb: np.ndarray, text_emb: np.ndarray,
                          json_texts: Sequence[str | None] | None = None, dim: int | None = None) -> pa.Table:
    """Rows -> an embedding table; `json_texts` (the samples' raw .json) adds the optional `json` column."""
    if dim is None:
        dim = image_emb.shape[1]
    table = pa.Table.from_arrays(
        [pa.array(list(uids), pa.string()), pa.array(list(keys), pa.string()),
         pa.array(list(captions), pa.string()),
         numpy_to_vectors(np.asarray(image_emb).reshape(-1, dim)),
         numpy_to_vectors(np.asarray(text_emb).reshape(-1, dim))],
        schema=embedding_schema(dim),
    )
    if json_texts is not None:
        table = table.append_column("json", pa.array(list(json_texts), pa.string()))
    return table


# ---------------------------------------------------------------- reading

def read_meta(path: str | Path) -> dict:
    """The `curate` JSON metadata of a Parquet file (empty dict if none)."""
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise CurateError(f"{path}: not a readable Parquet file ({exc})") from None
    raw = (schema.metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else {}


def vectors_to_numpy(column: pa.ChunkedArray | pa.Array, dtype=np.float32, source: object = "") -> np.ndarray:
    """Vector column (binary vectors or fixed_size_list) -> (N, D) numpy array (one copy at most; none for
    binary vectors read as float16). `source` names the file in the error about null rows."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if column.null_count:
        raise CurateError(f"{source or 'table'}: vector column holds {column.null_count} null rows; "
                          "re-embed that shard")
    d = vector_dim(column.type)
    if pa.types.is_fixed_size_binary(column.type):
        width = column.type.byte_width
        values = np.frombuffer(column.buffers()[1], dtype=VECTOR_DTYPE, count=len(column) * d,
                               offset=column.offset * width).reshape(len(column), d)
    else:
        values = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)
    if values.dtype == np.float16 and np.dtype(dtype) == np.float32:
        return to_float32(values)
    return values.astype(dtype, copy=False)


def to_float32(array: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Exact fp16 -> float32 conversion through torch, which uses the CPU's F16C instructions (numpy's
    `astype` does not). `out`: a float32 buffer of at least len(array) rows to convert into; reusing one
    matters as much as the instructions, since a fresh 16 MiB array costs ~3 ms of page faults."""
    import torch

    array = np.asarray(array)
    if out is None:
        out = np.empty(array.shape, dtype=np.float32)
    else:
        out = out[: len(array)]
    if array.dtype != np.float16:
        np.copyto(out, array, casting="same_kind")
        return out
    with warnings.catch_warnings():  # read-only input (an Arrow buffer) is fine: torch only reads it
        warnings.simplefilter("ignore", UserWarning)
        source = torch.from_numpy(np.ascontiguousarray(array))
    torch.from_numpy(out).copy_(source)
    return out


def open_table(path: str | Path) -> pq.ParquetFile:
    """A Parquet file to stream from local disk. No pre-buffering: it coalesces the reads of a row group into
    one buffer first, which pays on object stores, but on a local file it is one more copy of every byte
    (streaming a 200k x 512 binary vector column: 33 ms of CPU with it, 25 without)."""
    return pq.ParquetFile(path, pre_buffer=False)


def embedding_files(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Embedding tables of a directory (sorted, skip-record files excluded), or an explicit list."""
    if isinstance(source, (str, Path)):
        src = Path(source)
        if src.is_dir():
            files = sorted(p for p in src.glob("*.parquet")
                           if not p.name.endswith(ERRORS_SUFFIX) and not p.name.startswith("."))
        elif src.is_file():
            files = [src]
        else:
            raise CurateError(f"{src}: no such embedding directory or table")
    else:
        files = sorted(Path(s) for s in source)
    if not files:
        raise CurateError(f"{source}: no embedding tables (*.parquet) found; run `curate embed` first")
    return files


class EmbeddingPool:
    """A pool of embedding tables read lazily: teacher checked once, rows streamed or memory-mapped.

    Nothing here loads the whole pool into RAM: `iter_chunks` streams row groups and `matrix` builds
    (once) an fp16 `.npy` cache that is memory-mapped.
    """

    def __init__(self, source: str | Path | Sequence[str | Path]):
        self.files = embedding_files(source)
        self.teacher: TeacherInfo | None = None
        self.file_rows: list[int] = []
        first = None
        for f in self.files:
            meta = read_meta(f)
            if "teacher" not in meta:
                raise CurateError(f"{f}: no `curate` teacher metadata; is this an embedding table from `curate embed`?")
            t = TeacherInfo.from_dict(meta["teacher"])
            if self.teacher is None:
                self.teacher, first = t, f
            elif t != self.teacher:
                raise CurateError(
                    f"tables come from different teachers: {first} has {self.teacher.model}/"
                    f"{self.teacher.pretrained} dim {self.teacher.embed_dim} logit_scale {self.teacher.logit_scale:g}, "
                    f"{f} has {t.model}/{t.pretrained} dim {t.embed_dim} logit_scale {t.logit_scale:g}; "
                    "score each teacher's tables separately"
                )
            parquet = pq.ParquetFile(f)
            _check_embedding_columns(f, parquet.schema_arrow, t.embed_dim)
            self.file_rows.append(parquet.metadata.num_rows)
        assert self.teacher is not None

    @property
    def dim(self) -> int:
        return self.teacher.embed_dim

    @property
    def n_rows(self) -> int:
        return int(sum(self.file_rows))

    def iter_chunks(self, columns: Iterable[str] = ("uid",) + EMBEDDING_COLUMNS,
                    dtype=np.float32) -> Iterator[tuple[Path, dict]]:
        """Yield (file, {column: array}) per block of at most READ_BATCH_ROWS rows, in pool order.
        Embeddings as (n, D) `dtype`.

        Bounded batches, not whole row groups: a table written with one 1M-row group would otherwise
        be decoded and converted at once (GiBs), and small blocks also convert faster (cache-resident).
        """
        columns = list(columns)
        for f in self.files:
            pf = open_table(f)
            _require_columns(f, pf.schema_arrow, columns)
            for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns, use_threads=False):
                yield f, {c: column_to_numpy(batch.column(c), dtype, f) for c in columns}

    def column(self, name: str) -> np.ndarray:
        """A scalar column of the whole pool (e.g. uid): one array, pool order."""
        for f in self.files:
            _require_columns(f, pq.read_schema(f), [name])
        parts = [pq.read_table(f, columns=[name]).column(name).to_numpy(zero_copy_only=False) for f in self.files]
        return np.concatenate(parts) if parts else np.empty(0, dtype=object)

    def fingerprint(self) -> str:
        """Changes whenever any table changes: names, sizes and mtimes."""
        h = hashlib.sha256()
        for f in self.files:
            st = os.stat(f)
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    def cache_file(self, column: str, cache_dir: str | Path) -> Path:
        """Where `matrix(column, cache_dir)` keeps this pool version's fp16 `.npy` cache (it may not exist yet)."""
        return Path(cache_dir) / f"{column}-{self.fingerprint()}.npy"

    def matrix(self, column: str, cache_dir: str | Path | None = None) -> np.ndarray:
        """The whole pool's `column` as an (N, D) float16 array; memory-mapped from `cache_dir` when given."""
        for f in self.files:
            _require_columns(f, pq.read_schema(f), [column])
        if cache_dir is None:
            parts = [vectors_to_numpy(pq.read_table(f, columns=[column]).column(column), np.float16, f)
                     for f in self.files]
            return np.concatenate(parts) if parts else np.empty((0, self.dim), np.float16)
        cache = self.cache_file(column, cache_dir)
        if not cache.exists():
            cache.parent.mkdir(parents=True, exist_ok=True)
            sweep_stale_temps(cache.parent)  # a cache build killed earlier leaves GBs behind
            # header, then chunk by chunk with plain writes: a writable memmap would keep every page resident
            with atomic_path(cache) as tmp, open(tmp, "wb") as f:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                          "shape": (self.n_rows, self.dim)}
                np.lib.format.write_array_header_1_0(f, header)
                for _, chunk in self.iter_chunks([column], dtype=np.float16):
                    np.ascontiguousarray(chunk[column]).tofile(f)
        return np.load(cache, mmap_mode="r")


def _check_embedding_columns(path: Path, schema: pa.Schema, dim: int) -> None:
    """Embedding columns must be vectors of embed_dim values, as the metadata says: a table whose vectors
    disagree with its own teacher record would otherwise fail deep inside a stage."""
    for name in EMBEDDING_COLUMNS:
        if name not in schema.names:
            continue
        field_type = schema.field(name).type
        if not is_vector_type(field_type):
            raise CurateError(f"{path}: column `{name}` has type {field_type}, expected binary vectors "
                              f"(fixed_size_binary[{VECTOR_DTYPE.itemsize * dim}]) or fixed_size_list<float>[{dim}]; "
                              "is this an embedding table from `curate embed`?")
        if vector_dim(field_type) != dim:
            raise CurateError(f"{path}: column `{name}` holds {vector_dim(field_type)}-d vectors but the table's teacher "
                              f"metadata says embed_dim {dim}; the file is inconsistent: re-embed that shard")


def _require_columns(path: Path, schema: pa.Schema, columns: Iterable[str]) -> None:
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise CurateError(f"{path}: no column {', '.join(f'`{c}`' for c in missing)} (has {', '.join(schema.names)}); "
                          "is this an embedding table from `curate embed`?")


def column_to_numpy(col: pa.ChunkedArray | pa.Array, dtype, source: object = "") -> np.ndarray:
    """Any column of a table: vectors as (N, D) `dtype`, other columns as they are."""
    if is_vector_type(col.type):
        return vectors_to_numpy(col, dtype, source)
    return col.to_numpy(zero_copy_only=False)
