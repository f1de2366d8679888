"""`curate normsim`: NormSim_∞ / NormSim_2 / NormSim_2-D of a pool's image embeddings -> Parquet table.

Passes over the pool:
* p = inf and p = 2: one streaming pass in bounded blocks (per table, CPU_BLOCK_ROWS each for the CPU
  products, which worker threads share out, READ_BATCH_ROWS on the GPU and for IVF), from the pool's fp16
  `.npy` image cache (built first when `curate score` has not built it already in the cache directory).
  The target is small: for inf the (M, D) matrix on the device (exact, tiled V Xᵀ with a max-|.| reduction)
  or a FAISS IVF index over ±X (`--index ivf`); for 2 the D×D second moment.
  The scores are per row, so distributed (--rank/--world-size or a Slurm array, --executor, --workers,
  --tasks) the pool is cut into T runs of whole tables (map tasks, curate.run.mapreduce): each writes its
  float32 scores to `<out>.parts/normsim_<p>-<layout hash>/tNNNNN.npy`, then a marker; the reduce is a
  concatenation. Tasks read the same blocks as one process (the CPU products run one BLAS thread per
  block, whatever the thread count; the rest runs BLAS with the driver's count, as OpenBLAS rounds
  differently with other counts), against the target (and ivf index) the first rank stored in the parts
  directory, so the table is byte-identical to a one-process run.
* p = 2d: the pool is its own target, as the reference's VAS-D loop runs it (curate.metrics.normsim.normsim_2d):
  T iterations (default 100) remove equal chunks of the lowest scores from S_0 (the --prefilter subset or the
  pool) down to ⌈F·N⌉, each scored against the second moment of a seeded 10 % subsample of the current subset.
  It reads the image column twice per iteration (from the fp16 cache, built first), always as one driver
  running rounds of map tasks over runs of whole tables (rounds.py): partial moments summed in task order,
  scores and levels written as parts, each cut by an exact radix select over them. In process by default, in
  worker processes or on Ray under --workers/--executor, with the same bytes; a rank split (--rank/--world-size,
  Slurm) is refused.
Output: `uid` + `normsim_inf` | `normsim_2` | `normsim_2d` (float32), one row group per input table.

Files: this module holds the options, the 2-D schedule and the result (light: the command line imports it);
entry.py runs the stage (`run`); local.py scores a pool in this process (`normsim_scores`, also for `curate
filter --normsim`); tasks.py is p = inf and 2 as map tasks and their reduce; rounds.py NormSim_2-D's rounds of
map tasks; common.py what they share (blocks of the image column, scorers, the target); targets.py the
`imagenet-text` target (class prompts through the teacher's text tower).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from curate.config import check_config, fraction, option
from curate.errors import CurateError

P_VALUES = ("inf", "2", "2d")
INDEX_KINDS = ("flat", "ivf")
TEMPLATE_SETS = ("openai", "simple")  # open_clip's zero-shot ImageNet prompt templates: 80 or 7
RUN_OPTIONS = ("executor", "workers", "tasks", "retries", "ray_address", "rank", "world_size")

# NormSim_2-D's schedule: the reference's defaults (ypwang61/negCLIPLoss_NormSim, baselines/vas2.py)
DEFAULT_ITERATIONS = 100  # its num_iters default (its scripts also ran 168, 200 and 500)
DEFAULT_FINAL_FRACTION = 0.3
DEFAULT_SUBSAMPLE = 0.1  # its cal_target_variance(downsample_ratio=0.1)
DEFAULT_SEED = 0
SCHEDULE_OPTIONS = ("iterations", "final_fraction", "subsample", "seed", "prefilter")
SCHEDULE_FLAGS = "--iterations, --final-fraction, --subsample, --seed and --prefilter"


def parse_p(p) -> str:
    """'inf' | '2' | '2d' (also accepts 2, float('inf'), '∞')."""
    text = str(p).strip().lower()
    text = {"∞": "inf", "infinity": "inf", "2.0": "2", "2-d": "2d"}.get(text, text)
    if text not in P_VALUES:
        raise CurateError(f"--p must be one of inf, 2, 2d, got {p!r}")
    return text


def column_name(p) -> str:
    return f"normsim_{parse_p(p)}"


def is_integer(value) -> bool:
    return not isinstance(value, bool) and int(value) == value


def iterations_problem(value) -> str | None:
    from curate.metrics.normsim import MAX_ITERATIONS  # levels are int16: the metric's limit

    if value is None or (is_integer(value) and 1 <= int(value) <= MAX_ITERATIONS):
        return None
    return f"must be an integer from 1 to {MAX_ITERATIONS}"


def seed_problem(value) -> str | None:
    return None if value is None or (is_integer(value) and 0 <= int(value) < 2**64) else \
        "must be an integer from 0 to 2^64-1"


@dataclass(frozen=True)
class Normsim2dSchedule:
    """NormSim_2-D's schedule: T iterations down to ⌈F·N⌉ rows of the pool, subsample fraction r of S_i for C_i,
    the seed of the subsamples, and the pre-filter (a subset file of `curate filter`, or "" for the whole
    pool)."""

    iterations: int = DEFAULT_ITERATIONS
    final_fraction: float = DEFAULT_FINAL_FRACTION
    subsample: float = DEFAULT_SUBSAMPLE
    seed: int = DEFAULT_SEED
    prefilter: str = ""

    def describe(self) -> dict:
        return {"iterations": self.iterations, "final_fraction": self.final_fraction, "subsample": self.subsample,
                "seed": self.seed, "prefilter": self.prefilter or None}


@dataclass(frozen=True)
class NormsimConfig:
    target: Optional[str] = option(None, "Image embeddings: an embedding directory (e.g. `curate embed "
                                   "IMAGENET_TRAIN --images-only`), a .npy/.pt/.parquet matrix or a directory of "
                                   "them (the reference's in1k_clip_vit_l14_*.pt); imagenet-text (class prompts, "
                                   "text tower); or none (with --p 2d).", "--target", recipe=False)
    p: str = option("inf", "inf, 2, or 2d (the pool as its own, iteratively refined target).", "--p", recipe=False)
    index: str = option("flat", "p=inf: flat (exact) or ivf (approximate).", "--index", choices=INDEX_KINDS)
    nlist: Optional[int] = option(None, "ivf: number of clusters (default ~4·sqrt(2M)).", "--nlist")
    nprobe: Optional[int] = option(None, "ivf: clusters probed per query (default nlist/8).", "--nprobe")
    iterations: Optional[int] = option(None, "p=2d: iterations T, each removing an equal chunk of the lowest "
                                       f"scores (default {DEFAULT_ITERATIONS}, the reference's).", "--iterations",
                                       check=iterations_problem)
    final_fraction: Optional[float] = option(None, "p=2d: keep ceil(F*N) of the pool after the last iteration "
                                             f"(default {DEFAULT_FINAL_FRACTION}).", "--final-fraction",
                                             check=fraction)
    subsample: Optional[float] = option(None, "p=2d: fraction of the current subset whose second moment is the "
                                        f"next target (default {DEFAULT_SUBSAMPLE}, the reference's).",
                                        "--subsample", check=fraction)
    seed: Optional[int] = option(None, f"p=2d: seed of the subsamples (default {DEFAULT_SEED}); the same seed "
                                 "gives the same table.", "--seed", check=seed_problem)
    # the recipe's `prefilter` may also name a [[filter]]: a key of its own there (curate/recipe.py)
    prefilter: Optional[Path] = option(None, "p=2d: start from this subset (the --out directory of `curate "
                                       "filter`, e.g. --keep clipscore:0.3, or a uids.npy), as the reference "
                                       "starts after its CLIPScore filter.", "--prefilter", recipe=False)
    templates: str = option("openai", "imagenet-text: openai (80) or simple (7) prompt templates.", "--templates",
                            choices=TEMPLATE_SETS)
    device: str = option("auto", "Device for the exact p=inf product and the imagenet-text prompts (auto: cuda "
                         "when present).")
    cache_dir: Optional[Path] = option(None, "Cache directory: the imagenet-text target's embeddings (default "
                                       "~/.cache/curate) and the pool's fp16 image cache, read when `curate "
                                       "score` built it there, built by p=2d (default: OUT's directory/"
                                       ".curate-cache).", "--cache-dir")

    def schedule_given(self) -> list[str]:
        """The NormSim_2-D schedule options that were set (None: not set)."""
        return [name for name in SCHEDULE_OPTIONS if getattr(self, name) not in (None, "")]

    def schedule(self) -> Normsim2dSchedule:
        """The 2-D schedule these options give (the reference's defaults where unset)."""
        pick = lambda value, default: default if value is None else value  # noqa: E731
        return Normsim2dSchedule(int(pick(self.iterations, DEFAULT_ITERATIONS)),
                                 float(pick(self.final_fraction, DEFAULT_FINAL_FRACTION)),
                                 float(pick(self.subsample, DEFAULT_SUBSAMPLE)), int(pick(self.seed, DEFAULT_SEED)),
                                 str(os.fspath(self.prefilter)) if self.prefilter else "")

    def checked(self) -> "NormsimConfig":
        """The options checked (each one, then how they combine), with `p` spelled inf, 2 or 2d."""
        check_config(self)
        p = parse_p(self.p)
        if p == "2d":
            if self.target not in (None, "none"):
                raise CurateError(f"--p 2d uses the pool itself as target; pass --target none (got {self.target!r})")
        elif self.schedule_given():
            raise CurateError(f"{SCHEDULE_FLAGS} set NormSim_2-D's schedule: use them with --p 2d, not --p {p}")
        elif self.target in (None, "none"):
            raise CurateError(f"--p {p} needs a target: an embedding directory, a .npy/.pt/.parquet matrix, or "
                              "imagenet-text (only --p 2d works without one)")
        return dataclasses.replace(self, p=p)


@dataclass
class NormsimResult:
    out: str | None  # None: this rank finished its map tasks, others are missing (`normsim_tasks` says how many)
    rows: int
    column: str  # normsim_inf, normsim_2 or normsim_2d
    seconds: float
    rows_per_s: float
    params: dict  # as recorded in the table's metadata
    missing: int  # rows with no IVF candidate (NaN)
    normsim_tasks: dict | None = None  # p = inf or 2 as map tasks: how many ran, where
    normsim_2d_tasks: dict | None = None  # p = 2d: what its rounds of map tasks ran
    note: str | None = None
