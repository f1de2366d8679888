"""NormSim p = inf and 2 as map tasks + a reduce (curate.run.mapreduce): each task scores a run of whole tables
against the target the first rank stored beside the parts; the reduce is a concatenation in pool order."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from curate.config import RunOptions
from curate.errors import CurateError
from curate.io.atomic import atomic_path
from curate.io.tables import EmbeddingPool
from curate.io.targets import matrix_digest
from curate.run.mapreduce import (DEFAULT_TASKS, PoolSpanTask, layout_parts_dir, open_task_output, parts_started,
                                  pool_source, start_map, task_file, write_once)
from curate.run.markers import Markers
from curate.run.threads import blas_thread_count, blas_threads
from curate.stages.normsim import NormsimConfig
from curate.stages.normsim.common import (block_rows_for, score_rows, score_threads, scorer, scorer_params,
                                          table_spans, target_and_device)
from curate.metrics import normsim as ns

NORMSIM_STAGE = "normsim"
TARGET_FILE = "_target.npy"  # beside the tNNNNN.npy outputs, never matched by t*.npy
IVF_FILE = "_ivf.faiss"


@dataclass
class NormsimLayout:
    """Everything that fixes the map outputs; its hash names the parts directory `normsim_<p>-<hash>`."""

    fingerprint: str
    n_rows: int
    dim: int
    p: str
    target_sha256: str
    target_rows: int
    index: str
    nlist: int | None
    nprobe: int | None
    block_rows: int
    tasks: int
    numpy: str
    faiss: str  # ivf only: the index is faiss's


@dataclass
class NormsimTask(PoolSpanTask):
    """Map task: NormSim of pool rows start..stop-1 (whole tables) into `<parts>/<name>.npy`."""

    p: str
    index: str
    nprobe: int | None
    target_sha256: str
    block_rows: int
    device: str
    blas_threads: int  # the BLAS thread count of the run's driver, which a row's bits depend on (0: leave)


def normsim_layout(pool: EmbeddingPool, p: str, params: dict, block_rows: int, tasks: int | None) -> NormsimLayout:
    faiss_version = ""
    if params.get("index") == "ivf":
        import faiss

        faiss_version = faiss.__version__
    return NormsimLayout(pool.fingerprint(), pool.n_rows, pool.dim, p, params["target_sha256"],
                         params["target_rows"], params.get("index", "flat"), params.get("nlist"),
                         params.get("nprobe"), int(block_rows), int(tasks or DEFAULT_TASKS), np.__version__,
                         faiss_version)


# One pool and scorer per process: a worker (spawned or Ray) running several tasks loads the target once.
_TASK_STATE: dict[tuple, tuple[EmbeddingPool, Callable]] = {}


def _task_state(task: NormsimTask) -> tuple[EmbeddingPool, Callable]:
    key = (str(task.emb_dir), task.fingerprint, task.parts_dir, task.device)
    if key not in _TASK_STATE:
        pool = task.open_pool("normsim")
        target_path = Path(task.parts_dir) / TARGET_FILE
        target = np.load(target_path)
        if matrix_digest(target) != task.target_sha256:
            raise CurateError(f"{target_path}: holds another target than this run's (sha256 "
                              f"{matrix_digest(target)}, expected {task.target_sha256}); delete it and rerun")
        faiss_index = None
        if task.p == "inf" and task.index == "ivf":
            import faiss

            faiss_index = faiss.read_index(str(Path(task.parts_dir) / IVF_FILE))
            faiss_index.nprobe = int(task.nprobe)
        device = None
        if task.p == "inf" and task.index == "flat":
            import torch

            device = torch.device(task.device)
        _TASK_STATE.clear()
        _TASK_STATE[key] = (pool, scorer(task.p, task.index, target, device, pool.dim, faiss_index=faiss_index))
    return _TASK_STATE[key]


def normsim_map_task(task: NormsimTask, progress: Callable[[int], None] | None = None) -> dict:
    """Score one span into `<parts>/<name>.npy` (float32, pool order), then mark it."""
    markers = Markers(task.parts_dir, NORMSIM_STAGE)
    if markers.is_done(task.name):  # another rank or an earlier attempt finished it
        return {"task": task.name, "ran": False}
    started = time.perf_counter()
    with blas_threads(task.blas_threads):  # the scorer (e.g. the second moment) is BLAS too
        pool, score_chunk = _task_state(task)
        # the cache when this process finds it, else the tables: the same blocks, the same bytes
        threads = score_threads(task.p, task.index, task.device.split(":")[0], task.blas_threads or blas_thread_count())
        scores = score_rows(pool, score_chunk, task.cache_dir, task.start, task.stop, task.block_rows,
                            progress, threads)
    with atomic_path(task_file(task.parts_dir, task.name)) as tmp, open(tmp, "wb") as f:
        np.save(f, scores)
    device = task.device.split(":")[0]  # the device type, as the one-process metadata records it
    markers.mark(task.name, {"device": device, "rows": task.stop - task.start, "start": task.start,
                             "stop": task.stop, "seconds": round(time.perf_counter() - started, 3)})
    return {"task": task.name, "ran": True}


def _plan(pool: EmbeddingPool, cfg: NormsimConfig, out, tasks: int | None):
    """(layout, parts dir, target, torch device, params) of a map-task run of the checked config `cfg`."""
    params: dict = {}
    target, torch_device = target_and_device(pool, cfg, params)
    params.update(scorer_params(cfg.p, cfg.index, len(target), pool.dim, torch_device, cfg.nlist, cfg.nprobe))
    layout = normsim_layout(pool, cfg.p, params, block_rows_for(cfg.p, params), tasks)
    return layout, layout_parts_dir(out, f"normsim_{cfg.p}", layout), target, torch_device, params


def normsim_parts_started(pool: EmbeddingPool, cfg: NormsimConfig, out, tasks: int | None) -> bool:
    """True when a distributed run of the checked config `cfg` left finished map tasks beside `out`."""
    _, parts_dir, *_ = _plan(pool, cfg, out, tasks)
    return parts_started(parts_dir, NORMSIM_STAGE)


def normsim_scores_by_tasks(pool: EmbeddingPool, emb_dir, cfg: NormsimConfig, out, memmap_dir,
                            opts: RunOptions = RunOptions(), progress: Callable[[int], None] | None = None
                            ) -> tuple[np.ndarray | None, dict, dict]:
    """NormSim_p (p = inf or 2, `cfg` checked) of every pool row by map tasks: run this rank's unmarked tasks,
    then the reduce if every task is done.

    Returns (scores in pool order or None while tasks are missing, params for the metadata, task info).
    The target (and the ivf index) go to the parts directory once, first writer wins, and every task
    scores against those bytes, so ranks never disagree on them.
    """
    p, index = cfg.p, cfg.index
    layout, parts_dir, target, torch_device, params = _plan(pool, cfg, out, opts.tasks)
    spans = table_spans(pool, layout.tasks)
    job = start_map(parts_dir, layout, NORMSIM_STAGE, len(spans), opts.executor, int(opts.workers), opts.rank,
                    opts.world_size)

    def save_target(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, target)

    if job.todo:
        write_once(parts_dir / TARGET_FILE, save_target)
    if job.todo and p == "inf" and index == "ivf":
        import faiss

        write_once(parts_dir / IVF_FILE, lambda tmp: faiss.write_index(
            _ivf_index(target, layout.nlist, layout.nprobe), str(tmp)))
    flat = p == "inf" and index == "flat"
    source = pool_source(emb_dir)
    device_name = str(torch_device) if flat else "cpu"
    threads = blas_thread_count() or 0
    task_list = [NormsimTask(job.names[i], spans[i][0], spans[i][1], source, str(memmap_dir), layout.fingerprint,
                             str(parts_dir), p, index, layout.nprobe, layout.target_sha256, layout.block_rows,
                             device_name, threads)
                 for i in job.todo]
    try:
        report = job.run(task_list, normsim_map_task, lambda t: normsim_map_task(t, progress),
                         ray_address=opts.ray_address, retries=int(opts.retries),
                         num_gpus=1.0 if flat and torch_device.type == "cuda" else 0.0,
                         label=f"normsim {p} (map tasks)")
    finally:
        _TASK_STATE.clear()  # in process: do not keep the target (maybe on the GPU) after the run
    info = job.summary(report)
    if not info["reduced"]:
        return None, params, info
    if flat:  # the devices the map tasks ran on (equal to an in-process run's when they agree)
        params["device"] = info["device"]
    scores = np.empty(pool.n_rows, dtype=np.float32)
    for name, (start, stop) in zip(job.names, spans):
        with open_task_output(parts_dir, NORMSIM_STAGE, name, stop - start) as f:
            scores[start:stop] = np.fromfile(f, np.float32, stop - start)
    return scores, params, info


def _ivf_index(target: np.ndarray, nlist: int, nprobe: int):

    return ns.build_ivf_index(target, nlist, nprobe)
