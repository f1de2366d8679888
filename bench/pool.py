"""Synthetic embedding pools for the benchmarks: random unit vectors in fp16, written like `curate embed`.

A pool is a directory of embedding tables (curate/io/tables.py schema, written with `write_table_atomic`),
`rows_per_file` rows each. Content is random (seeded); only sizes matter for speed and memory. A pool is
reused when its `pool.json` stamp matches the parameters, so repeated `make bench` runs do not rewrite it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from curate.io.tables import TeacherInfo, embedding_schema, numpy_to_vectors, write_table_atomic

HEX_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)
STAMP = "pool.json"


def random_unit_rows(rng: np.random.Generator, n: int, dim: int, dtype=np.float16) -> np.ndarray:
    """n random L2-normalised rows (Gaussian directions), generated in float32, returned as `dtype`."""
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(dtype, copy=False)


def random_uids(rng: np.random.Generator, n: int) -> pa.Array:
    """n random 32-hex uids as an Arrow string array, built from bytes (no Python string per row)."""
    raw = np.frombuffer(rng.bytes(16 * n), np.uint8).reshape(n, 16)
    hexed = np.empty((n, 32), np.uint8)
    hexed[:, 0::2], hexed[:, 1::2] = HEX_DIGITS[raw >> 4], HEX_DIGITS[raw & 15]
    return pa.array(hexed.view("S32").ravel()).cast(pa.string())


def clustered_unit_rows(rng: np.random.Generator, n: int, centres: np.ndarray, duplicates: float) -> np.ndarray:
    """n unit rows around random `centres` (cosine ~0.7 to their centre), a `duplicates` fraction of them near
    copies (cosine ~0.999) of other rows: what semantic dedup works on."""
    noise = random_unit_rows(rng, n, centres.shape[1], np.float32)
    x = centres[rng.integers(0, len(centres), n)] + noise
    copies = np.flatnonzero(rng.random(n) < duplicates)
    x[copies] = x[rng.integers(0, n, len(copies))] + 0.04 * noise[copies]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16)


def make_pool(path: str | Path, n_rows: int, dim: int = 512, rows_per_file: int = 100_000, seed: int = 0,
              logit_scale: float = 100.0, centres: int = 0, duplicates: float = 0.0) -> Path:
    """Write (or reuse) a pool of `n_rows` rows in tables of `rows_per_file` rows (row groups as
    `write_table_atomic` makes them for `curate embed`). Captions and keys are short strings; uids random.
    Image rows are random directions, or with `centres` > 0 clustered (see clustered_unit_rows)."""
    path = Path(path)
    params = {"n_rows": int(n_rows), "dim": int(dim), "rows_per_file": int(rows_per_file), "seed": int(seed),
              "logit_scale": float(logit_scale), "format": 7}  # 7: fp16 list vector columns, uid without dictionary
    if centres:
        params.update({"centres": int(centres), "duplicates": float(duplicates)})
        centre_rows = random_unit_rows(np.random.default_rng([seed, 1 << 20]), centres, dim, np.float32)
    stamp = path / STAMP
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return path
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    teacher = TeacherInfo(model="bench-random", pretrained="none", embed_dim=dim, logit_scale=logit_scale)
    schema = embedding_schema(dim)
    for index, start in enumerate(range(0, n_rows, rows_per_file)):
        rng = np.random.default_rng([seed, index])
        n = min(rows_per_file, n_rows - start)
        uids = random_uids(rng, n)
        names = pa.array(np.char.add("k", np.arange(start, start + n).astype(str)).astype(object), pa.string())
        images = clustered_unit_rows(rng, n, centre_rows, duplicates) if centres else random_unit_rows(rng, n, dim)
        table = pa.Table.from_arrays(
            [uids, names, names, numpy_to_vectors(images),
             numpy_to_vectors(random_unit_rows(rng, n, dim))], schema=schema)
        write_table_atomic(table, path / f"shard-{index:06d}.parquet",
                           meta={"teacher": teacher.to_dict(), "shard": f"shard-{index:06d}.tar"})
        del table
    stamp.write_text(json.dumps(params))
    return path


def load_pool_arrays(path: str | Path, columns=("image_embedding", "text_embedding"),
                     dtype=np.float32) -> dict[str, np.ndarray]:
    """The whole pool's columns in RAM (for the in-memory baselines only)."""
    from curate.io.tables import EmbeddingPool

    pool = EmbeddingPool(path)
    out = {c: np.empty((pool.n_rows, pool.dim), dtype) for c in columns}
    row = 0
    for _, chunk in pool.iter_chunks(list(columns), dtype=dtype):
        n = len(chunk[columns[0]])
        for c in columns:
            out[c][row:row + n] = chunk[c]
        row += n
    return out
