"""`curate decontaminate`'s entry: the evaluation sets, the map tasks, the table."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.config import RunOptions, check_config
from curate.errors import CurateError
from curate.io.atomic import atomic_path
from curate.io.tables import EmbeddingPool, table_files, with_meta
from curate.io.targets import normalise_rows, open_target
from curate.run.mapreduce import (DEFAULT_TASKS, layout_parts_dir, pool_source, remove_single_driver_parts, start_map,
                                  write_once)
from curate.stages.common import open_nonempty_pool, pool_cache_dir
from curate.stages.decontaminate import HISTOGRAM_EDGES, DecontaminateConfig, DecontaminateResult
from curate.stages.decontaminate.tasks import AGAINST_MATRIX, IVF_INDEX, STAGE, NearestTask, nearest_task, span_file


@dataclass
class EvalSets:
    matrix: np.ndarray  # (M, D) float32, L2-normalised rows
    ids: list[str]  # per row: its uid, or FILE#ROW
    sets: list[str]  # per row: the --against it came from
    names: list[str]  # the --against specs, resolved


@dataclass
class DecontaminateLayout:
    fingerprint: str
    against_sha256: str
    index: str
    nlist: int
    nprobe: int
    tasks: int


def load_eval_sets(against: Sequence[str | Path], pool: EmbeddingPool) -> EvalSets:
    """Every --against set's image embeddings with an id per row; each must come from the pool's teacher (an
    embedding directory) or have its dimension (a matrix)."""
    if not against:
        raise CurateError("give at least one --against set (an embedding directory of evaluation or target "
                          "images, or a .npy/.pt/.parquet matrix)")
    matrices, ids, sets, names = [], [], [], []
    for spec in against:
        path = Path(spec)
        name = str(path.resolve()) if path.exists() else str(spec)
        if path.is_dir() and table_files(path):
            other = EmbeddingPool(path)
            if other.teacher != pool.teacher:
                raise CurateError(f"{path}: embedded with {other.teacher.model}/{other.teacher.pretrained}, the pool "
                                  f"with {pool.teacher.model}/{pool.teacher.pretrained}; embed it with the pool's "
                                  "teacher (`curate embed ... --images-only`)")
            matrix = normalise_rows(other.matrix("image_embedding").astype(np.float32), str(path))
            ids += [str(u) for u in other.column("uid")]
        else:
            matrix = open_target(path, pool.teacher).matrix
            ids += [f"{path.name}#{row}" for row in range(len(matrix))]
        matrices.append(matrix)
        sets += [name] * len(matrix)
        names.append(name)
    return EvalSets(np.concatenate(matrices).astype(np.float32), ids, sets, names)


def histogram(similarity: np.ndarray) -> list:
    counts, _ = np.histogram(similarity, bins=np.array(HISTOGRAM_EDGES))
    return [(lo, hi, int(c)) for lo, hi, c in zip(HISTOGRAM_EDGES[:-1], HISTOGRAM_EDGES[1:], counts)]


def run(emb: str | Path, against: Sequence[str | Path], out: str | Path,
        cfg: DecontaminateConfig = DecontaminateConfig(), opts: RunOptions = RunOptions(),
        progress=None) -> DecontaminateResult:
    """Flag the pool rows near an evaluation image (see the package docstring); writes `out` once every map task
    of this layout is done (by this rank or others)."""
    import faiss

    check_config(cfg)
    check_config(opts)
    started = time.perf_counter()
    out = Path(out)
    pool = open_nonempty_pool(emb, "decontaminate", progress)
    n = pool.n_rows
    evals = load_eval_sets(against, pool)
    cache = pool_cache_dir(out, cfg.cache_dir)
    pool.matrix("image_embedding", cache)
    nlist = min(cfg.nlist or max(1, int(4 * math.sqrt(len(evals.matrix)))), len(evals.matrix))
    nprobe = min(cfg.nprobe or max(1, nlist // 8), nlist)
    count = max(1, min(int(opts.tasks or DEFAULT_TASKS), n))
    digest = hashlib.sha256(evals.matrix.tobytes()).hexdigest()[:16]
    layout = DecontaminateLayout(pool.fingerprint(), digest, cfg.index, nlist if cfg.index == "ivf" else 0,
                                 nprobe if cfg.index == "ivf" else 0, count)
    parts = layout_parts_dir(out, STAGE, layout)
    job = start_map(parts, layout, STAGE, count, opts.executor, opts.workers, opts.rank, opts.world_size)
    if job.todo:
        write_once(parts / AGAINST_MATRIX, lambda tmp: _save(tmp, evals.matrix))
        if cfg.index == "ivf":
            def train_ivf(tmp: Path) -> None:
                quantizer = faiss.IndexFlatIP(evals.matrix.shape[1])
                index = faiss.IndexIVFFlat(quantizer, evals.matrix.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
                index.train(evals.matrix)
                index.add(evals.matrix)
                faiss.write_index(index, str(tmp))
            write_once(parts / IVF_INDEX, train_ivf)
    cuts = [(i * n) // count for i in range(count + 1)]
    report = job.run([NearestTask(job.names[i], cuts[i], cuts[i + 1], pool_source(emb), str(cache),
                                  layout.fingerprint, str(parts), cfg.index, nprobe) for i in job.todo],
                     nearest_task, ray_address=opts.ray_address, retries=opts.retries,
                     label="decontaminate (map tasks)")
    info = job.summary(report)
    params = {"threshold": cfg.threshold, "index": cfg.index, "nlist": layout.nlist, "nprobe": layout.nprobe,
              "against": evals.names, "against_rows": len(evals.matrix), "against_sha256": digest,
              "meaning": "cosine of the teacher's image embeddings; contaminated = similarity >= threshold"}
    if not info["reduced"]:
        return DecontaminateResult(None, n, len(evals.matrix), 0, [], time.perf_counter() - started, params, info)
    nearest_row = np.empty(n, dtype=np.int64)
    similarity = np.empty(n, dtype=np.float32)
    for name, a, b in zip(job.names, cuts[:-1], cuts[1:]):
        with np.load(span_file(parts, name)) as data:
            nearest_row[a:b], similarity[a:b] = data["row"], data["similarity"]
    if progress:
        progress(n)
    contaminated = similarity >= np.float32(cfg.threshold)
    hist = histogram(similarity)
    params["contaminated"] = int(contaminated.sum())
    params["histogram"] = hist
    meta = {"stage": STAGE, "teacher": pool.teacher.to_dict(), "source": str(emb), "n_rows": n, "params": params}
    write_table(pool, out, evals, nearest_row, similarity, contaminated, meta)
    remove_single_driver_parts(info, out)
    return DecontaminateResult(str(out), n, len(evals.matrix), int(contaminated.sum()), hist,
                               time.perf_counter() - started, params, info)


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def write_table(pool: EmbeddingPool, out: Path, evals: EvalSets, nearest_row: np.ndarray, similarity: np.ndarray,
                contaminated: np.ndarray, meta: dict) -> None:
    """uid, nearest_uid, nearest_set, similarity, contaminated: one row group per input table, atomically."""
    uids = pool.uid_array()
    ids, sets = pa.array(evals.ids, pa.string()), pa.array(evals.sets, pa.string())
    schema = pa.schema([("uid", pa.string()), ("nearest_uid", pa.string()), ("nearest_set", pa.string()),
                        ("similarity", pa.float32()), ("contaminated", pa.int8())])
    schema = with_meta(schema.empty_table(), meta).schema
    with atomic_path(out) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd", write_statistics=False) as writer:
            start = 0
            for rows in pool.file_rows:
                stop = start + rows
                take = pa.array(nearest_row[start:stop])
                writer.write_table(pa.Table.from_arrays(
                    [uids[start:stop], ids.take(take), sets.take(take), pa.array(similarity[start:stop]),
                     pa.array(contaminated[start:stop].astype(np.int8))], schema=schema))
                start = stop
