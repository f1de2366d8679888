"""`curate score`: CLIPScore and negCLIPLoss of a whole embedding pool -> one Parquet score table.

Passes over the pool (pool order = files sorted by name, rows in file order):
1. s_ii (clipscore) per row, and a check that every embedding is finite and non-zero (one NaN row would
   poison the LSE of its whole batch): streamed from the tables row group by row group, or, when negclip
   is asked for, read back sequentially from its caches (step 2) instead of reading and decoding the
   Parquet tables a second time.
2. negclip only: the image and text columns as fp16 `.npy` caches (`EmbeddingPool.matrix`, built once
   per pool version). For each of K partitions and each of its ⌈N/b⌉ batches, the batch's rows are
   gathered with sorted indices, moved to the device, and the row/column LSE terms computed in float32
   tiles (curate.metrics.negclip). Rows are read with positional reads, not through a memory map (see
   PoolRows), so RSS stays O(b·D + tile) beyond the O(N) output columns: the pool never sits in RAM.
   This is the one global pass. Distributed (--rank/--world-size or a Slurm array, --executor, --workers,
   --tasks), the K·⌈N/b⌉ (partition, batch) pairs are cut into T contiguous map tasks (`negclip_map_task`,
   run by curate.run.mapreduce, which `curate normsim` shares):
   each writes its float32 terms to `<out>.parts/negclip-<layout hash>/tNNNNN.npy`, then a completion
   marker; whoever finds every task marked runs the reduce (curate.metrics.negclip.reduce_span_terms,
   same order as in-process, so the table is byte-identical) and writes the table. Every rank builds a
   missing cache itself first (atomic rename of identical bytes). Finished tasks beside `out` are picked
   up by any later run with the same layout, also one without distributed options.
3. Write `uid` + float32 score columns, one row group per input table, atomically, with the parameters
   and the teacher in the `curate` metadata.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

from curate.config import RunOptions, check_config, option, positive
from curate.errors import CurateError
from curate.io.atomic import atomic_path
from curate.io.tables import EmbeddingPool, to_float32
from curate.models.teacher import resolve_device
from curate.stages.common import PoolRows, check_finite, pool_cache_dir, write_score_table
from curate.run.mapreduce import (DEFAULT_TASKS, PoolSpanTask, check_task_options, layout_key, layout_parts_dir,
                                  open_task_output, parts_started, pool_source, start_map, task_file, wants_tasks)
from curate.run.mapreduce import parts_root  # noqa: F401 - re-exported: where negclip's map outputs live
from curate.run.mapreduce import remove_single_driver_parts
from curate.run.markers import Markers

METRICS = ("clipscore", "negclip")
SCORE_RUN_OPTIONS = ("executor", "workers", "tasks", "retries", "ray_address", "rank", "world_size")


@dataclass(frozen=True)
class ScoreConfig:
    metrics: List[str] = option(list(METRICS), "Metrics to compute (repeat, or comma-separated): clipscore, "
                                "negclip.", "--metric")
    k: int = option(10, "negclip: number of random partitions of the pool (K).", "--k", check=positive)
    batch_size: int = option(32768, "negclip: batch size B (min(B, N) is used).", "--batch-size", check=positive)
    seed: int = option(0, "negclip: partition seed; the same seed gives identical scores.")
    device: str = option("auto", "auto (cuda when present), cpu or cuda.")
    cache_dir: Optional[Path] = option(None, "Where the fp16 memmap caches go (default: OUT's directory/"
                                       ".curate-cache).", "--cache-dir")


@dataclass
class ScoreResult:
    out: str | None  # None: this rank finished its map tasks, others are missing (`negclip_tasks` says how many)
    rows: int
    metrics: list[str]
    seconds: float
    rows_per_s: float
    params: dict
    teacher: dict
    negclip_tasks: dict | None = None


def parse_metrics(metrics: str | Sequence[str]) -> list[str]:
    """Metric names from a list whose items may be comma-separated (`--metric clipscore,negclip`)."""
    items = [metrics] if isinstance(metrics, str) else list(metrics)
    names = [m.strip() for item in items for m in str(item).split(",")]
    names = list(dict.fromkeys(m for m in names if m))
    if not names:
        raise CurateError(f"no metric given; use one or more of {', '.join(METRICS)}")
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise CurateError(f"unknown metric {', '.join(unknown)}; `curate score` computes {', '.join(METRICS)} "
                          "(NormSim is `curate normsim`)")
    return names


def clipscore_pass(pool: EmbeddingPool) -> np.ndarray:
    """Pass 1: s_ii of every row, streamed; also rejects non-finite embeddings."""
    from curate.metrics.clipscore import clipscore

    s_ii = np.empty(pool.n_rows, dtype=np.float32)
    row = 0
    for _, chunk in pool.iter_chunks(["image_embedding", "text_embedding"], dtype=np.float16):
        image, text = chunk["image_embedding"], chunk["text_embedding"]
        check_finite(pool, image, row, "image_embedding")
        check_finite(pool, text, row, "text_embedding")
        s_ii[row:row + len(image)] = clipscore(image, text)
        row += len(image)
    return s_ii


def clipscore_from_rows(image: PoolRows, text: PoolRows, chunk_rows: int = 1 << 13) -> np.ndarray:
    """s_ii of every row from the `.npy` caches, read in sequential slices (every read is checked by PoolRows).

    When negclip builds the caches anyway, this replaces the second Parquet pass: the rows come back from
    the cache as a sequential read, with no Parquet pages to decode.
    """
    from curate.metrics.clipscore import clipscore

    s_ii = np.empty(len(image), dtype=np.float32)
    # fp16 -> float32 through torch into two reused buffers: numpy's conversion costs more than the dot products
    buffers = [np.empty((min(chunk_rows, len(image)),) + tuple(image.shape[1:]), np.float32) for _ in range(2)]
    for start in range(0, len(image), chunk_rows):
        s_ii[start:start + chunk_rows] = clipscore(to_float32(image[start:start + chunk_rows], out=buffers[0]),
                                                   to_float32(text[start:start + chunk_rows], out=buffers[1]))
    return s_ii


# ---------------------------------------------------------------- negclip as map tasks + a reduce

NEGCLIP_STAGE = "negclip"
DEFAULT_NEGCLIP_TASKS = DEFAULT_TASKS


@dataclass
class NegclipTask(PoolSpanTask):
    """Map task: the batches with flat index start..stop-1 (curate.metrics.negclip.task_spans)."""

    logit_scale: float
    batch_size: int
    seed: int
    device: str
    tile_elements: int
    threads: int = 0  # torch CPU threads in a worker process (0: as the process has them)


@dataclass
class NegclipLayout:
    """Everything that fixes the map outputs; its hash names the parts directory, so a changed pool or
    parameter never reuses stale terms."""

    fingerprint: str
    n_rows: int
    dim: int
    logit_scale: float
    k: int
    batch_size: int
    seed: int
    tasks: int
    tile_elements: int
    numpy: str  # the permutations are numpy's

    def key(self) -> str:
        return layout_key(self)


def negclip_layout(pool: EmbeddingPool, k: int, batch_size: int, seed: int, tasks: int | None) -> NegclipLayout:
    from curate.metrics.negclip import DEFAULT_TILE_ELEMENTS

    return NegclipLayout(pool.fingerprint(), pool.n_rows, pool.dim, float(pool.teacher.logit_scale), int(k),
                         int(batch_size), int(seed), int(tasks or DEFAULT_NEGCLIP_TASKS), DEFAULT_TILE_ELEMENTS,
                         np.__version__)


def negclip_parts_dir(out: str | Path, layout: NegclipLayout) -> Path:
    return layout_parts_dir(out, "negclip", layout)


# One pool's rows per process: a worker (spawned or Ray) running several tasks opens the caches once.
_TASK_ROWS: dict[tuple, tuple[PoolRows, PoolRows]] = {}


def _task_rows(task: NegclipTask) -> tuple[PoolRows, PoolRows]:
    key = _rows_key(task.emb_dir, task.cache_dir, task.fingerprint)
    if key not in _TASK_ROWS:
        pool = task.open_pool("score")
        for old in _TASK_ROWS.values():
            for rows in old:
                rows.close()
        _TASK_ROWS.clear()
        _TASK_ROWS[key] = (PoolRows(pool, "image_embedding", task.cache_dir),
                           PoolRows(pool, "text_embedding", task.cache_dir))
    return _TASK_ROWS[key]


def _rows_key(emb_dir, cache_dir, fingerprint: str) -> tuple:
    return (str(emb_dir), str(cache_dir), fingerprint)


def negclip_map_task(task: NegclipTask, progress: Callable[[int], None] | None = None) -> dict:
    """Compute one span's terms into `<parts>/<name>.npy` (float32, own members in batch order), then mark it."""
    import torch

    from curate.metrics.negclip import span_own_count, span_terms

    markers = Markers(task.parts_dir, NEGCLIP_STAGE)
    if markers.is_done(task.name):  # another rank or an earlier attempt finished it
        return {"task": task.name, "ran": False}
    started = time.perf_counter()
    if task.threads:
        torch.set_num_threads(task.threads)  # terms do not depend on it (module docstring of negclip)
    image, text = _task_rows(task)
    n = len(image)
    expected = span_own_count(n, task.batch_size, task.start, task.stop)
    path = task_file(task.parts_dir, task.name)
    written = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                 "fortran_order": False, "shape": (expected,)})
        for terms in span_terms(image, text, task.logit_scale, task.batch_size, task.seed, task.start, task.stop,
                                task.device, task.tile_elements, on_batch=progress):
            terms.tofile(f)
            written += len(terms)
        if written != expected:
            raise RuntimeError(f"{task.name}: computed {written} terms, the partition scheme says {expected}")
    markers.mark(task.name, {"device": torch.device(task.device).type, "terms": expected, "start": task.start,
                             "stop": task.stop, "seconds": round(time.perf_counter() - started, 3)})
    return {"task": task.name, "ran": True}


class SpanFiles:
    """`open(index)` -> take(count): the next `count` stored terms of span `index`, read from its file."""

    def __init__(self, parts_dir: Path, names: Sequence[str], counts: Sequence[int]):
        self.parts_dir, self.names, self.counts = parts_dir, names, counts
        self._file = None

    def open(self, index: int) -> Callable[[int], np.ndarray]:
        self.close()
        self._file = f = open_task_output(self.parts_dir, NEGCLIP_STAGE, self.names[index], self.counts[index])
        return lambda count: np.fromfile(f, np.float32, count)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def negclip_distributed(pool: EmbeddingPool, emb_dir, image: PoolRows, text: PoolRows, out: str | Path,
                        cache: Path, k: int, batch_size: int, seed: int, device, executor: str = "local",
                        workers: int = 1, ray_address: str | None = None, rank: int | None = None,
                        world_size: int | None = None, retries: int = 1, tasks: int | None = None,
                        progress: Callable[[int], None] | None = None) -> tuple[np.ndarray | None, dict]:
    """Run this rank's not-yet-done map tasks, then the reduce if every task is done.

    Returns (Σ terms per sample or None when tasks are still missing, info about the tasks and devices).
    """
    import torch

    from curate.metrics.negclip import reduce_span_terms, span_own_count, task_spans

    n = pool.n_rows
    layout = negclip_layout(pool, k, batch_size, seed, tasks)
    spans = task_spans(n, batch_size, k, layout.tasks)
    job = start_map(negclip_parts_dir(out, layout), layout, NEGCLIP_STAGE, len(spans), executor, workers,
                    rank, world_size)
    parts_dir, names = job.parts_dir, job.names
    # spawned workers would each start one torch thread per core; Ray sets its workers' own thread count
    threads = max(1, torch.get_num_threads() // workers) if executor == "local" and not job.in_process else 0
    source = pool_source(emb_dir)
    task_list = [NegclipTask(names[i], spans[i][0], spans[i][1], source, str(cache), layout.fingerprint,
                             str(parts_dir), layout.logit_scale, int(batch_size), int(seed), str(device),
                             layout.tile_elements, threads)
                 for i in job.todo]
    run_options = {"ray_address": ray_address, "retries": retries, "num_gpus": 1.0 if device.type == "cuda" else 0.0,
                   "label": "score (negclip map tasks)"}
    if job.in_process:  # then progress works too
        rows_key = _rows_key(source, cache, layout.fingerprint)
        _TASK_ROWS[rows_key] = (image, text)  # the caches this process already has open
        try:
            report = job.run(task_list, negclip_map_task, lambda t: negclip_map_task(t, progress), **run_options)
        finally:
            _TASK_ROWS.pop(rows_key, None)
    else:
        report = job.run(task_list, negclip_map_task, **run_options)
    info = job.summary(report)
    if not info["reduced"]:
        return None, info
    files = SpanFiles(parts_dir, names, [span_own_count(n, batch_size, a, b) for a, b in spans])
    try:
        sums = reduce_span_terms(n, int(batch_size), int(seed), spans, files.open)
    finally:
        files.close()
    return sums, info


def negclip_parts_started(out: str | Path, pool: EmbeddingPool, k: int, batch_size: int, seed: int,
                          tasks: int | None) -> bool:
    """True when a distributed run with these parameters left finished map tasks beside `out`."""
    return parts_started(negclip_parts_dir(out, negclip_layout(pool, k, batch_size, seed, tasks)), NEGCLIP_STAGE)


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
    k, batch_size, seed, device, cache_dir = cfg.k, cfg.batch_size, cfg.seed, cfg.device, cfg.cache_dir
    executor, workers, ray_address, rank, world_size, retries, tasks = (
        opts.executor, opts.workers, opts.ray_address, opts.rank, opts.world_size, opts.retries, opts.tasks)
    started = time.perf_counter()
    names = parse_metrics(cfg.metrics)
    if progress is not None and "negclip" in names:
        progress = ScaledProgress(progress, 1.0 / max(1, int(k)))  # K passes over N samples: the bar counts samples
    check_task_options(workers, tasks, retries)
    torch_device = resolve_device(device)
    pool = EmbeddingPool(emb_dir)
    n = pool.n_rows
    if n == 0:
        raise CurateError(f"{emb_dir}: the pool has no rows; nothing to score")
    if hasattr(progress, "set_total"):
        progress.set_total(n)
    distributed = wants_tasks(executor, workers, tasks, rank, world_size)

    columns: dict[str, np.ndarray] = {}
    params: dict = {"metrics": names}
    summary: dict = {}
    lse_sum = None
    if "negclip" in names:
        cache = pool_cache_dir(out, cache_dir)
        # every rank builds a missing cache itself (atomic rename of identical bytes, so racing ranks agree)
        image = PoolRows(pool, "image_embedding", cache)
        text = PoolRows(pool, "text_embedding", cache)
        if distributed or negclip_parts_started(out, pool, k, batch_size, seed, tasks):
            lse_sum, info = negclip_distributed(pool, emb_dir, image, text, out, cache, int(k), int(batch_size),
                                                int(seed), torch_device, executor, int(workers), ray_address,
                                                rank, world_size, int(retries), tasks, progress)
            summary["negclip_tasks"] = info
            if lse_sum is None:  # other ranks' tasks are still missing: whoever finishes last reduces
                seconds = time.perf_counter() - started
                return ScoreResult(None, n, names, seconds, n / seconds if seconds > 0 else float("inf"), params,
                                   pool.teacher.to_dict(), summary.get("negclip_tasks"))
        s_ii = clipscore_from_rows(image, text)
    else:
        s_ii = clipscore_pass(pool)
        if progress:
            progress(n)
    if "clipscore" in names:
        columns["clipscore"] = s_ii
    if "negclip" in names:
        b = effective_batch_size(n, batch_size)
        if lse_sum is None:
            lse_sum = negclip_lse_sum(image, text, pool.teacher.logit_scale, int(k), int(batch_size), int(seed),
                                      torch_device, on_batch=progress)
        columns["negclip"] = negclip_from_lse_sum(s_ii, lse_sum, pool.teacher.logit_scale, int(k))
        del lse_sum
        params.update({"k": int(k), "batch_size": int(batch_size), "effective_batch_size": b, "seed": int(seed),
                       "batches_per_partition": -(-n // b),
                       "partition_scheme": "numpy default_rng([seed, k]).permutation; ragged batch filled by "
                                           "rng.choice (curate.metrics.negclip)",
                       "numpy": np.__version__})
    # distributed: the devices the map tasks ran on (equal to an in-process run's when they agree)
    params["device"] = summary["negclip_tasks"]["device"] if "negclip_tasks" in summary else torch_device.type
    meta = {"stage": "score", "teacher": pool.teacher.to_dict(), "source": str(emb_dir), "n_rows": n,
            "params": params}
    write_score_table(pool, columns, out, meta)
    remove_single_driver_parts(summary.get("negclip_tasks"), out)
    seconds = time.perf_counter() - started
    return ScoreResult(str(out), n, names, seconds, n / seconds if seconds > 0 else float("inf"), params,
                       pool.teacher.to_dict(), summary.get("negclip_tasks"))
