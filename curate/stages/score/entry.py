"""`curate score`'s entry: the passes in order, negclip in this process or as map tasks, the table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from curate.config import RunOptions, check_config
from curate.models.teacher import resolve_device
from curate.run.mapreduce import check_task_options, remove_single_driver_parts
from curate.stages.common import PoolRows, open_nonempty_pool, pool_cache_dir, write_score_table
from curate.stages.score import ScoreConfig, ScoreResult
from curate.stages.score.common import negclip_parts_started, parse_metrics
from curate.stages.score.local import clipscore_from_rows, clipscore_from_tables
from curate.stages.score.tasks import negclip_lse_sum_by_tasks


class ScaledProgress:
    """`progress` advanced by `factor` x n (e.g. one negclip batch of a K-partition pass counts n / K samples);
    `set_total` passes through."""

    def __init__(self, progress: Callable[[float], None], factor: float):
        self.progress, self.factor = progress, factor
        if hasattr(progress, "set_total"):
            self.set_total = progress.set_total

    def __call__(self, n: float) -> None:
        self.progress(n * self.factor)


def run(emb_dir: str | Path, out: str | Path, cfg: ScoreConfig = ScoreConfig(), opts: RunOptions = RunOptions(),
        progress: Callable[[int], None] | None = None) -> ScoreResult:
    """Score a pool and write `out`.

    negclip runs in this process unless the run options (executor, workers, ranks, tasks, or a Slurm array)
    ask for map tasks, or finished map tasks of the same layout lie beside `out` (a rerun completes them).
    Distributed, `out` is None in the result when this rank finished its tasks but others are missing;
    `negclip_tasks` then says how many.
    """
    from curate.metrics.negclip import effective_batch_size, negclip_from_lse_sum, negclip_lse_sum

    check_config(cfg)
    k, batch_size, seed = int(cfg.k), int(cfg.batch_size), int(cfg.seed)
    started = time.perf_counter()
    names = parse_metrics(cfg.metrics)
    if progress is not None and "negclip" in names:
        progress = ScaledProgress(progress, 1.0 / max(1, k))  # K passes over N samples: the bar counts samples
    check_task_options(opts.workers, opts.tasks, opts.retries)
    torch_device = resolve_device(cfg.device)
    pool = open_nonempty_pool(emb_dir, "score", progress)
    n = pool.n_rows

    columns: dict[str, np.ndarray] = {}
    params: dict = {"metrics": names}
    tasks_info = None
    lse_sum = None
    if "negclip" in names:
        cache = pool_cache_dir(out, cfg.cache_dir)
        # every rank builds a missing cache itself (atomic rename of identical bytes, so racing ranks agree)
        image = PoolRows(pool, "image_embedding", cache)
        text = PoolRows(pool, "text_embedding", cache)
        if opts.distributed() or negclip_parts_started(out, pool, k, batch_size, seed, opts.tasks):
            lse_sum, tasks_info = negclip_lse_sum_by_tasks(pool, emb_dir, image, text, out, cache, cfg,
                                                           torch_device, opts, progress)
            if lse_sum is None:  # other ranks' tasks are still missing: whoever finishes last reduces
                seconds = time.perf_counter() - started
                return ScoreResult(None, n, names, seconds, n / seconds if seconds > 0 else float("inf"), params,
                                   pool.teacher.to_dict(), tasks_info)
        s_ii = clipscore_from_rows(image, text)
    else:
        s_ii = clipscore_from_tables(pool)
        if progress:
            progress(n)
    if "clipscore" in names:
        columns["clipscore"] = s_ii
    if "negclip" in names:
        b = effective_batch_size(n, batch_size)
        if lse_sum is None:
            lse_sum = negclip_lse_sum(image, text, pool.teacher.logit_scale, k, batch_size, seed, torch_device,
                                      on_batch=progress)
        columns["negclip"] = negclip_from_lse_sum(s_ii, lse_sum, pool.teacher.logit_scale, k)
        del lse_sum
        params.update({"k": k, "batch_size": batch_size, "effective_batch_size": b, "seed": seed,
                       "batches_per_partition": -(-n // b),
                       "partition_scheme": "numpy default_rng([seed, k]).permutation; ragged batch filled by "
                                           "rng.choice (curate.metrics.negclip)",
                       "numpy": np.__version__})
    # distributed: the devices the map tasks ran on (equal to an in-process run's when they agree)
    params["device"] = tasks_info["device"] if tasks_info else torch_device.type
    meta = {"stage": "score", "teacher": pool.teacher.to_dict(), "source": str(emb_dir), "n_rows": n,
            "params": params}
    write_score_table(pool, columns, out, meta)
    remove_single_driver_parts(tasks_info, out)
    seconds = time.perf_counter() - started
    return ScoreResult(str(out), n, names, seconds, n / seconds if seconds > 0 else float("inf"), params,
                       pool.teacher.to_dict(), tasks_info)
