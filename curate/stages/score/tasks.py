"""negclip as map tasks + a reduce (curate.run.mapreduce): what a task runs, and the driver that submits this
rank's tasks and, once every task is done, sums their terms in the in-process order."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from curate.config import RunOptions
from curate.io.atomic import atomic_path
from curate.io.tables import EmbeddingPool
from curate.run.mapreduce import PoolSpanTask, open_task_output, pool_source, start_map, task_file
from curate.run.markers import Markers
from curate.stages.common import PoolRows
from curate.stages.score import ScoreConfig
from curate.stages.score.common import NEGCLIP_STAGE, negclip_layout, negclip_parts_dir


@dataclass
class NegclipTask(PoolSpanTask):
    """Map task: the batches with flat index start..stop-1 (curate.metrics.negclip.task_spans)."""

    logit_scale: float
    batch_size: int
    seed: int
    device: str
    tile_elements: int
    threads: int = 0  # torch CPU threads in a worker process (0: as the process has them)


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


def negclip_lse_sum_by_tasks(pool: EmbeddingPool, emb_dir, image: PoolRows, text: PoolRows, out: str | Path,
                             cache: Path, cfg: ScoreConfig, device, opts: RunOptions = RunOptions(),
                             progress: Callable[[int], None] | None = None) -> tuple[np.ndarray | None, dict]:
    """Σ of the LSE terms per sample (curate.metrics.negclip.negclip_lse_sum's) by map tasks: run this rank's
    not-yet-done tasks, then the reduce if every task is done.

    Returns (the sums, or None when tasks are still missing; info about the tasks and devices).
    """
    import torch

    from curate.metrics.negclip import reduce_span_terms, span_own_count, task_spans

    n, k, batch_size, seed = pool.n_rows, int(cfg.k), int(cfg.batch_size), int(cfg.seed)
    layout = negclip_layout(pool, k, batch_size, seed, opts.tasks)
    spans = task_spans(n, batch_size, k, layout.tasks)
    job = start_map(negclip_parts_dir(out, layout), layout, NEGCLIP_STAGE, len(spans), opts.executor,
                    int(opts.workers), opts.rank, opts.world_size)
    parts_dir, names = job.parts_dir, job.names
    # spawned workers would each start one torch thread per core; Ray sets its workers' own thread count
    threads = max(1, torch.get_num_threads() // int(opts.workers)) \
        if opts.executor == "local" and not job.in_process else 0
    source = pool_source(emb_dir)
    task_list = [NegclipTask(names[i], spans[i][0], spans[i][1], source, str(cache), layout.fingerprint,
                             str(parts_dir), layout.logit_scale, batch_size, seed, str(device),
                             layout.tile_elements, threads)
                 for i in job.todo]
    run_options = {"ray_address": opts.ray_address, "retries": int(opts.retries),
                   "num_gpus": 1.0 if device.type == "cuda" else 0.0, "label": "score (negclip map tasks)"}
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
        sums = reduce_span_terms(n, batch_size, seed, spans, files.open)
    finally:
        files.close()
    return sums, info
