"""`curate score`: CLIPScore and negCLIPLoss of a whole embedding pool -> one Parquet score table.

Passes over the pool (pool order = files sorted by name, rows in file order):
1. s_ii (clipscore) per row, and a check that every embedding is finite and non-zero (one NaN row would
   poison the LSE of its whole batch): streamed from the tables row group by row group, or, when negclip
   is asked for, read back sequentially from its caches (step 2) instead of reading and decoding the
   Parquet tables a second time.
2. negclip only: the image and text columns as fp16 `.npy` caches (`EmbeddingPool.matrix`, built once
   per pool version). For each of K partitions and each of its ⌈N/b⌉ batches, the batch's rows are
   gathered with sorted indices, moved to the device, and the row/column LSE terms computed in float32
   tiles (curate.metrics.negclip). Rows are read with positional reads, not through a memory map (see
   PoolRows), so RSS stays O(b·D + tile) beyond the O(N) output columns: the pool never sits in RAM.
   This is the one global pass. Distributed (--rank/--world-size or a Slurm array, --executor, --workers,
   --tasks), the K·⌈N/b⌉ (partition, batch) pairs are cut into T contiguous map tasks (`negclip_map_task`,
   run by curate.run.mapreduce, which `curate normsim` shares):
   each writes its float32 terms to `<out>.parts/negclip-<layout hash>/tNNNNN.npy`, then a completion
   marker; whoever finds every task marked runs the reduce (curate.metrics.negclip.reduce_span_terms,
   same order as in-process, so the table is byte-identical) and writes the table. Every rank builds a
   missing cache itself first (atomic rename of identical bytes). Finished tasks beside `out` are picked
   up by any later run with the same layout, also one without distributed options.
3. Write `uid` + float32 score columns, one row group per input table, atomically, with the parameters
   and the teacher in the `curate` metadata.

Files: this module holds the options and the result (light: the command line imports it); entry.py runs the
stage (`run`); local.py the in-process passes; tasks.py negclip's map tasks and their reduce; common.py what
both use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from curate.config import option, positive

METRICS = ("clipscore", "negclip")
RUN_OPTIONS = ("executor", "workers", "tasks", "retries", "ray_address", "rank", "world_size")


@dataclass(frozen=True)
class ScoreConfig:
    metrics: List[str] = option(list(METRICS), "Metrics to compute (repeat, or comma-separated): clipscore, "
                                "negclip.", "--metric")
    k: int = option(10, "negclip: number of random partitions of the pool (K).", "--k", check=positive)
    batch_size: int = option(32768, "negclip: batch size B (min(B, N) is used).", "--batch-size", check=positive)
    seed: int = option(0, "negclip: partition seed; the same seed gives identical scores.")
    device: str = option("auto", "auto (cuda when present), cpu or cuda.")
    cache_dir: Optional[Path] = option(None, "Where the fp16 memmap caches go (default: OUT's directory/"
                                       ".curate-cache).", "--cache-dir")


@dataclass
class ScoreResult:
    out: str | None  # None: this rank finished its map tasks, others are missing (`negclip_tasks` says how many)
    rows: int
    metrics: list[str]
    seconds: float
    rows_per_s: float
    params: dict
    teacher: dict
    negclip_tasks: dict | None = None
