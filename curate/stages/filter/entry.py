"""`curate filter`'s entry: the options checked and parsed, then the in-memory filter (local.py) or, when the run
options ask for map tasks, the same selection as rounds of map tasks (tasks.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from curate.config import RunOptions, check_config
from curate.errors import CurateError
from curate.run.mapreduce import check_task_options
from curate.stages.filter import FilterConfig, FilterResult
from curate.stages.filter.common import drop_tables, group_table_arguments, parse_bound, parse_keep
from curate.stages.filter.local import filter_in_memory
from curate.stages.filter.tasks import filter_in_tasks
from curate.stages.filter.uid_sets import load_uid_lists, uid_list_arguments


def run(tables: Sequence[str | Path], out: str | Path, cfg: FilterConfig = FilterConfig(),
        opts: RunOptions = RunOptions()) -> FilterResult:
    """Read, join, select and write `uids.npy`, `kept.parquet` and `stats.json` (last) into `out`.

    With an executor other than local, workers > 1 or tasks, the same selection runs as map tasks over
    row-aligned tables, with the same outputs; ranks cannot split it (each round needs every task's counts).
    """
    check_config(cfg)
    keeps = [parse_keep(s, cfg.fraction_rule) for s in cfg.keep]
    drops = drop_tables({"drop_duplicates": cfg.drop_duplicates, "drop_contaminated": cfg.drop_contaminated})
    bounds = [d.bound for d in drops] + [parse_bound(s, "min") for s in cfg.min] + \
        [parse_bound(s, "max") for s in cfg.max]
    lists = uid_list_arguments(cfg.include_uids, cfg.union, cfg.exclude_uids)
    if not keeps and not bounds and not lists:
        raise CurateError("nothing to select: give at least one --keep METRIC:FRACTION, --min, --max, a drop "
                          "table (--drop-duplicates, --drop-contaminated) or a uid list (--include-uids, --union, "
                          "--exclude-uids)")
    if cfg.normsim is not None and cfg.target is None:
        raise CurateError("--normsim needs --target (image embeddings: an embedding dir or a .npy/.pt/.parquet "
                          "matrix; imagenet-text; or none with 2d)")
    if not tables:
        raise CurateError("give at least one score table")
    if opts.rank is not None or opts.world_size is not None:
        raise CurateError("curate filter: --rank/--world-size cannot split the filter, whose rounds (one per "
                          "radix digit of each --keep) each need every task's counts; run one driver with "
                          "--executor ray (or --workers N, --tasks T): it submits each round's map tasks itself")
    # what kept.parquet and stats.json record of the call
    args = {"tables": [str(t) for t in tables], "keep": list(cfg.keep), "min": list(cfg.min), "max": list(cfg.max),
            "mode": cfg.mode, "normsim": cfg.normsim, "target": cfg.target,
            "emb": str(cfg.emb) if cfg.emb is not None else None, "fraction_rule": cfg.fraction_rule,
            "drop_duplicates": cfg.drop_duplicates, "drop_contaminated": cfg.drop_contaminated,
            "include_uids": list(cfg.include_uids), "union": list(cfg.union), "exclude_uids": list(cfg.exclude_uids)}
    grouped = group_table_arguments(tables) + drops
    check_task_options(opts.workers, opts.tasks, opts.retries)
    if opts.executor not in ("local", "ray"):
        raise CurateError(f"--executor {opts.executor!r}: choose local or ray")
    # mapreduce.wants_tasks without ranks: a Slurm array's variables do not switch the filter over
    if opts.executor != "local" or int(opts.workers) > 1 or opts.tasks is not None:
        if cfg.normsim is not None:
            raise CurateError("--normsim computes NormSim in memory, which the distributed filter (--executor ray, "
                              "--workers, --tasks) avoids: run `curate normsim` first and pass its table")
        return filter_in_tasks(grouped, out, keeps, bounds, cfg.mode, args, opts, lists=lists)
    return filter_in_memory(grouped, out, keeps, bounds, cfg, args, load_uid_lists(lists))
