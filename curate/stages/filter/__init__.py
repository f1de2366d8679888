"""`curate filter`: join score tables on uid, apply thresholds and top-fraction keeps, write a subset.

Selection rule (README "Filtering"):
1. The pool is the rows of the first table, in its order (the pool order); every other table, and the
   inline NormSim scores, must hold exactly the same uids. A table argument may be a directory: its
   `*.parquet` files, sorted by name, are read as one table. Every numeric column except `uid` is a metric.
2. `--min METRIC:X` keeps rows with score >= X, `--max METRIC:X` rows with score <= X, in the order given,
   before any keep. NaN never passes a threshold.
3. `--keep METRIC:F` keeps exactly ceil(F * N) rows, N = the whole pool (before thresholds), F in (0, 1]
   read as the decimal that was written (0.07 of 100 is 7, where float arithmetic gives 8). Higher scores are
   better; NaN is never kept; ties at the cut are broken by uid ascending (as 32-hex strings, i.e. as 128-bit
   numbers).
   `--fraction-rule datacomp` instead applies DataComp's rule (baselines/apply_filter.py, get_threshold):
   the threshold is the (int(F * N) + 1)-th largest score, F * N in float arithmetic, and every row scoring
   at least that is kept, ties included: int(F * N) + 1 rows without ties (121 of 400 at F = 0.3, not 120),
   so that a DataComp baseline's uid file is reproduced exactly.
   - sequential (default): each keep ranks what the previous steps left.
   - independent (DataComp style): each keep ranks what the thresholds left; the subset is the intersection.
   A keep that must rank fewer non-NaN rows than it has to keep is an error, not a silent shortfall: in
   sequential mode the fractions are of the whole pool, so they must not grow from step to step.

Outputs in OUT: `uids.npy` (DataComp's sorted `u8,u8`), `kept.parquet` (uid + every metric of the kept rows,
pool order) and `stats.json` (last: its presence means the subset is complete).

Files: this module holds the options and the result (light: the command line imports it); entry.py checks
the options and chooses the path (`run`); local.py is the in-memory filter (one process, the whole pool's
columns); tasks.py the same selection as rounds of map tasks (radix select over row-aligned tables, never
holding a score column); common.py what both use (parsing keeps and bounds, reading score tables, the checks
and the stats writer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from curate.config import option

MODES = ("sequential", "independent")
FRACTION_RULES = ("exact", "datacomp")
# --rank/--world-size are offered so that a Slurm array's user gets the one-line reason they cannot split it
RUN_OPTIONS = ("executor", "workers", "tasks", "retries", "ray_address", "rank", "world_size")


@dataclass(frozen=True)
class FilterConfig:
    keep: List[str] = option([], "METRIC:FRACTION, repeatable: keep the top ceil(F*N) of the pool by METRIC (higher "
                             "is better, ties by uid ascending; see --fraction-rule).", "--keep")
    min: List[str] = option([], "METRIC:X, repeatable: keep score >= X (before the keeps).", "--min")
    max: List[str] = option([], "METRIC:X, repeatable: keep score <= X (before the keeps).", "--max")
    mode: str = option("sequential", "sequential: each --keep ranks what the previous left; independent: intersect "
                       "each metric's own top fraction.", "--mode", choices=MODES)
    fraction_rule: str = option("exact", "exact: a --keep keeps ceil(F*N) rows, ties by uid; datacomp: DataComp's "
                                "apply_filter rule, every row scoring at least the (int(F*N)+1)-th largest score "
                                "(reproduces a DataComp baseline's uid file).", "--fraction-rule",
                                choices=FRACTION_RULES)
    normsim: Optional[str] = option(None, "inf, 2 or 2d: compute normsim_<p> inline.", "--normsim")
    target: Optional[str] = option(None, "NormSim target: image embeddings (embedding dir, .npy/.pt/.parquet or a "
                                   "directory of them), imagenet-text, or none (with 2d).", "--target")
    # a recipe gives its own embedding directory ([embed] or [import_datacomp] out)
    emb: Optional[Path] = option(None, "Embedding tables for --normsim (default: the one the score tables record).",
                                 "--emb", recipe=False)
    drop_duplicates: Optional[str] = option(None, "A `curate dedup` table: drop the semantic duplicates it marks "
                                            "(semdedup_keep = 0) before the thresholds and keeps.",
                                            "--drop-duplicates")
    drop_contaminated: Optional[str] = option(None, "A `curate decontaminate` table: drop the rows it flags "
                                              "(contaminated = 1) before the thresholds and keeps.",
                                              "--drop-contaminated")
    include_uids: List[str] = option([], "UIDS, repeatable: keep only selected rows listed in it (intersection). "
                                     "UIDS: a DataComp .npy, a `curate filter` --out directory or a Parquet table "
                                     "with `uid`.", "--include-uids")
    union: List[str] = option([], "UIDS, repeatable: add the pool rows listed in it (union; never a row that "
                              "--drop-duplicates/--drop-contaminated removed).", "--union")
    exclude_uids: List[str] = option([], "UIDS, repeatable: remove the rows listed in it (difference, applied last).",
                                     "--exclude-uids")


@dataclass
class StepStats:
    step: str  # drop_duplicates, drop_contaminated, min, max, keep, include_uids, union or exclude_uids
    metric: str
    ranked: int  # rows the step looked at
    kept: int
    removed: int
    value: float | None = None  # the --min/--max threshold
    fraction: str | None = None  # the --keep fraction as written
    nan: int = 0  # rows among `ranked` whose score is NaN (never kept)
    threshold: float | None = None  # keep: the lowest kept score (the score at the cut)
    ties_dropped_by_uid: int = 0  # keep: rows scoring exactly `threshold` left out by the uid tie-break
    rule: str | None = None  # keep: the fraction rule (exact, datacomp)
    table: str | None = None  # drop_duplicates / drop_contaminated: the table
    uids: str | None = None  # include_uids / union / exclude_uids: the uid list
    listed: int | None = None  # its uids (each once)
    listed_in_pool: int | None = None  # pool rows it lists
    not_in_pool: int | None = None  # its uids that no pool row has
    added: int | None = None  # union: rows added
    refused_dropped: int | None = None  # union: listed rows not added because a drop step removed them


@dataclass
class FilterResult:
    pool: int
    kept: int
    mode: str
    steps: list[StepStats]
    out_dir: str
    files: dict[str, str] = field(default_factory=dict)
