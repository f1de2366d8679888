"""Map tasks + a reduce beside an output file, shared by `curate score` (negclip) and `curate normsim`.

A stage describes its work by a layout (a dataclass of everything that fixes the map outputs) and a task
count T that does not depend on the world size. The layout's hash names the parts directory
`<out>.parts/<prefix>-<hash>/`, so a changed pool or parameter never reuses stale outputs. Task i is named
`tNNNNN`; rank R of W takes tasks R, R+W, ... (curate.run.ranks) and runs those without a completion marker
through an executor. Whoever then finds every task marked runs the stage's reduce; the others report how many
are missing. What each task computes, and the reduce, stay in the stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from curate.errors import CurateError
from curate.io.atomic import sweep_stale_temps, temp_path, write_text_atomic
from curate.run.executor_base import RunReport
from curate.run.executors import make_executor
from curate.run.markers import Markers
from curate.run.ranks import resolve_rank, split_for_rank
from curate.io.tables import EmbeddingPool

DEFAULT_TASKS = 32  # map tasks per run (not per rank): the layout must not depend on the world size


@dataclass
class PoolSpanTask:
    """What every map task over a pool needs: its name and pool span, where the pool and its fp16 caches
    are, the pool version it was planned for (a task refuses a changed pool) and where its output goes."""

    name: str
    start: int
    stop: int
    emb_dir: str | list[str]
    cache_dir: str
    fingerprint: str
    parts_dir: str

    def open_pool(self, command: str):
        """The task's EmbeddingPool; a clear error when its tables changed since the run was planned."""

        pool = EmbeddingPool(self.emb_dir)
        if pool.fingerprint() != self.fingerprint:
            raise CurateError(f"{self.emb_dir}: the embedding tables changed since this {command} run started "
                              f"(names, sizes or mtimes differ); rerun `curate {command}` on the final tables")
        return pool


def pool_source(emb_dir) -> str | list[str]:
    """The pool source as plain strings, so a task pickles the same everywhere."""
    return [str(f) for f in emb_dir] if isinstance(emb_dir, (list, tuple)) else str(emb_dir)


def open_task_output(parts_dir: str | Path, stage: str, name: str, count: int):
    """Task `name`'s float32 `.npy` output opened after its header (the caller reads and closes it); a
    missing, unreadable or wrongly shaped file is a clear error saying which file and marker to delete."""
    path = task_file(parts_dir, name)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise CurateError(f"{path}: map output of a task marked done is missing or unreadable ({exc}); "
                          f"delete it and {Markers(parts_dir, stage).path(name)}, then rerun") from None
    try:
        np.lib.format.read_magic(f)
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    except ValueError as exc:
        f.close()
        raise CurateError(f"{path}: map output of a task marked done is missing or unreadable ({exc}); "
                          f"delete it and {Markers(parts_dir, stage).path(name)}, then rerun") from None
    if dtype != np.float32 or shape != (count,):
        f.close()
        raise CurateError(f"{path}: holds {shape} {dtype}, expected ({count},) float32; "
                          "delete it and its marker, then rerun")
    return f


def parts_root(out: str | Path) -> Path:
    """Where map outputs of `out` live: `<out>.parts/` beside it."""
    out = Path(out)
    return out.parent / f"{out.name}.parts"


def layout_key(layout) -> str:
    """16 hex digits of the sha256 of the layout dataclass as sorted JSON."""
    return hashlib.sha256(json.dumps(asdict(layout), sort_keys=True).encode()).hexdigest()[:16]


def remove_parts(parts_dir: str | Path, root: str | Path | None = None) -> None:
    """Delete a run's parts once its output is written (they are a copy of it), and `root` (`<out>.parts/`)
    too when no other run's parts are left in it."""
    shutil.rmtree(parts_dir, ignore_errors=True)
    if root is not None:
        with contextlib.suppress(OSError):
            Path(root).rmdir()


def remove_single_driver_parts(tasks_info: dict | None, out: str | Path) -> None:
    """After a map/reduce stage wrote `out`: delete its parts when this run was the only driver (no rank
    split). With ranks (Slurm arrays, --rank/--world-size) they stay: another rank that found every task
    done may be reducing from them at this moment; they are safe to delete once `out` exists."""
    if tasks_info is not None and tasks_info.get("world_size") == 1:
        remove_parts(tasks_info["parts_dir"], parts_root(out))


def layout_parts_dir(out: str | Path, prefix: str, layout) -> Path:
    return parts_root(out) / f"{prefix}-{layout_key(layout)}"


def task_names(count: int) -> list[str]:
    return [f"t{index:05d}" for index in range(count)]


def task_file(parts_dir: str | Path, name: str) -> Path:
    """The `.npy` map output of task `name`."""
    return Path(parts_dir) / f"{name}.npy"


def wants_tasks(executor: str, workers: int, tasks: int | None, rank: int | None, world_size: int | None) -> bool:
    """True when any option (or a Slurm array) asks for map tasks instead of one in-process pass."""
    return (executor != "local" or int(workers) > 1 or tasks is not None or rank is not None
            or world_size is not None or "SLURM_ARRAY_TASK_ID" in os.environ)


def check_task_options(workers: int, tasks: int | None, retries: int) -> None:
    if int(workers) < 1:
        raise CurateError(f"--workers must be >= 1, got {workers}")
    if tasks is not None and int(tasks) < 1:
        raise CurateError(f"--tasks must be >= 1, got {tasks}")
    if int(retries) < 0:
        raise CurateError(f"--retries must be >= 0, got {retries}")


def parts_started(parts_dir: str | Path, stage: str) -> bool:
    """True when an earlier run left finished map tasks in `parts_dir` (a rerun then completes them)."""
    return bool(Markers(parts_dir, stage).done())


def write_once(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Publish `path` unless it exists: `write(tmp)` fills a temp file that is hard-linked into place.

    Unlike a rename, the link never replaces a file another rank published first, so every rank reads
    the same bytes even when its own would differ (e.g. a k-means trained on another CPU).
    """
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


@dataclass
class MapJob:
    """This rank's share of a stage's map tasks: which are its own, which of those still lack a marker."""

    parts_dir: Path
    stage: str
    names: list[str]
    rank: int
    world_size: int
    mine: list[int]  # indices of this rank's tasks
    todo: list[int]  # those without a marker when the job started
    executor: str
    workers: int

    @property
    def markers(self) -> Markers:
        return Markers(self.parts_dir, self.stage)

    @property
    def in_process(self) -> bool:
        """True when the tasks run in this process (then a progress callback and open files can be shared)."""
        return self.executor == "local" and (self.workers == 1 or len(self.todo) <= 1)

    def run(self, tasks: Sequence[Any], fn: Callable, local_fn: Callable | None = None, *,
            ray_address: str | None = None, retries: int = 1, num_gpus: float = 0.0, num_cpus: float = 1.0,
            label: str = "map tasks") -> RunReport:
        """Run `tasks` (built for `todo`) through the executor; `local_fn` instead of `fn` when in process.

        `fn` must pickle (a module-level function) for worker processes and Ray. Failures raise CurateError.
        """
        executor = make_executor(self.executor, workers=self.workers, ray_address=ray_address,
                                 num_gpus=num_gpus, num_cpus=num_cpus)
        chosen = local_fn if (self.in_process and local_fn is not None) else fn
        report = executor.run(chosen, list(tasks), retries=retries)
        report.raise_if_failed(label)
        return report

    def missing(self) -> list[str]:
        done = self.markers.done()
        return [name for name in self.names if name not in done]

    def summary(self, report: RunReport) -> dict:
        """What the stage reports as `<stage>_tasks`; `reduced` True (with the devices the tasks ran on,
        from their markers) when every task is marked and the stage may reduce."""
        missing = self.missing()
        info = {"parts_dir": str(self.parts_dir), "tasks": len(self.names), "rank": self.rank,
                "world_size": self.world_size, "rank_tasks": len(self.mine),
                "ran": sum(1 for result in report.results if result and result["ran"]),
                "already_done": len(self.mine) - len(self.todo), "missing": len(missing), "reduced": False}
        if not missing:
            markers = self.markers
            devices = sorted({markers.info(name).get("device", "?") for name in self.names})
            info.update(reduced=True, device="+".join(devices))
        return info


def start_map(parts_dir: str | Path, layout, stage: str, count: int, executor: str = "local", workers: int = 1,
              rank: int | None = None, world_size: int | None = None) -> MapJob:
    """Create `parts_dir` (with the layout as JSON, for people), resolve the rank, pick its unmarked tasks."""
    parts_dir = Path(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(parts_dir, Markers(parts_dir, stage).dir)  # left by writers killed in an earlier run
    write_text_atomic(parts_dir / "layout.json", json.dumps(asdict(layout), indent=1, sort_keys=True))
    names = task_names(count)
    markers = Markers(parts_dir, stage)
    rank, world_size = resolve_rank(rank, world_size)
    mine = split_for_rank(list(range(count)), rank, world_size)
    todo = [index for index in mine if not markers.is_done(names[index])]
    return MapJob(parts_dir, stage, names, rank, world_size, mine, todo, executor, int(workers))
