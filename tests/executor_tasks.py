"""Task functions for tests/run/test_executors.py, in their own module so that spawned processes and Ray workers
can import them by name (functions defined inside a test module could not be pickled by reference).

Every task leaves a trace in files, never in memory, because it runs in another process: `calls/` gets
one line per invocation, so a test can count how often each task ran.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from curate.errors import CurateError
from curate.io.atomic import write_bytes_atomic
from curate.run.markers import Markers


@dataclass
class FileTask:
    name: str
    out_dir: str
    seed: int
    fail_times: int = 0  # raise RuntimeError on the first `fail_times` calls, then succeed
    user_error: bool = False  # raise CurateError (must not be retried)
    exit_process: bool = False  # kill the worker process outright (os._exit)
    sleep_s: float = 0.0


def calls(out_dir: str | Path, name: str) -> int:
    path = Path(out_dir) / "calls" / name
    return len(path.read_text().splitlines()) if path.exists() else 0


def _count_call(out_dir: str, name: str) -> int:
    path = Path(out_dir) / "calls" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # O_APPEND: one whole line per call even from parallel workers
        f.write(f"{os.getpid()}\n")
    return calls(out_dir, name)


def write_file_task(task: FileTask) -> dict:
    """Write `<name>.bin` (seeded random bytes) atomically; return its size and sha256."""
    attempt = _count_call(task.out_dir, task.name)
    if task.sleep_s:
        time.sleep(task.sleep_s)
    if task.exit_process:
        os._exit(3)
    if task.user_error:
        raise CurateError(f"{task.name}: bad input, will not get better")
    if attempt <= task.fail_times:
        raise RuntimeError(f"{task.name}: transient failure {attempt}")
    data = np.random.default_rng(task.seed).integers(0, 256, size=1000 + task.seed, dtype=np.uint8).tobytes()
    write_bytes_atomic(Path(task.out_dir) / f"{task.name}.bin", data)
    return {"name": task.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@dataclass
class ShardTask:
    """A stage-like unit: one 'shard' -> one output file, then its completion marker (written last)."""

    shard: str
    out_dir: str


def shard_stage_task(task: ShardTask) -> str:
    _count_call(task.out_dir, task.shard)
    data = hashlib.sha256(task.shard.encode()).digest() * 64
    write_bytes_atomic(Path(task.out_dir) / f"{task.shard}.out", data)
    Markers(task.out_dir, "toy").mark(task.shard, {"bytes": len(data)})
    return task.shard
