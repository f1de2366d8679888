"""decontaminate's map tasks: the nearest evaluation image of every pool row of a span."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from curate.io.atomic import atomic_path
from curate.run.markers import Markers
from curate.run.mapreduce import PoolSpanTask
from curate.stages.common import PoolRows

STAGE = "decontaminate"
AGAINST_MATRIX = "against.npy"
IVF_INDEX = "against.ivf"
BLOCK_ROWS = 1 << 14


@dataclass
class NearestTask(PoolSpanTask):
    index: str = "flat"
    nprobe: int = 1


def span_file(parts_dir: str | Path, name: str) -> Path:
    return Path(parts_dir) / f"{name}.npz"


def nearest(queries: np.ndarray, index) -> tuple[np.ndarray, np.ndarray]:
    """(row, inner product) of the nearest indexed vector of each query (FAISS; ties: the lower row)."""
    sims, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), 1)
    return rows[:, 0].astype(np.int64), sims[:, 0].astype(np.float32)


def load_index(parts_dir: Path, kind: str, nprobe: int):
    import faiss

    if kind == "ivf":
        index = faiss.read_index(str(parts_dir / IVF_INDEX))
        index.nprobe = nprobe
        return index
    matrix = np.load(parts_dir / AGAINST_MATRIX)
    index = faiss.IndexFlatIP(matrix.shape[1])
    index.add(matrix)
    return index


def nearest_task(task: NearestTask) -> dict:
    """Write the span's nearest evaluation rows and similarities, then the task's marker."""
    pool = task.open_pool("decontaminate")
    index = load_index(Path(task.parts_dir), task.index, task.nprobe)
    rows = PoolRows(pool, "image_embedding", task.cache_dir)
    nearest_row = np.empty(task.stop - task.start, dtype=np.int64)
    similarity = np.empty(task.stop - task.start, dtype=np.float32)
    try:
        for start in range(task.start, task.stop, BLOCK_ROWS):
            stop = min(task.stop, start + BLOCK_ROWS)
            a, b = start - task.start, stop - task.start
            nearest_row[a:b], similarity[a:b] = nearest(rows.read(slice(start, stop)), index)
    finally:
        rows.close()
    with atomic_path(span_file(task.parts_dir, task.name)) as tmp, open(tmp, "wb") as f:
        np.savez(f, row=nearest_row, similarity=similarity)
    Markers(task.parts_dir, STAGE).mark(task.name, {"rows": task.stop - task.start, "device": "cpu"})
    return {"task": task.name, "ran": True}
