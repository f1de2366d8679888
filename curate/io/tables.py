"""Parquet tables: the embedding tables written by `curate embed` and read by every later stage.

Embedding table (one per input shard, same stem): columns
  uid (string, 32 lowercase hex), key (string), caption (string),
  image_embedding, text_embedding (fixed_size_list<float16>[D], L2-normalised; `vectors_to_numpy` turns a
  column into an (N, D) array), and optionally `json` (the sample's .json text).
Image-only tables (`curate embed --images-only`) have uid, key, image_embedding and, for an ImageFolder,
`label` (the class folder's name).
Vectors are typed numeric lists so that DuckDB (FLOAT[]), Polars (Array(Float16, D)) and pandas (numpy
arrays) read them as numbers. Decoding a Parquet list costs ~1 µs per 512-d row, so stages that read a pool
more than once build an fp16 `.npy` cache first (`EmbeddingPool.matrix`) and read that. Tables of earlier
versions (vectors as fixed_size_binary(2·D) float16 bytes) still read.
Skip records go to `<out>/_errors/<stem>.parquet` and completion markers to `<out>/_markers/`, so that every
`<out>/*.parquet` is an embedding table of the one schema.
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
ERRORS_DIR = "_errors"  # skip records of a stage's output directory: <out>/_errors/<stem>.parquet
LEGACY_ERRORS_SUFFIX = ".errors.parquet"  # where earlier versions put them, beside the tables
EMBEDDING_COLUMNS = ("image_embedding", "text_embedding")
READ_BATCH_ROWS = 1 << 13  # rows per block when streaming tables (8k x 512 fp16 = 8 MiB per column)
VECTOR_ROW_GROUP_ROWS = 1 << 13  # default row group of tables with vector columns: small, fast reads
VECTOR_DTYPE = np.dtype("<f2")  # the element type of vector columns (float16)


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

def vector_type(dim: int) -> pa.DataType:
    """fixed_size_list<float16>[dim] with non-null values (no validity bitmap to decode)."""
    return pa.list_(pa.field("element", pa.float16(), nullable=False), dim)


def vector_field(name: str, dim: int) -> pa.Field:
    """A vector column of `dim` float16 values per row (rows are never null)."""
    return pa.field(name, vector_type(dim), nullable=False)


def embedding_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [("uid", pa.string()), ("key", pa.string()), ("caption", pa.string()),
         vector_field("image_embedding", dim), vector_field("text_embedding", dim)]
    )


def numpy_to_vectors(matrix: np.ndarray, dtype: pa.DataType = pa.float16()) -> pa.FixedSizeListArray:
    """(N, D) array -> a vector column, fixed_size_list<dtype>[D] (float16 unless asked), without a Python loop."""
    matrix = np.ascontiguousarray(matrix)
    n, d = matrix.shape
    np_dtype = {pa.float16(): np.float16, pa.float32(): np.float32}[dtype]
    flat = pa.array(matrix.astype(np_dtype, copy=False).reshape(-1), type=dtype)
    list_type = vector_type(d) if dtype == pa.float16() else pa.list_(pa.field("element", dtype, nullable=False), d)
    return pa.FixedSizeListArray.from_arrays(flat, type=list_type)


def is_vector_type(field_type: pa.DataType) -> bool:
    """A vector column: a list of floats (ours: fixed_size_list; a variable list as DuckDB writes FLOAT[] back),
    or the float16 bytes of earlier versions (fixed_size_binary(2·D))."""
    lists = pa.types.is_fixed_size_list(field_type) or pa.types.is_list(field_type) \
        or pa.types.is_large_list(field_type)
    return (lists and pa.types.is_floating(field_type.value_type)
            or pa.types.is_fixed_size_binary(field_type) and field_type.byte_width % VECTOR_DTYPE.itemsize == 0)


def vector_dim(field_type: pa.DataType) -> int | None:
    """The number of values per row of a vector column type (None for a variable list: known from its rows)."""
    if pa.types.is_fixed_size_binary(field_type):
        return field_type.byte_width // VECTOR_DTYPE.itemsize
    if pa.types.is_fixed_size_list(field_type):
        return field_type.list_size
    return None


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


def build_embedding_table(uids: Sequence[str], keys: Sequence[str], captions: Sequence[str] | None,
                          image_emb: np.ndarray, text_emb: np.ndarray | None,
                          json_texts: Sequence[str | None] | None = None, dim: int | None = None,
                          labels: Sequence[str] | None = None) -> pa.Table:
    """Rows -> an embedding table; `json_texts` (the samples' raw .json) adds the optional `json` column.
    Without `captions` and `text_emb` it is an image-only table; `labels` adds a `label` column (ImageFolder)."""
    if dim is None:
        dim = image_emb.shape[1]
    if (captions is None) != (text_emb is None):
        raise ValueError("captions and text embeddings go together")
    columns = {"uid": pa.array(list(uids), pa.string()), "key": pa.array(list(keys), pa.string())}
    fields = [pa.field("uid", pa.string()), pa.field("key", pa.string())]
    if captions is not None:
        columns["caption"] = pa.array(list(captions), pa.string())
        fields.append(pa.field("caption", pa.string()))
    if labels is not None:
        columns["label"] = pa.array(list(labels), pa.string())
        fields.append(pa.field("label", pa.string()))
    columns["image_embedding"] = numpy_to_vectors(np.asarray(image_emb).reshape(-1, dim))
    fields.append(vector_field("image_embedding", dim))
    if text_emb is not None:
        columns["text_embedding"] = numpy_to_vectors(np.asarray(text_emb).reshape(-1, dim))
        fields.append(vector_field("text_embedding", dim))
    table = pa.Table.from_arrays(list(columns.values()), schema=pa.schema(fields))
    if json_texts is not None:
        table = table.append_column("json", pa.array(list(json_texts), pa.string()))
    return table


def errors_path(out_dir: str | Path, stem: str) -> Path:
    """Where a stage records the skips of one unit (shard) of its output directory."""
    return Path(out_dir) / ERRORS_DIR / f"{stem}.parquet"


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
    """Vector column (fixed_size_list of floats, or the binary vectors of earlier versions) -> (N, D) numpy
    array (one copy at most). `source` names the file in the error about null rows."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if column.null_count:
        raise CurateError(f"{source or 'table'}: vector column holds {column.null_count} null rows; "
                          "re-embed that shard")
    d = vector_dim(column.type)
    if d is None:  # a variable list (e.g. DuckDB's FLOAT[]): every row must hold the same number of values
        lengths = column.value_lengths().to_numpy(zero_copy_only=False) if len(column) else np.zeros(0, np.int64)
        if len(lengths) and (lengths != lengths[0]).any():
            raise CurateError(f"{source or 'table'}: vector rows have different lengths "
                              f"({int(lengths.min())} to {int(lengths.max())} values); re-embed that shard")
        d = int(lengths[0]) if len(lengths) else 0
    if pa.types.is_fixed_size_binary(column.type):
        width = column.type.byte_width
        values = np.frombuffer(column.buffers()[1], dtype=VECTOR_DTYPE, count=len(column) * d,
                               offset=column.offset * width).reshape(len(column), d)
    else:
        flat = column.flatten()  # the values of these rows (the column's offset applied)
        if flat.null_count:
            raise CurateError(f"{source or 'table'}: vector column holds {flat.null_count} null values; "
                              "re-embed that shard")
        values = flat.to_numpy(zero_copy_only=False).reshape(-1, d)
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


def table_files(directory: Path) -> list[Path]:
    """The tables of an output directory: its `*.parquet` (sorted; side records live in subfolders; the
    `.errors.parquet` skip records that earlier versions put beside the tables are left out)."""
    return sorted(p for p in directory.glob("*.parquet")
                  if not p.name.endswith(LEGACY_ERRORS_SUFFIX) and not p.name.startswith("."))


def embedding_files(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Embedding tables of a directory (sorted), or an explicit list."""
    if isinstance(source, (str, Path)):
        src = Path(source)
        if src.is_dir():
            files = table_files(src)
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
            require_columns(f, pf.schema_arrow, columns)
            for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns, use_threads=False):
                block = {c: column_to_numpy(batch.column(c), dtype, f) for c in columns}
                for c, values in block.items():
                    if values.ndim == 2 and values.shape[1] != self.dim:
                        raise CurateError(f"{f}: column `{c}` holds {values.shape[1]}-d vectors but the table's "
                                          f"teacher metadata says embed_dim {self.dim}; re-embed that shard")
                yield f, block

    def uid_array(self) -> pa.Array:
        """The uid column of the whole pool as one Arrow string array (no Python object per row)."""
        parts = [pq.read_table(f, columns=["uid"]).column("uid") for f in self.files]
        return pa.chunked_array([c for p in parts for c in p.chunks], type=pa.string()).combine_chunks()

    def column(self, name: str) -> np.ndarray:
        """A scalar column of the whole pool (e.g. uid): one array, pool order."""
        for f in self.files:
            require_columns(f, pq.read_schema(f), [name])
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
            require_columns(f, pq.read_schema(f), [column])
        if cache_dir is None:
            parts = [block[column] for _, block in self.iter_chunks([column], dtype=np.float16)]
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
            raise CurateError(f"{path}: column `{name}` has type {field_type}, expected vectors "
                              f"(fixed_size_list<float16 or float32>[{dim}]); "
                              "is this an embedding table from `curate embed`?")
        if vector_dim(field_type) not in (dim, None):  # (a variable list's rows are checked when read)
            raise CurateError(f"{path}: column `{name}` holds {vector_dim(field_type)}-d vectors but the table's teacher "
                              f"metadata says embed_dim {dim}; the file is inconsistent: re-embed that shard")


def require_columns(path: Path, schema: pa.Schema, columns: Iterable[str]) -> None:
    missing = [c for c in columns if c not in schema.names]
    image_only = "image_embedding" in schema.names and not {"caption", "text_embedding"} & set(schema.names)
    if missing and image_only and set(missing) <= {"caption", "text_embedding"}:
        raise CurateError(f"{path}: an image-only embedding table (`curate embed --images-only`) has no "
                          f"{' or '.join(missing)}; this step needs image-text pairs (embed them without --images-only)")
    if missing:
        raise CurateError(f"{path}: no column {', '.join(f'`{c}`' for c in missing)} (has {', '.join(schema.names)}); "
                          "is this an embedding table from `curate embed`?")


def column_to_numpy(col: pa.ChunkedArray | pa.Array, dtype, source: object = "") -> np.ndarray:
    """Any column of a table: vectors as (N, D) `dtype`, other columns as they are."""
    if is_vector_type(col.type):
        return vectors_to_numpy(col, dtype, source)
    return col.to_numpy(zero_copy_only=False)
