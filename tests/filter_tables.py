"""The tables `curate filter` reads and writes, for its tests: uid-aligned columns split over Parquet files,
and the check that two filter outputs (uids.npy, kept.parquet, stats.json) are the same."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_split(directory: Path, uids: list[str], sizes: list[int], columns: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    start = 0
    for index, size in enumerate(sizes):
        part = {"uid": pa.array(uids[start:start + size], pa.string())}
        part.update({name: column.slice(start, size) for name, column in columns.items()})
        pq.write_table(pa.table(part), directory / f"part-{index:05d}.parquet")
        start += size
    return directory


def assert_same_outputs(memory: Path, distributed: Path) -> None:
    assert (memory / "uids.npy").read_bytes() == (distributed / "uids.npy").read_bytes()
    want, got = pq.read_table(memory / "kept.parquet"), pq.read_table(distributed / "kept.parquet")
    assert got.schema.equals(want.schema, check_metadata=True)
    for name in want.column_names:
        w, g = want.column(name).to_numpy(), got.column(name).to_numpy()
        if w.dtype.kind == "f":
            w, g = w.view(f"u{w.itemsize}"), g.view(f"u{g.itemsize}")  # bits: NaN and -0.0 included
        assert np.array_equal(w, g), name
    stats_m = json.loads((memory / "stats.json").read_text())
    stats_d = json.loads((distributed / "stats.json").read_text())
    assert stats_d.pop("distributed")["tasks"] >= 1
    assert stats_d == stats_m
