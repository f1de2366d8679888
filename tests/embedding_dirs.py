"""Embedding directories with chosen vectors, json docs and extra columns (the tests of clones / AdaCL, PCME and
eval), and unit rows and noisy pairs to fill them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from curate.io.tables import TeacherInfo, build_embedding_table, write_table_atomic


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_embedding_dir(path, img: np.ndarray, txt: np.ndarray, *, uids=None, keys=None, docs=None,
                        extra_columns: dict | None = None, split: list[int] | None = None,
                        logit_scale: float = 50.0, model: str = "test") -> Path:
    """Write `img`/`txt` rows (stored as fp16, as `curate embed` does) into one or more tables.

    uids default to the row number as 32 hex; `docs` (dicts) become the `json` column; `split` gives the rows
    per file (default: one file). Returns the directory.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n, dim = img.shape
    uids = uids if uids is not None else [f"{i:032x}" for i in range(n)]
    keys = keys if keys is not None else [f"k{i:06d}" for i in range(n)]
    teacher = TeacherInfo(model=model, pretrained="none", embed_dim=dim, logit_scale=logit_scale)
    bounds = np.cumsum([0] + list(split or [n]))
    assert bounds[-1] == n
    for f, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        table = build_embedding_table(uids[a:b], keys[a:b], [f"caption {i}" for i in range(a, b)],
                                      np.asarray(img[a:b], np.float32), np.asarray(txt[a:b], np.float32))
        if docs is not None:
            table = table.append_column("json", pa.array([json.dumps(d) for d in docs[a:b]], pa.string()))
        for name, values in (extra_columns or {}).items():
            table = table.append_column(name, pa.array(list(values[a:b])))
        write_table_atomic(table, path / f"part-{f:05d}.parquet", meta={"teacher": teacher.to_dict()})
    return path


def noisy_pairs(n: int, dim: int, corrupt_fraction: float, seed: int, noise: float = 0.3):
    """Clean pairs: text = normalise(image + noise); corrupted pairs: unrelated random text.
    Returns (img, txt, clean mask)."""
    rng = np.random.default_rng(seed)
    img = unit_rows(rng.standard_normal((n, dim)))
    txt = unit_rows(img + noise * rng.standard_normal((n, dim)))
    clean = rng.random(n) >= corrupt_fraction
    txt[~clean] = unit_rows(rng.standard_normal((int((~clean).sum()), dim)))
    return img, txt, clean
