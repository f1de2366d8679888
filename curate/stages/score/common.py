"""What `curate score`'s in-process path and its map tasks both use: the metric names and the layout that
names negclip's map outputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from curate.errors import CurateError
from curate.io.tables import EmbeddingPool
from curate.run.mapreduce import DEFAULT_TASKS, layout_key, layout_parts_dir, parts_started
from curate.stages.score import METRICS

NEGCLIP_STAGE = "negclip"
DEFAULT_NEGCLIP_TASKS = DEFAULT_TASKS


def parse_metrics(metrics: str | Sequence[str]) -> list[str]:
    """Metric names from a list whose items may be comma-separated (`--metric clipscore,negclip`)."""
    items = [metrics] if isinstance(metrics, str) else list(metrics)
    names = [m.strip() for item in items for m in str(item).split(",")]
    names = list(dict.fromkeys(m for m in names if m))
    if not names:
        raise CurateError(f"no metric given; use one or more of {', '.join(METRICS)}")
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise CurateError(f"unknown metric {', '.join(unknown)}; `curate score` computes {', '.join(METRICS)} "
                          "(NormSim is `curate normsim`)")
    return names


@dataclass
class NegclipLayout:
    """Everything that fixes the map outputs; its hash names the parts directory, so a changed pool or
    parameter never reuses stale terms."""

    fingerprint: str
    n_rows: int
    dim: int
    logit_scale: float
    k: int
    batch_size: int
    seed: int
    tasks: int
    tile_elements: int
    numpy: str  # the permutations are numpy's

    def key(self) -> str:
        return layout_key(self)


def negclip_layout(pool: EmbeddingPool, k: int, batch_size: int, seed: int, tasks: int | None) -> NegclipLayout:
    from curate.metrics.negclip import DEFAULT_TILE_ELEMENTS

    return NegclipLayout(pool.fingerprint(), pool.n_rows, pool.dim, float(pool.teacher.logit_scale), int(k),
                         int(batch_size), int(seed), int(tasks or DEFAULT_NEGCLIP_TASKS), DEFAULT_TILE_ELEMENTS,
                         np.__version__)


def negclip_parts_dir(out: str | Path, layout: NegclipLayout) -> Path:
    return layout_parts_dir(out, "negclip", layout)


def negclip_parts_started(out: str | Path, pool: EmbeddingPool, k: int, batch_size: int, seed: int,
                          tasks: int | None) -> bool:
    """True when a distributed run with these parameters left finished map tasks beside `out`."""
    return parts_started(negclip_parts_dir(out, negclip_layout(pool, k, batch_size, seed, tasks)), NEGCLIP_STAGE)
