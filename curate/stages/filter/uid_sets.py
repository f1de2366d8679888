"""The filter's set algebra with uid lists released by others (DFN's, HYPE's) or made by us: --include-uids
(intersection), --union and --exclude-uids (difference), the same in the in-memory and the map-task filter.

Order, fixed whatever the order on the command line (README "Combining subsets"): S is the score selection
(drops, thresholds, keeps); then S = S ∩ I for each --include-uids I; then S = S ∪ (U ∩ A) for each --union U,
where A is the pool rows that pass --drop-duplicates and --drop-contaminated (a union never brings back a row
those dropped); then S = S − E for each --exclude-uids E. Every step is per row, so a span's counts add up
to the pool's: each step records the rows before and after, the pool rows listed, and the listed uids that
are not in the pool (counted and reported, never silently ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from curate.io.atomic import atomic_path
from curate.io.uids import DATACOMP_DTYPE, find_pairs, read_uid_list
from curate.stages.filter import StepStats

OPERATIONS = ("include_uids", "union", "exclude_uids")  # in the order they are applied
FLAGS = {"include_uids": "--include-uids", "union": "--union", "exclude_uids": "--exclude-uids"}


@dataclass(frozen=True)
class UidList:
    """One --include-uids / --union / --exclude-uids argument: its sorted unique `u8,u8` pairs, in memory
    (`pairs`) or, for map tasks, in a copy of the run's own (`path`: a file nobody else truncates under a map)."""

    operation: str
    source: str
    listed: int
    path: str | None = None
    pairs: np.ndarray | None = field(default=None, repr=False, compare=False)

    def halves(self) -> tuple[np.ndarray, np.ndarray]:
        if self.pairs is not None:
            pairs = self.pairs
        else:  # a memory map of 0 bytes cannot be made
            pairs = np.load(self.path, mmap_mode="r") if self.listed else np.empty(0, DATACOMP_DTYPE)
        return pairs["f0"], pairs["f1"]


def uid_list_arguments(include: Sequence[str], union: Sequence[str], exclude: Sequence[str]) -> list[tuple[str, str]]:
    """(operation, source) in the order they are applied."""
    given = {"include_uids": include, "union": union, "exclude_uids": exclude}
    return [(op, str(source)) for op in OPERATIONS for source in given[op]]


def load_uid_lists(arguments: Sequence[tuple[str, str]], copies_dir: Path | None = None) -> list[UidList]:
    """Read every list (a bad file is an error now, before any selection work): kept in memory, or, with
    `copies_dir`, written there sorted and unique for map tasks to memory-map."""
    lists = []
    for number, (operation, source) in enumerate(arguments):
        pairs = read_uid_list(source)
        if copies_dir is None:
            lists.append(UidList(operation, source, len(pairs), pairs=pairs))
            continue
        path = Path(copies_dir) / f"list{number:02d}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, pairs)
        lists.append(UidList(operation, source, len(pairs), path=str(path)))
    return lists


def listed_rows(uid_list: UidList, high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """Which rows (uid halves) the list holds: a binary search per row."""
    return find_pairs(*uid_list.halves(), high, low) >= 0


def combine(selected: np.ndarray, allowed: np.ndarray, lists: Sequence[UidList], high: np.ndarray,
            low: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
    """Apply the lists to a span's selection mask; `allowed`: rows passing the drop steps. Returns the new mask
    and, per list, [rows before, rows after, pool rows listed, listed rows a union refused (dropped)]."""
    counts = []
    for uid_list in lists:
        listed = listed_rows(uid_list, high, low)
        before = int(selected.sum())
        refused = 0
        if uid_list.operation == "include_uids":
            selected = selected & listed
        elif uid_list.operation == "union":
            refused = int((listed & ~allowed & ~selected).sum())
            selected = selected | (listed & allowed)
        else:
            selected = selected & ~listed
        counts.append([before, int(selected.sum()), int(listed.sum()), refused])
    return selected, counts


def list_step_stats(lists: Sequence[UidList], counts: Sequence[Sequence[int]]) -> list[StepStats]:
    """stats.json's steps for the lists, from the pool's summed counts."""
    steps = []
    for uid_list, (before, after, in_pool, refused) in zip(lists, counts):
        steps.append(StepStats(uid_list.operation, "uid", before, after, max(before - after, 0),
                               uids=uid_list.source, listed=uid_list.listed, listed_in_pool=in_pool,
                               not_in_pool=uid_list.listed - in_pool, added=max(after - before, 0),
                               refused_dropped=refused if uid_list.operation == "union" else None))
    return steps


def not_in_pool_note(steps: Sequence[StepStats]) -> list[str]:
    """One line per list some of whose uids are not in the pool (the CLI prints them)."""
    return [f"{FLAGS[s.step]} {s.uids}: {s.not_in_pool} of its {s.listed} uids are not in the pool"
            for s in steps if s.step in FLAGS and s.not_in_pool]
