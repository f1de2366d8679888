"""Stateless shard assignment: rank R of W takes items R, R+W, R+2W, ... of the sorted list.

Every rank computes the same split with no coordinator, so a Slurm array (or any batch system) can run
the same command W times. SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT fill in when not given.
"""

from __future__ import annotations

import os
from typing import Sequence, TypeVar

from curate.errors import CurateError

T = TypeVar("T")


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size) from the options, each missing one filled from a Slurm array's environment."""
    if "SLURM_ARRAY_TASK_ID" in os.environ:
        if rank is None:
            task, first = _slurm_int("SLURM_ARRAY_TASK_ID"), _slurm_int("SLURM_ARRAY_TASK_MIN", 0)
            step = _slurm_int("SLURM_ARRAY_TASK_STEP", 1) or 1
            if (task - first) % step:
                raise CurateError(f"SLURM_ARRAY_TASK_ID={task} is not on the array's grid (min {first}, step {step}); "
                                  "use a plain range such as --array=0-99, or pass --rank")
            rank = (task - first) // step
        if world_size is None:
            world_size = _slurm_int("SLURM_ARRAY_TASK_COUNT", 1)
    if rank is None and world_size not in (None, 1):
        # defaulting to rank 0 would silently process only 1/W of the shards
        raise CurateError(f"--world-size {world_size} without --rank: pass --rank (0..{world_size - 1}) "
                          "or run inside a Slurm array (SLURM_ARRAY_TASK_ID)")
    rank = 0 if rank is None else rank
    world_size = 1 if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise CurateError(f"--rank {rank} --world-size {world_size}: need world-size >= 1 and 0 <= rank < world-size"
                          + (" (a sparse Slurm array? use --array=0-N)" if "SLURM_ARRAY_TASK_ID" in os.environ else ""))
    return rank, world_size


def _slurm_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise CurateError(f"environment variable {name}={value!r}: expected an integer (set by Slurm arrays)") from None


def split_for_rank(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Items rank, rank+W, ...: for ranks 0..W-1 a partition of `items`, the same on every machine."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise CurateError(f"--rank {rank} --world-size {world_size}: need world-size >= 1 and 0 <= rank < world-size")
    return list(items[rank::world_size])
