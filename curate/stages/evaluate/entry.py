"""`curate eval`'s entry: group captions by image, read the labels, compute the retrieval numbers (`run`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from rich.table import Table

from curate.config import check_config
from curate.errors import CurateError
from curate.io.atomic import write_text_atomic
from curate.io.tables import EmbeddingPool
from curate.metrics.retrieval import retrieval_metrics
from curate.stages.common import pool_field
from curate.stages.evaluate import EvalConfig, EvalResult


def has_column(pool: EmbeddingPool, name: str) -> bool:
    return all(name in pq.read_schema(f).names for f in pool.files)


def label_matrix(values: list, spec: str) -> np.ndarray:
    """Multi-hot label vectors (lists of 0/1 of one length) -> (N, L) uint8. A missing value (None) is an
    unlabelled row of zeros, which PMRP leaves out (as an all-zero vector)."""
    lengths = set()
    if values and all(v is None for v in values):
        raise CurateError(f"{spec}: no row has a label vector; check the field name (e.g. json:labels)")
    for i, v in enumerate(values):
        if v is None:
            continue
        if not isinstance(v, (list, tuple)) or not all(x in (0, 1, True, False) for x in v):
            raise CurateError(f"row {i}: {spec} is {v!r}, not a multi-hot list of 0/1; "
                              "give labels as a 0/1 vector per sample")
        lengths.add(len(v))
    if len(lengths) > 1:
        raise CurateError(f"{spec}: label vectors have different lengths {sorted(lengths)}")
    if not values:
        return np.zeros((0, 0), np.uint8)
    width = lengths.pop()
    return np.asarray([v if v is not None else [0] * width for v in values], dtype=np.uint8).reshape(-1, width)


# ---------------------------------------------------------------- grouping captions by image

def image_groups(pool: EmbeddingPool, group_by: str) -> np.ndarray:
    """Group index per row: rows sharing a group share one image (COCO-style several captions per image).

    group_by: `none` (one image per row), `key` (rows with equal `key` column), column:NAME, json:PATH, or
    `auto`: column `image_key` when every table has it, else `none`. Groups are numbered by first occurrence.
    """
    n = pool.n_rows
    if group_by == "auto":
        group_by = "column:image_key" if has_column(pool, "image_key") else "none"
    if group_by == "none":
        return np.arange(n, dtype=np.int64)
    values = pool_field(pool, "column:key" if group_by == "key" else group_by)
    if any(v is None for v in values):
        raise CurateError(f"--group-by {group_by}: some rows have no value; fill it or use --group-by none")
    keys = np.asarray([json.dumps(v, sort_keys=True) if not isinstance(v, str) else v for v in values], dtype=object)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    # renumber groups by first occurrence so image order follows pool order
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


# ---------------------------------------------------------------- stage

def run(emb: str | Path, out: str | Path | None, cfg: EvalConfig = EvalConfig()) -> EvalResult:
    """Retrieval metrics of an embedding directory; written as one JSON document when `out` is given.

    Meant for held-out splits: both embedding matrices are held in RAM (fp16), similarities per query block.
    """
    check_config(cfg)
    pool = EmbeddingPool(emb)
    if pool.n_rows == 0:
        raise CurateError(f"{emb}: the embedding tables have no rows; nothing to evaluate")
    group = image_groups(pool, cfg.group_by)
    first_row = np.unique(group, return_index=True)[1]  # the first row of each group gives its image
    img_all = pool.matrix("image_embedding")
    img = img_all[first_row]
    txt = pool.matrix("text_embedding")
    labels_img = labels_txt = None
    if cfg.labels:
        lab = label_matrix(pool_field(pool, cfg.labels), cfg.labels)
        labels_txt, labels_img = lab, lab[first_row]
    numbers = retrieval_metrics(img, txt, group, labels_img=labels_img, labels_txt=labels_txt, block=cfg.block)
    result = EvalResult(**numbers, source=str(emb), teacher=pool.teacher.to_dict(), group_by=cfg.group_by,
                        labels=cfg.labels, captions_per_image=float(len(txt) / len(img)),
                        out=str(out) if out is not None else None)
    if out is not None:
        write_text_atomic(out, json.dumps(result.document(), indent=2, sort_keys=True) + "\n")
    return result


def retrieval_table(result: EvalResult):
    """A rich Table of the retrieval numbers."""

    t = Table(title=f"retrieval: {result.n_images} images, {result.n_texts} captions")
    t.add_column("metric")
    t.add_column("image→text", justify="right")
    t.add_column("text→image", justify="right")
    keys = [k for k in result.i2t if k.startswith("R@")] + ["r_precision", "map_at_r", "median_rank"]
    for k in keys:
        t.add_row(k, f"{result.i2t[k]:.2f}", f"{result.t2i[k]:.2f}")
    if "pmrp" in result.i2t:
        for k in result.i2t["pmrp"]:
            t.add_row(f"PMRP {k}", f"{result.i2t['pmrp'][k]:.2f}", f"{result.t2i['pmrp'][k]:.2f}")
        left_out = result.pmrp_unlabelled or {}
        if any(left_out.values()):
            t.add_row("PMRP: unlabelled, left out", f"{left_out['images']} images", f"{left_out['texts']} captions")
    t.add_row("RSUM", f"{result.rsum:.2f}", "")
    return t
