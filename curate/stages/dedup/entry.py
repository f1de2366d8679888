"""`curate dedup`'s entry: k-means, the two rounds of map tasks (assignment, clusters), the table."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.config import RunOptions, check_config
from curate.errors import CurateError
from curate.io.atomic import atomic_path
from curate.io.tables import EmbeddingPool, with_meta
from curate.run.mapreduce import (DEFAULT_TASKS, layout_parts_dir, parts_root, pool_source, remove_parts, start_map,
                                  write_once)
from curate.stages.common import PoolRows, open_nonempty_pool, pool_cache_dir, scores_in_pool_order
from curate.stages.dedup import DedupConfig, DedupResult
from curate.stages.dedup.common import (BOUNDS, CENTROIDS, KEEP_SCORES, ORDER, STAGE_ASSIGN, STAGE_CLUSTERS,
                                        DedupLayout, assign_file, cluster_file)
from curate.stages.dedup.tasks import AssignTask, ClusterTask, assign_task, cluster_task

ROWS_PER_CLUSTER = 10_000  # the default k: ceil(N / this)
TRAIN_ROWS_PER_CLUSTER = 256  # FAISS's own cap per centroid


def default_clusters(n: int) -> int:
    return max(1, math.ceil(n / ROWS_PER_CLUSTER))


def train_centroids(rows: PoolRows, n: int, k: int, train_rows: int, iterations: int, seed: int) -> np.ndarray:
    """Spherical k-means (FAISS) on a seeded sample of `train_rows` pool rows; (k, D) float32 unit rows."""
    import faiss

    rng = np.random.default_rng([seed, 0xD00D])
    sample = np.sort(rng.choice(n, size=train_rows, replace=False)) if train_rows < n else np.arange(n)
    x = np.ascontiguousarray(rows.read(sample), dtype=np.float32)
    if k == 1:
        centroid = x.mean(axis=0, keepdims=True)
    else:
        kmeans = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, spherical=True, verbose=False,
                              max_points_per_centroid=max(TRAIN_ROWS_PER_CLUSTER, -(-train_rows // k)))
        kmeans.train(x)
        centroid = kmeans.centroids
    norms = np.linalg.norm(centroid, axis=1, keepdims=True)
    return (centroid / np.where(norms > 0, norms, 1)).astype(np.float32)


def spans(total: int, count: int) -> list[tuple[int, int]]:
    cuts = [(i * total) // count for i in range(count + 1)]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:])]


def cluster_spans(bounds: np.ndarray, count: int) -> list[tuple[int, int]]:
    """Runs of clusters with about equal pair counts (a cluster of m members costs m²)."""
    sizes = np.diff(bounds).astype(np.float64)
    cost = np.concatenate([[0], np.cumsum(sizes ** 2)])
    cuts = [0] + [int(np.searchsorted(cost, cost[-1] * i / count, side="left")) for i in range(1, count)] + \
        [len(sizes)]
    cuts = sorted(set(min(max(c, 0), len(sizes)) for c in cuts))
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def size_stats(bounds: np.ndarray) -> dict:
    sizes = np.diff(bounds)
    return {"min": int(sizes.min()), "median": float(np.median(sizes)), "p90": float(np.percentile(sizes, 90)),
            "p99": float(np.percentile(sizes, 99)), "max": int(sizes.max()), "singletons": int((sizes == 1).sum()),
            "empty": int((sizes == 0).sum())}


def eps_name(eps: float) -> str:
    return format(eps, "g")


def run(emb: str | Path, out: str | Path, cfg: DedupConfig = DedupConfig(), opts: RunOptions = RunOptions(),
        progress=None) -> DedupResult:
    """SemDeDup of the pool in `emb` (see the package docstring); writes `out` and returns a summary."""
    check_config(cfg)
    check_config(opts)
    if opts.rank is not None or opts.world_size is not None or "SLURM_ARRAY_TASK_ID" in os.environ:
        raise CurateError("curate dedup cannot be split into ranks: its cluster tasks need every row's cluster, so "
                          "one driver runs both rounds; spread them with --executor ray, --workers N or --tasks T")
    if cfg.keep_by == "score" and cfg.scores is None:
        raise CurateError("--keep-by score needs --scores TABLE (a score table with the --score-column, e.g. "
                          "`curate score`'s negclip)")
    started = time.perf_counter()
    out = Path(out)
    pool = open_nonempty_pool(emb, "deduplicate", progress)
    n = pool.n_rows
    cache = pool_cache_dir(out, cfg.cache_dir)
    pool.matrix("image_embedding", cache)  # the fp16 cache every task reads
    phases = {"cache": time.perf_counter() - started}
    k = min(cfg.clusters or default_clusters(n), n)
    train_rows = min(n, cfg.train_rows or TRAIN_ROWS_PER_CLUSTER * k)
    keep_scores = None
    scores_id = None
    if cfg.keep_by == "score":
        keep_scores = scores_in_pool_order(pool, cfg.scores, cfg.score_column)
        st = os.stat(cfg.scores)
        scores_id = f"{Path(cfg.scores).resolve()}|{st.st_size}|{st.st_mtime_ns}|{cfg.score_column}"
    count = max(1, min(int(opts.tasks or DEFAULT_TASKS), n))
    layout = DedupLayout(pool.fingerprint(), k, [float(e) for e in cfg.eps], cfg.keep_by, cfg.against, scores_id,
                         train_rows, cfg.iterations, cfg.seed, cfg.block_rows, count)
    parts = layout_parts_dir(out, "dedup", layout)
    source = pool_source(emb)
    rows = PoolRows(pool, "image_embedding", cache)
    try:
        # written once: ranks or reruns read the same centroids even where their own k-means would differ
        write_once(parts / CENTROIDS, lambda tmp: _save(tmp, train_centroids(rows, n, k, train_rows,
                                                                              cfg.iterations, cfg.seed)))
    finally:
        rows.close()
    phases["kmeans"] = time.perf_counter() - started - sum(phases.values())

    # round 1: every row's nearest centroid
    job = start_map(parts, layout, STAGE_ASSIGN, count, opts.executor, opts.workers)
    row_spans = spans(n, count)
    report = job.run([AssignTask(job.names[i], *row_spans[i], source, str(cache), layout.fingerprint, str(parts))
                      for i in job.todo], assign_task, ray_address=opts.ray_address, retries=opts.retries,
                     label="dedup (assignment map tasks)")
    cluster = np.empty(n, dtype=np.int32)
    centroid_similarity = np.empty(n, dtype=np.float32)
    for name, (a, b) in zip(job.names, row_spans):
        with np.load(assign_file(parts, name)) as data:
            cluster[a:b], centroid_similarity[a:b] = data["cluster"], data["similarity"]
    order = np.argsort(cluster, kind="stable")
    bounds = np.searchsorted(cluster[order], np.arange(k + 1)).astype(np.int64)
    for name, array in ((ORDER, order.astype(np.int64)), (BOUNDS, bounds),
                        ("centroid_similarity.npy", centroid_similarity)) + \
            (((KEEP_SCORES, keep_scores.astype(np.float64)),) if keep_scores is not None else ()):
        write_once(parts / name, lambda tmp, array=array: _save(tmp, array))

    phases["assign"] = time.perf_counter() - started - sum(phases.values())

    # round 2: SemDeDup inside runs of clusters
    runs = cluster_spans(bounds, count)
    job2 = start_map(parts, layout, STAGE_CLUSTERS, len(runs), opts.executor, opts.workers)
    report2 = job2.run([ClusterTask(job2.names[i], *runs[i], source, str(cache), layout.fingerprint, str(parts),
                                    tuple(layout.eps), cfg.keep_by, cfg.against, cfg.seed, cfg.block_rows)
                        for i in job2.todo], cluster_task, ray_address=opts.ray_address, retries=opts.retries,
                       label="dedup (cluster map tasks)")
    keep = np.ones((len(layout.eps), n), dtype=bool)
    duplicate = np.full(n, -1, dtype=np.int64)
    similarity = np.full(n, -np.inf, dtype=np.float32)
    for name in job2.names:
        with np.load(cluster_file(parts, name)) as data:
            members = data["rows"]
            keep[:, members] = data["keep"]
            duplicate[members] = data["duplicate"]
            similarity[members] = data["similarity"]
    if progress:
        progress(n)
    phases["clusters"] = time.perf_counter() - started - sum(phases.values())

    kept = {eps_name(e): int(keep[i].sum()) for i, e in enumerate(layout.eps)}
    stats = size_stats(bounds)
    params = {"clusters": k, "eps": layout.eps, "keep_by": cfg.keep_by, "against": cfg.against,
              "scores": str(cfg.scores) if cfg.scores else None, "score_column": cfg.score_column if cfg.scores else None,
              "train_rows": train_rows, "iterations": cfg.iterations, "seed": cfg.seed, "kept": kept,
              "cluster_sizes": stats, "method": "SemDeDup (Abbas et al. 2023): spherical k-means, then within a "
              "cluster a member is dropped when its cosine to an earlier "
              f"{'kept ' if cfg.against == 'kept' else ''}member exceeds 1 - eps"}
    meta = {"stage": "dedup", "teacher": pool.teacher.to_dict(), "source": str(emb), "n_rows": n, "params": params}
    write_dedup_table(pool, out, cluster, centroid_similarity, similarity, duplicate, keep[0], meta)
    remove_parts(parts, parts_root(out))
    phases["write"] = time.perf_counter() - started - sum(phases.values())
    tasks = {"tasks": count, "cluster_tasks": len(runs),
             "ran": sum(1 for r in report.results + report2.results if r and r["ran"])}
    return DedupResult(str(out), n, k, kept, stats, time.perf_counter() - started, params, tasks,
                       {key: round(value, 3) for key, value in phases.items()})


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def write_dedup_table(pool: EmbeddingPool, out: Path, cluster: np.ndarray, centroid_similarity: np.ndarray,
                      similarity: np.ndarray, duplicate: np.ndarray, keep: np.ndarray, meta: dict) -> None:
    """uid, cluster, centroid_similarity, similarity, duplicate_of (uid), semdedup_keep: one row group per input
    table, atomically."""
    uids = pool.uid_array()
    has_duplicate = duplicate >= 0
    duplicate_uid = pc.if_else(pa.array(has_duplicate), pc.take(uids, pa.array(np.where(has_duplicate, duplicate, 0))),
                               pa.scalar(None, pa.string()))
    schema = pa.schema([("uid", pa.string()), ("cluster", pa.int32()), ("centroid_similarity", pa.float32()),
                        ("similarity", pa.float32()), ("duplicate_of", pa.string()), ("semdedup_keep", pa.int8())])
    schema = with_meta(schema.empty_table(), meta).schema
    similarity = np.where(np.isfinite(similarity), similarity, np.nan).astype(np.float32)
    with atomic_path(out) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd", write_statistics=False, use_dictionary=False) as w:
            start = 0
            for rows in pool.file_rows:
                stop = start + rows
                w.write_table(pa.Table.from_arrays(
                    [uids[start:stop], pa.array(cluster[start:stop]), pa.array(centroid_similarity[start:stop]),
                     pa.array(similarity[start:stop]), duplicate_uid[start:stop],
                     pa.array(keep[start:stop].astype(np.int8))], schema=schema))
                start = stop
