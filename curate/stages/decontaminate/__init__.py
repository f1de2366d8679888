"""`curate decontaminate`: flag every pool sample whose image lies within a cosine threshold of an image of the
given evaluation or target sets, so that a selection never trains on them (DataComp deduplicates its pool
against its evaluation sets the same way, with a copy-detection model).

Each pool image embedding is searched against every `--against` set (embedding directories, image-only ones
included, or .npy/.pt/.parquet matrices): exact inner-product search with FAISS (`--index ivf` for an
approximate one), in map tasks over row spans read from the pool's fp16 cache (`--rank/--world-size` or a
Slurm array split them; the last rank writes the table, as `curate normsim` does). The table OUT holds per
uid the nearest evaluation item (`nearest_uid`: its uid, or `FILE#ROW` for a matrix), its set, the cosine
`similarity`, and `contaminated` (1 when similarity >= `--threshold`). The threshold is a cosine of the
teacher's image embeddings: its meaning depends on the teacher (DataComp's 0.604169 is a distance of another
model's copy-detection descriptor and does not carry over), so the summary prints the similarity histogram
to choose it from. `curate filter --drop-contaminated OUT` (or `--max contaminated:0`) drops the flagged
samples.

Files: this module holds the options and the result (light); entry.py runs the stage; tasks.py the map tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from curate.config import in_unit_interval, option, positive

INDEX_KINDS = ("flat", "ivf")
RUN_OPTIONS = ("executor", "workers", "tasks", "retries", "ray_address", "rank", "world_size")
HISTOGRAM_EDGES = (-float("inf"), 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99, float("inf"))  # cosines, rounding past ±1 included


@dataclass(frozen=True)
class DecontaminateConfig:
    threshold: float = option(0.95, "Cosine of image embeddings at or above which a pool sample counts as a copy "
                              "of an evaluation image (teacher-dependent: read the printed histogram).",
                              check=in_unit_interval)
    index: str = option("flat", "flat (exact) or ivf (approximate, for very large evaluation sets).",
                        choices=INDEX_KINDS)
    nlist: Optional[int] = option(None, "ivf: clusters (default ~4·sqrt(M)).", check=positive)
    nprobe: Optional[int] = option(None, "ivf: clusters probed per query (default nlist/8).", check=positive)
    cache_dir: Optional[Path] = option(None, "Where the pool's fp16 cache goes (default: OUT's directory/"
                                       ".curate-cache).", "--cache-dir")


@dataclass
class DecontaminateResult:
    out: str | None  # None: this rank's tasks are done, others' are missing
    rows: int
    against_rows: int
    contaminated: int
    histogram: list  # [(low, high, count)] of the pool's nearest similarities
    seconds: float
    params: dict = field(default_factory=dict)
    tasks: dict = field(default_factory=dict)
