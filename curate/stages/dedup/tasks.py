"""dedup's map tasks: the nearest centroid of every row of a span, then SemDeDup inside a run of clusters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from curate.io.atomic import atomic_path
from curate.metrics.semdedup import keep_order, semdedup_cluster
from curate.run.markers import Markers
from curate.run.mapreduce import PoolSpanTask
from curate.stages.common import PoolRows
from curate.stages.dedup.common import (BOUNDS, CENTROIDS, KEEP_SCORES, ORDER, STAGE_ASSIGN, STAGE_CLUSTERS,
                                        assign_file, cluster_file)

ASSIGN_BLOCK_ROWS = 1 << 16


@dataclass
class AssignTask(PoolSpanTask):
    """Rows start..stop-1 of the pool: their nearest centroid."""


@dataclass
class ClusterTask(PoolSpanTask):
    """Clusters start..stop-1 (not pool rows): SemDeDup of each."""

    eps: tuple = ()
    keep_by: str = "centroid"
    against: str = "kept"
    seed: int = 0
    block_rows: int = 1024


def nearest_centroids(rows: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index, cosine) of the nearest centroid of each row (ties: the lower index)."""
    sims = np.asarray(rows, dtype=np.float32) @ centroids.T
    best = np.argmax(sims, axis=1)
    return best.astype(np.int32), sims[np.arange(len(rows)), best].astype(np.float32)


def assign_task(task: AssignTask) -> dict:
    """Write the span's nearest centroids, then the task's marker."""
    pool = task.open_pool("dedup")
    centroids = np.load(Path(task.parts_dir) / CENTROIDS)
    rows = PoolRows(pool, "image_embedding", task.cache_dir)
    try:
        cluster = np.empty(task.stop - task.start, dtype=np.int32)
        similarity = np.empty(task.stop - task.start, dtype=np.float32)
        for start in range(task.start, task.stop, ASSIGN_BLOCK_ROWS):
            stop = min(task.stop, start + ASSIGN_BLOCK_ROWS)
            block = rows.read(slice(start, stop))
            cluster[start - task.start:stop - task.start], similarity[start - task.start:stop - task.start] = \
                nearest_centroids(block, centroids)
    finally:
        rows.close()
    with atomic_path(assign_file(task.parts_dir, task.name)) as tmp, open(tmp, "wb") as f:
        np.savez(f, cluster=cluster, similarity=similarity)
    Markers(task.parts_dir, STAGE_ASSIGN).mark(task.name, {"rows": task.stop - task.start})
    return {"task": task.name, "ran": True}


def cluster_task(task: ClusterTask) -> dict:
    """SemDeDup of clusters task.start..task.stop-1: per member row its keep flag at every ε, the row it
    duplicates (first ε) and its similarity; then the task's marker."""
    pool = task.open_pool("dedup")
    parts = Path(task.parts_dir)
    order = np.load(parts / ORDER, mmap_mode="r")
    bounds = np.load(parts / BOUNDS)
    centroid_similarity = np.load(parts / "centroid_similarity.npy", mmap_mode="r")
    scores = np.load(parts / KEEP_SCORES, mmap_mode="r") if task.keep_by == "score" else None
    rows = PoolRows(pool, "image_embedding", task.cache_dir)
    out_rows, keeps, duplicates, similarities = [], [], [], []
    try:
        for cluster in range(task.start, task.stop):
            members = np.asarray(order[bounds[cluster]:bounds[cluster + 1]])
            if not len(members):
                continue
            rng = np.random.default_rng([task.seed, cluster])
            visit = members[keep_order(np.asarray(centroid_similarity[members]), task.keep_by,
                                       None if scores is None else np.asarray(scores[members]), rng)]
            # rows read in pool order (sequential reads), then put in the visiting order
            sorted_rows = np.sort(visit)
            embeddings = rows.read(sorted_rows)[np.searchsorted(sorted_rows, visit)]
            keep_all = np.empty((len(task.eps), len(visit)), dtype=bool)
            for e, eps in enumerate(task.eps):
                keep, duplicate, similarity = semdedup_cluster(embeddings, eps, task.against, task.block_rows)
                keep_all[e] = keep
                if e == 0:
                    duplicates.append(np.where(duplicate >= 0, visit[np.maximum(duplicate, 0)], -1))
                    similarities.append(similarity)
            out_rows.append(visit)
            keeps.append(keep_all)
    finally:
        rows.close()
    cat = lambda parts_, dtype, shape=(0,): np.concatenate(parts_, axis=-1) if parts_ else np.zeros(shape, dtype)  # noqa: E731
    with atomic_path(cluster_file(task.parts_dir, task.name)) as tmp, open(tmp, "wb") as f:
        np.savez(f, rows=cat(out_rows, np.int64), keep=cat(keeps, bool, (len(task.eps), 0)),
                 duplicate=cat(duplicates, np.int64), similarity=cat(similarities, np.float32))
    Markers(task.parts_dir, STAGE_CLUSTERS).mark(task.name, {"clusters": task.stop - task.start})
    return {"task": task.name, "ran": True}
