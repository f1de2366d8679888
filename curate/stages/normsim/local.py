"""NormSim of a pool in this process (for `curate normsim` without map tasks, and for `curate filter --normsim`)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from curate.config import RunOptions
from curate.errors import CurateError
from curate.io.tables import EmbeddingPool
from curate.run.mapreduce import remove_parts
from curate.run.threads import blas_thread_count
from curate.stages.normsim import NormsimConfig
from curate.stages.normsim.common import (ScoringThreads, block_rows_for, score_rows, score_threads, scorer,
                                          scorer_params, target_and_device)
from curate.stages.normsim.rounds import normsim_2d_params, normsim_2d_parts


def normsim_scores(pool: EmbeddingPool, cfg: NormsimConfig, info: dict | None = None,
                   memmap_dir: str | Path | None = None, progress: Callable[[int], None] | None = None,
                   pending: bool = False) -> "np.ndarray | ScoringThreads":
    """NormSim_p of every pool row, float32 in pool order: against `cfg.target` for p = inf and 2, for p = 2d the
    `normsim_2d_column` values of the schedule of `cfg` (its rounds of map tasks run in this process).

    `memmap_dir`: where the pool's fp16 image cache is read from when it exists (p = inf and 2: None reads the
    tables), and where p = 2d builds it and keeps its round files (default: `cfg.cache_dir`, else
    `<pool dir>/.curate-cache`). `info`, when given, receives what was used (target rows and hash, index
    parameters, the 2-D schedule) for metadata. `pending`: may return a `ScoringThreads` still running (see
    `score_rows`).
    """
    cfg = cfg.checked()
    info = {} if info is None else info
    n = pool.n_rows
    if n == 0:
        raise CurateError(f"{pool.files[0].parent}: the pool has no rows; nothing to score")
    if cfg.p == "2d":
        memmap_dir = Path(memmap_dir or cfg.cache_dir or pool.files[0].parent / ".curate-cache")
        memmap_dir.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=".normsim_2d-", dir=memmap_dir))  # no `out` here to put parts beside
        schedule = cfg.schedule()
        try:
            parts, ran = normsim_2d_parts(pool, pool.files, memmap_dir, root, schedule, RunOptions())
            scores = parts.to_array()
        finally:
            remove_parts(root)
        info.update(normsim_2d_params(schedule, ran))
        if progress:
            progress(n)
        return scores

    target, torch_device = target_and_device(pool, cfg, info)
    params = scorer_params(cfg.p, cfg.index, len(target), pool.dim, torch_device, cfg.nlist, cfg.nprobe)
    info.update(params)
    score_chunk = scorer(cfg.p, cfg.index, target, torch_device, pool.dim, nlist=cfg.nlist, nprobe=cfg.nprobe)
    threads = score_threads(cfg.p, cfg.index, torch_device and torch_device.type, blas_thread_count())
    return score_rows(pool, score_chunk, memmap_dir, 0, n, block_rows_for(cfg.p, params), progress, threads,
                      pending)
