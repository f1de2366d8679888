"""`curate embed`'s entry: which shards this rank embeds, the check that finished shards were made with the same
parameters, the tasks on an executor, the result."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from curate.config import RunOptions, check_config
from curate.errors import CurateError
from curate.io.atomic import sweep_stale_temps
from curate.io.shards import expand_shards, image_folder_units, unique_stems
from curate.io.tables import ERRORS_DIR
from curate.run.executors import make_executor
from curate.run.markers import Markers
from curate.run.ranks import resolve_rank, split_for_rank
from curate.stages.embed import EmbedConfig, EmbedResult
from curate.stages.embed.common import STAGE, EmbedTask, embedding_params
from curate.stages.embed.tasks import embed_task


def embed_inputs(shards_spec, images_only: bool = False) -> list[str]:
    """Shard URLs, or with `images_only` the class folders of an ImageFolder directory (`DIR/CLASS/*.jpg`)."""
    specs = [shards_spec] if isinstance(shards_spec, (str, Path)) else list(shards_spec)
    if len(specs) == 1 and Path(str(specs[0])).is_dir():
        folders = image_folder_units(specs[0])
        if folders is not None:
            if not images_only:
                raise CurateError(f"{specs[0]}: holds image folders, not tar shards; an ImageFolder has no "
                                  "captions: embed it with --images-only (e.g. a NormSim target)")
            return folders
    return expand_shards(shards_spec)


def plan_embed(shards_spec, out_dir: str | Path, rank: int | None = None, world_size: int | None = None,
               images_only: bool = False):
    """The shards this rank still has to embed: (all (url, stem) of this rank, the ones not yet done)."""
    urls = embed_inputs(shards_spec, images_only)
    stems = unique_stems(urls)
    rank, world_size = resolve_rank(rank, world_size)
    mine = split_for_rank(list(zip(urls, stems)), rank, world_size)
    done = Markers(out_dir, STAGE).done()
    return mine, [(u, s) for u, s in mine if s not in done]


def check_done_params(out_dir: Path, mine: list[tuple[str, str]], params: dict, overwrite: bool) -> list[str]:
    """Finished shards of this rank made with other embedding parameters: an error naming the difference, or
    with `overwrite` their stems (their markers removed, so that they are embedded again)."""
    markers = Markers(out_dir, STAGE)
    done = markers.done()
    stale = []
    for _, stem in mine:
        if stem in done:
            earlier = markers.info(stem).get("params")
            if earlier != params:
                stale.append((stem, earlier))
    if not stale:
        return []
    if overwrite:
        for stem, _ in stale:
            markers.path(stem).unlink(missing_ok=True)
        return [stem for stem, _ in stale]
    stem, earlier = stale[0]
    if earlier is None:
        what = "by an earlier version of curate that did not record its teacher"
    else:
        diff = [f"{k} {earlier.get(k)!r} (now {params[k]!r})" for k in params if earlier.get(k) != params[k]]
        what = "with " + ", ".join(diff)
    raise CurateError(f"{out_dir}: {len(stale)} finished shard(s) (e.g. {stem}) were embedded {what}; a pool must "
                      "come from one teacher. Use a new --out, or pass --overwrite to embed them again")


def run(shards_spec, out_dir: str | Path, cfg: EmbedConfig, opts: RunOptions = RunOptions(),
        progress=None) -> EmbedResult:
    """Embed every not-yet-done shard of this rank (opts.tasks groups of shards, one teacher load each). Raises
    CurateError on a task's user error and when shards were to be embedded but not one sample could be;
    shards that failed after their retries are in the result's `failures`."""
    check_config(cfg)
    out_dir = Path(out_dir)
    params = embedding_params(cfg)
    mine, _ = plan_embed(shards_spec, out_dir, opts.rank, opts.world_size, cfg.images_only)
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(out_dir, Markers(out_dir, STAGE).dir, out_dir / ERRORS_DIR)  # left by writers killed earlier
    redone = check_done_params(out_dir, mine, params, cfg.overwrite)
    mine, todo = plan_embed(shards_spec, out_dir, opts.rank, opts.world_size, cfg.images_only)
    tasks = opts.tasks or 1
    groups = [todo[i::tasks] for i in range(max(1, min(tasks, len(todo))))] if todo else []
    task_list = [EmbedTask(f"embed[{','.join(s for _, s in g[:3])}{',…' if len(g) > 3 else ''}]", g, str(out_dir), cfg,
                           retries=opts.retries, fail_fast=opts.fail_fast, params=params)
                 for g in groups]
    if hasattr(progress, "set_total"):
        progress.unit = "shards"
        progress.set_total(len(todo))
    start = time.perf_counter()
    wants_gpu = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    # a task runs the teacher plus its own decode workers: reserve CPUs for all of them
    run_executor = make_executor(opts.executor, workers=1, ray_address=opts.ray_address,
                                 num_gpus=1.0 if wants_gpu else 0.0, num_cpus=float(cfg.workers + 1))
    if opts.executor == "local":
        report = run_executor.run(lambda t: embed_task(t, progress), task_list, retries=opts.retries,
                                  fail_fast=opts.fail_fast)
    else:
        report = run_executor.run(embed_task, task_list, retries=opts.retries, fail_fast=opts.fail_fast)
    report.raise_user_error()  # e.g. weights that cannot be loaded: one line, not a table of failed tasks
    summaries = sorted((asdict(s) for r in report.results if r for s in r), key=lambda s: s["shard"])
    # a shard that failed after its retries is named in `failures` (as task failures are), not in `shards`
    shard_failures = [{"task": f"shard {s['shard']}", "error": s["error"], "attempts": s["attempts"]}
                      for s in summaries if s["error"]]
    summaries = [s for s in summaries if not s["error"]]
    result = EmbedResult(shards_total=len(mine), shards_skipped_done=len(mine) - len(todo), shards=summaries,
                         embedded=sum(s["embedded"] for s in summaries), skipped=sum(s["skipped"] for s in summaries),
                         read=sum(s["read"] for s in summaries),
                         content_uids=sum(s["content_uids"] for s in summaries), redone=redone,
                         random_init=params["pretrained"].lower() == "none", out=str(out_dir),
                         seconds=time.perf_counter() - start,
                         failures=shard_failures + [asdict(f) for f in report.failures])
    if summaries and result.embedded == 0 and not result.failures:
        raise CurateError(nothing_embedded_message(result, cfg.images_only))
    return result


def nothing_embedded_message(result: EmbedResult, images_only: bool) -> str:
    reasons: dict[str, int] = {}
    for s in result.shards:
        for reason, count in s["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + count
    top = ", ".join(f"{reason} ×{count:,}" for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1])[:4])
    hint = "" if images_only or "missing caption" not in reasons else \
        "; to embed images without captions (e.g. a NormSim target) use --images-only"
    return (f"embed: nothing was embedded: {result.read:,} samples read in {len(result.shards)} shard(s), "
            f"every one skipped ({top or 'no samples in the shards'}); the records are in "
            f"{Path(result.out) / ERRORS_DIR}{hint}")
