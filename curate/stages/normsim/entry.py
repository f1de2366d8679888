"""`curate normsim`'s entry: the checks, p = inf and 2 in this process or as map tasks, p = 2d's rounds, the
table."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from curate.config import RunOptions, check_config
from curate.errors import CurateError
from curate.io.tables import EmbeddingPool
from curate.run.mapreduce import check_task_options, parts_root, remove_parts, remove_single_driver_parts
from curate.stages.common import pool_cache_dir, write_score_table
from curate.stages.normsim import NormsimConfig, NormsimResult, column_name
from curate.stages.normsim.common import ScoringThreads
from curate.stages.normsim.local import normsim_scores
from curate.stages.normsim.rounds import normsim_2d_params, normsim_2d_parts
from curate.stages.normsim.tasks import normsim_parts_started, normsim_scores_by_tasks


def run(emb_dir: str | Path, out: str | Path, cfg: NormsimConfig, opts: RunOptions = RunOptions(),
        progress: Callable[[int], None] | None = None) -> NormsimResult:
    """Compute one NormSim column (`cfg.p`) for the pool in `emb_dir` and write `out`.

    p = inf and 2 run as map tasks (curate.run.mapreduce) when the run options (executor, workers, rank,
    world_size, tasks, or a Slurm array) ask for them, or finished tasks of the same layout lie beside `out`;
    `out` is None in the result while other ranks' tasks are missing, and `normsim_tasks` says how many.
    p = 2d is always one driver running rounds of map tasks (rounds.py; `normsim_2d_tasks` says what ran), in
    this process unless executor/workers say otherwise; a rank split (rank/world_size, Slurm) is an error.
    """
    started = time.perf_counter()
    cfg = cfg.checked()
    check_config(opts)
    check_task_options(opts.workers, opts.tasks, opts.retries)
    pool = EmbeddingPool(emb_dir)
    if hasattr(progress, "set_total"):
        progress.set_total(pool.n_rows)
    memmap_dir = pool_cache_dir(out, cfg.cache_dir)
    if cfg.p == "2d" and (opts.rank is not None or opts.world_size is not None
                          or "SLURM_ARRAY_TASK_ID" in os.environ):
        raise CurateError("--p 2d cannot be split into ranks: each of its rounds needs every map task's result, so "
                          "one driver submits them all. Leave out --rank/--world-size and run it outside a Slurm "
                          "array; --executor ray, --workers N and --tasks T spread its map tasks")
    if pool.n_rows == 0:
        raise CurateError(f"{pool.files[0].parent}: the pool has no rows; nothing to score")
    if cfg.p == "2d":
        return _run_2d(pool, emb_dir, out, memmap_dir, cfg, opts, progress, started)
    # Parquet list vectors cost ~1 µs per row to decode: the one pass reads the fp16 cache, built here once
    # (each rank builds it when missing; the writes are atomic and the bytes identical)
    pool.matrix("image_embedding", memmap_dir)
    distributed = opts.distributed()
    if not distributed and parts_root(out).exists():  # finished tasks of this layout: a plain rerun completes them
        distributed = normsim_parts_started(pool, cfg, out, opts.tasks)
    tasks_info = None
    if distributed:
        scores, info, tasks_info = normsim_scores_by_tasks(pool, emb_dir, cfg, out, memmap_dir, opts, progress)
        if scores is None:  # other ranks' tasks are still missing: whoever finishes last reduces
            seconds = time.perf_counter() - started
            return NormsimResult(None, pool.n_rows, column_name(cfg.p), seconds,
                                 pool.n_rows / seconds if seconds > 0 else float("inf"), {"p": cfg.p, **info}, 0,
                                 normsim_tasks=tasks_info)
    else:
        info = {}
        scores = normsim_scores(pool, cfg, info, memmap_dir=memmap_dir, progress=progress, pending=True)
    name = column_name(cfg.p)
    params = {"p": cfg.p, **info}
    meta = {"stage": "normsim", "teacher": pool.teacher.to_dict(), "source": str(emb_dir),
            "n_rows": pool.n_rows, "params": params}
    with scores if isinstance(scores, ScoringThreads) else contextlib.nullcontext():
        write_score_table(pool, {name: scores}, out, meta)  # a table's rows as soon as they are scored
        scores = scores.result() if isinstance(scores, ScoringThreads) else scores
    remove_single_driver_parts(tasks_info, out)
    seconds = time.perf_counter() - started
    return NormsimResult(str(out), pool.n_rows, name, seconds, pool.n_rows / seconds if seconds > 0 else float("inf"),
                         params, int(np.isnan(scores).sum()), normsim_tasks=tasks_info)


def _run_2d(pool: EmbeddingPool, emb_dir, out, memmap_dir, cfg: NormsimConfig, opts: RunOptions, progress,
            started: float) -> NormsimResult:
    """p = 2d: the rounds with their parts in `<out>.parts/`, then the table from the parts."""
    schedule = cfg.schedule()
    parts, ran = normsim_2d_parts(pool, emb_dir, memmap_dir, parts_root(out), schedule, opts)
    params = {"p": "2d", **normsim_2d_params(schedule, ran)}
    meta = {"stage": "normsim", "teacher": pool.teacher.to_dict(), "source": str(emb_dir),
            "n_rows": pool.n_rows, "params": params}
    try:
        write_score_table(pool, {column_name("2d"): parts}, out, meta)  # one table at a time from the parts
    finally:
        remove_parts(parts.parts_dir, parts_root(out))
    if progress:
        progress(pool.n_rows)
    seconds = time.perf_counter() - started
    note = None
    if ran["executor"] != "local" or ran["workers"] > 1:
        where = "ray" if ran["executor"] == "ray" else f"{ran['workers']} worker processes"
        note = f"{ran['map_rounds']} rounds of map tasks over {ran['tasks']} runs of tables ({where})"
    return NormsimResult(str(out), pool.n_rows, column_name("2d"), seconds,
                         pool.n_rows / seconds if seconds > 0 else float("inf"), params, 0, normsim_2d_tasks=ran,
                         note=note)
