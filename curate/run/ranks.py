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
    if rank is None and world_size is None and "SLURM_ARRAY_TASK_ID" in os.environ:
        task = int(os.environ["SLURM_ARRAY_TASK_ID"])
        offset = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        rank, world_size = task - offset, int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "1"))
    rank = 0 if rank is None else rank
    world_size = 1 if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise CurateError(f"--rank {rank} --world-size {world_size}: need world-size >= 1 and 0 <= rank < world-size")
    return rank, world_size


def split_for_rank(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    return list(items[rank::world_size])
