"""SemDeDup: `curate dedup` vs its two bare operations on in-memory arrays, phase by phase.

Pool: clustered image embeddings (random centres, cosine ~0.7 to them, 5 % near copies of other rows), so the
clusters are real and some members are duplicates. Stage: `dedup.run` end to end with its default k
(ceil(N / 10000)) and ε = 0.05, local executor, one process; its result records the seconds of each phase.
Limits, with the pool's image rows already in RAM as float32:
* k-means: `faiss.Kmeans(spherical=True)` trained on the same number of rows, same k and iterations, then
  `IndexFlatIP(centroids).search(X, 1)` for every row; against the stage's k-means + assignment phases
  (which read the rows from the pool's fp16 cache).
* per-cluster pairwise: for each of the stage's clusters, `Xc @ Xc.T` in float32 and the reference code's
  rule `max(triu(S, 1), axis=0) > 1 − ε`; against the stage's cluster phase (keep order, blocked products,
  the kept-member rule, the outputs).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np

from common import cpu_seconds
from pool import load_pool_arrays, make_pool

EPS = 0.05


def bare_kmeans_and_assign(x: np.ndarray, k: int, train_rows: int, iterations: int, seed: int) -> np.ndarray:
    import faiss

    sample = x[np.random.default_rng(seed).choice(len(x), size=train_rows, replace=False)] if train_rows < len(x) else x
    kmeans = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, spherical=True, verbose=False,
                          max_points_per_centroid=max(256, -(-train_rows // k)))
    kmeans.train(sample)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(kmeans.centroids)
    _, nearest = index.search(x, 1)
    return nearest[:, 0]


def bare_pairwise(x: np.ndarray, cluster: np.ndarray, eps: float) -> int:
    """Rows the reference code's rule drops, cluster by cluster (the n_c × n_c product in one piece)."""
    order = np.argsort(cluster, kind="stable")
    bounds = np.searchsorted(cluster[order], np.arange(cluster.max() + 2))
    dropped = 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        members = x[order[a:b]]
        sims = members @ members.T
        dropped += int((np.triu(sims, 1).max(axis=0, initial=-1.0) > 1 - eps).sum())
    return dropped


def run(work: Path, n_rows: int, dim: int, repeats: int, log=print) -> dict:
    import pyarrow.parquet as pq

    from curate.config import RunOptions
    from curate.stages.dedup import DedupConfig
    from curate.stages.dedup import entry as dedup

    started = time.perf_counter()
    pool_dir = make_pool(work / f"pool-clustered-{n_rows}x{dim}", n_rows, dim, rows_per_file=50_000, centres=500,
                         duplicates=0.05)
    log(f"  dedup pool ready ({time.perf_counter() - started:.1f} s)")
    x = np.ascontiguousarray(load_pool_arrays(pool_dir, ["image_embedding"])["image_embedding"], dtype=np.float32)
    out = work / "dedup.parquet"
    config = DedupConfig(eps=[EPS], cache_dir=work / "dedup-cache")
    stage_runs, kmeans_runs, pairwise_runs = [], [], []
    first = dedup.run(pool_dir, out, config, RunOptions())  # warm-up (builds the fp16 cache), not counted
    k, train_rows = first.clusters, first.params["train_rows"]
    cluster = pq.read_table(out, columns=["cluster"]).column(0).to_numpy()
    for r in range(repeats):
        for name, fn, runs in (
                ("kmeans limit", lambda: bare_kmeans_and_assign(x, k, train_rows, config.iterations, config.seed),
                 kmeans_runs),
                ("pairwise limit", lambda: bare_pairwise(x, cluster, EPS), pairwise_runs),
                ("stage", lambda: dedup.run(pool_dir, out, config, RunOptions()), stage_runs)):
            gc.collect()
            cpu, wall = cpu_seconds(), time.perf_counter()
            value = fn()
            runs.append({"wall_s": time.perf_counter() - wall, "cpu_s": cpu_seconds() - cpu,
                         **({"phases": value.phases} if name == "stage" else {})})
            log(f"  dedup {name} run {r + 1}/{repeats}: {runs[-1]['wall_s']:.2f} s wall")
    best_kmeans_stage = min(s["phases"]["kmeans"] + s["phases"]["assign"] for s in stage_runs)
    best_clusters_stage = min(s["phases"]["clusters"] for s in stage_runs)
    best_kmeans_limit = min(s["wall_s"] for s in kmeans_runs)
    best_pairwise_limit = min(s["wall_s"] for s in pairwise_runs)
    sizes = np.bincount(cluster)
    return {"n_rows": n_rows, "dim": dim, "clusters": k, "train_rows": train_rows, "eps": EPS,
            "largest_cluster": int(sizes.max()), "kept": first.kept, "stage_runs": stage_runs,
            "kmeans_limit_runs": kmeans_runs, "pairwise_limit_runs": pairwise_runs,
            "best_stage_s": min(s["wall_s"] for s in stage_runs),
            "best_kmeans_stage_s": best_kmeans_stage, "best_kmeans_limit_s": best_kmeans_limit,
            "kmeans_ratio": best_kmeans_stage / best_kmeans_limit,
            "best_clusters_stage_s": best_clusters_stage, "best_pairwise_limit_s": best_pairwise_limit,
            "pairwise_ratio": best_clusters_stage / best_pairwise_limit,
            "reference_rule_dropped": int(bare_pairwise(x, cluster, EPS))}
