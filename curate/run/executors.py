"""Executors run a stage's independent tasks (usually groups of shards) with retries and a failure summary.

One interface, several back ends, as in DataTrove: `LocalExecutor` (in-process for 1 worker, a process
pool otherwise) and `RayExecutor` (curate/run/ray_executor.py). A task that still fails after `retries`
is reported; the other tasks finish first unless `fail_fast`.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing as mp
from typing import Iterator

from curate.errors import CurateError
from curate.run.executor_base import Executor, RunReport, TaskFailure, call_with_retries, task_name


class LocalExecutor(Executor):
    """In process for 1 worker (or 1 task), else a process pool: `pool` when given (kept up across runs by
    `executor_session`), otherwise one started for each run."""

    def __init__(self, workers: int = 1, pool: cf.ProcessPoolExecutor | None = None):
        self.workers = max(1, int(workers))
        self.pool = pool

    def run(self, fn, tasks, retries=0, fail_fast=False):
        report = RunReport(results=[None] * len(tasks))
        if self.workers == 1 or len(tasks) <= 1:
            for i, task in enumerate(tasks):
                report.results[i], failure = call_with_retries(fn, task, retries)
                if failure:
                    report.failures.append(failure)
                    if fail_fast:
                        break
            return report
        if self.pool is not None:
            return _run_in_pool(self.pool, fn, tasks, retries, fail_fast, report)
        with _process_pool(self.workers) as pool:
            return _run_in_pool(pool, fn, tasks, retries, fail_fast, report)


def _process_pool(workers: int) -> cf.ProcessPoolExecutor:
    # spawn, not fork: tasks may use torch, whose thread pools do not survive a fork safely
    return cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))


def _run_in_pool(pool: cf.ProcessPoolExecutor, fn, tasks, retries: int, fail_fast: bool,
                 report: RunReport) -> RunReport:
    futures = {pool.submit(call_with_retries, fn, t, retries): i for i, t in enumerate(tasks)}
    for fut in cf.as_completed(futures):
        i = futures[fut]
        try:
            report.results[i], failure = fut.result()
        except Exception as exc:  # noqa: BLE001 - the worker process died (killed, out of memory)
            failure = TaskFailure(task_name(tasks[i]), f"{type(exc).__name__}: {exc}", 1)
        if failure:
            report.failures.append(failure)
            if fail_fast:
                for other in futures:
                    other.cancel()
                break
    return report


def make_executor(name: str = "local", workers: int = 1, ray_address: str | None = None,
                  num_gpus: float = 0.0, num_cpus: float = 1.0) -> Executor:
    """`num_gpus`/`num_cpus`: resources each Ray task asks for (ignored by the local executor)."""
    if name == "local":
        return LocalExecutor(workers)
    if name == "ray":
        from curate.run.ray_executor import RayExecutor

        return RayExecutor(address=ray_address, num_gpus=num_gpus, num_cpus=num_cpus)
    raise CurateError(f"--executor {name!r}: choose local or ray")


@contextlib.contextmanager
def executor_session(name: str = "local", workers: int = 1, ray_address: str | None = None,
                     num_gpus: float = 0.0, num_cpus: float = 1.0) -> Iterator[Executor]:
    """One executor for the several runs of a driver (the rounds of the distributed filter and NormSim_2-D):
    the local executor keeps one process pool up (starting one per round cost ~1 s each), Ray stays
    connected (each run would otherwise start and stop a local Ray)."""
    if name == "local" and int(workers) > 1:
        with _process_pool(int(workers)) as pool:
            yield LocalExecutor(workers, pool)
        return
    executor = make_executor(name, workers=workers, ray_address=ray_address, num_gpus=num_gpus, num_cpus=num_cpus)
    started = name == "ray" and executor.connect()
    try:
        yield executor
    finally:
        if started:
            executor.ray.shutdown()
