"""`--executor ray`: the same tasks as `LocalExecutor`, run as Ray tasks on a local Ray or a cluster.

Semantics match `LocalExecutor`: results in task order, application errors retried `retries` times inside
the task (`call_with_retries`; Ray's own `max_retries` only covers dead workers, which it also retries),
`CurateError` not retried, failures collected into `RunReport.failures`, `fail_fast` cancels the rest.

`fn` and the tasks travel to other processes (maybe other machines) by pickling: pass a module-level
function of an installed module (e.g. `curate.stages.embed.embed_task`) and plain dataclasses. On a
cluster, every node needs `curate` installed in the same Python environment.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from typing import Any, Callable, Sequence

from curate.errors import CurateError
from curate.run.executor_base import Executor, RunReport, TaskFailure, call_with_retries, task_name

INSTALL_HINT = "pip install 'curate[ray]'"
CONNECT_TIMEOUT_S = 5.0  # Ray itself waits minutes on an address where nothing listens


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise CurateError(f"--executor ray: Ray is not installed ({exc}); {INSTALL_HINT}, or use --executor local") from exc
    return ray


class RayExecutor(Executor):
    """Run `fn(task)` as one Ray task per task, each asking for `num_cpus` CPUs and `num_gpus` GPUs.

    address: None starts a private local Ray for the run (or uses the one this process already has);
    "auto", "HOST:PORT" or "ray://HOST:PORT" connects to a running cluster. Only a Ray this executor
    started or connected is shut down (disconnected) afterwards.
    max_in_flight: tasks submitted at once, so a million-shard run does not queue a million Ray tasks.
    log_to_driver: off by default since task errors come back with their traceback in the report, and
    worker output would interleave with the progress display.
    """

    def __init__(self, address: str | None = None, num_gpus: float = 0.0, num_cpus: float = 1,
                 max_in_flight: int = 4096, log_to_driver: bool = False):
        if num_gpus < 0 or num_cpus < 0:
            raise CurateError(f"Ray resources per task: num_gpus={num_gpus}, num_cpus={num_cpus} must be >= 0")
        self.ray = _import_ray()
        self.address, self.num_gpus, self.num_cpus = address, float(num_gpus), float(num_cpus)
        self.max_in_flight = max(1, int(max_in_flight))
        self.log_to_driver = log_to_driver

    # ------------------------------------------------------------------ connection

    def connect(self) -> bool:
        """Make sure Ray is initialised; True when this call did it (so `run` must shut it down)."""
        ray = self.ray
        if ray.is_initialized():
            return False
        if self.address not in (None, "auto", "local"):
            _check_reachable(self.address)
        try:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=self.log_to_driver,
                     logging_level=logging.WARNING, ignore_reinit_error=True)
        except ConnectionError as exc:
            raise CurateError(f"--ray-address {self.address}: no Ray cluster found ({exc}). Start one with "
                              "`ray start --head`, or leave out --ray-address for a local Ray") from exc
        return True

    def _check_gpus(self, started_locally: bool) -> None:
        if self.num_gpus <= 0:
            return
        have = float(self.ray.cluster_resources().get("GPU", 0.0))
        if have >= self.num_gpus:
            return
        message = (f"--device cuda asks {self.num_gpus:g} GPU per Ray task but the Ray cluster has {have:g}; "
                   "tasks would wait forever")
        if started_locally:  # a private local Ray never grows
            raise CurateError(f"{message}. Use --device cpu, or connect to a cluster with GPUs via --ray-address")
        warnings.warn(f"{message} unless the cluster autoscales GPU nodes", RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ run

    def run(self, fn: Callable, tasks: Sequence[Any], retries: int = 0, fail_fast: bool = False) -> RunReport:
        report = RunReport(results=[None] * len(tasks))
        if not tasks:
            return report
        ray = self.ray
        started = self.connect()
        try:
            private = self.address == "local" or (self.address is None and not os.environ.get("RAY_ADDRESS"))
            self._check_gpus(started_locally=started and private)
            try:
                fn_ref = ray.put(fn)  # pickled once, not once per task
            except Exception as exc:  # noqa: BLE001 - say what to change instead of a pickling traceback
                raise TypeError(f"RayExecutor: cannot send {fn!r} to Ray workers ({exc}); "
                                "pass a module-level function and picklable tasks") from exc
            self._drive(ray.remote(call_with_retries), fn_ref, tasks, retries, fail_fast, report)
        finally:
            if started:
                ray.shutdown()
        return report

    def _drive(self, remote, fn_ref, tasks, retries: int, fail_fast: bool, report: RunReport) -> None:
        ray = self.ray
        in_flight: dict[Any, int] = {}  # object ref -> task index
        try:
            self._loop(remote, fn_ref, tasks, retries, fail_fast, report, in_flight)
        except BaseException:  # Ctrl-C or a driver error: do not leave tasks running on a shared cluster
            for ref in in_flight:
                ray.cancel(ref)
            raise

    def _loop(self, remote, fn_ref, tasks, retries: int, fail_fast: bool, report: RunReport,
              in_flight: dict) -> None:
        ray = self.ray
        next_task = 0
        while next_task < len(tasks) or in_flight:
            while next_task < len(tasks) and len(in_flight) < self.max_in_flight:
                ref = remote.options(
                    name=task_name(tasks[next_task])[:200], num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                    max_retries=retries,  # Ray retries a task whose worker died (OOM kill, segfault) this often
                    retry_exceptions=False,  # application errors are retried inside call_with_retries
                ).remote(fn_ref, tasks[next_task], retries)
                in_flight[ref] = next_task
                next_task += 1
            pending = list(in_flight)
            ready, pending = ray.wait(pending, num_returns=1)
            if pending:  # collect whatever else finished too, so a big window is not scanned once per task
                more, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
                ready += more
            for ref in ready:
                index = in_flight.pop(ref)
                try:
                    report.results[index], failure = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the worker died more often than Ray retries it
                    failure = TaskFailure(task_name(tasks[index]), f"{type(exc).__name__}: {exc}".strip(), retries + 1)
                if failure:
                    report.failures.append(failure)
            if fail_fast and report.failures:
                for ref in in_flight:
                    ray.cancel(ref)  # not forced: a running task gets KeyboardInterrupt, its atomic writes roll back
                in_flight.clear()
                return


def _check_reachable(address: str) -> None:
    """Fail in seconds, with a clear message, when nothing listens at HOST:PORT."""
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit():
        raise CurateError(f"--ray-address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise CurateError(f"--ray-address {address}: cannot reach it ({exc}). Check the head node's address "
                          "(`ray status` on it), or leave out --ray-address for a local Ray") from exc
