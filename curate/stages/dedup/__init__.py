"""`curate dedup`: semantic deduplication (SemDeDup, Abbas et al. 2023) of a pool's image embeddings.

1. Spherical k-means (FAISS) on the L2-normalised image embeddings, trained on a seeded sample of at most
   `train_rows` rows (default 256 per cluster) when the pool is larger.
2. Every row assigned to its nearest centroid (map tasks over row spans, read from the pool's fp16 cache).
3. Inside each cluster (map tasks over runs of clusters): the members visited in the keep order
   (`--keep-by`: farthest from the centroid first, the paper's "keep hard", or the nearest first, a score
   table's column descending, or seeded random), and a member dropped as a semantic duplicate when its cosine
   to an earlier kept member exceeds 1 − ε (`--against all`: to any earlier member, as the reference code
   does; curate/metrics/semdedup.py). Memory: the largest cluster's members and a 1024-row block of their
   similarities, never N².
4. The table OUT: `uid`, `cluster`, `centroid_similarity`, `similarity` (largest cosine to a member compared
   against), `duplicate_of` (the kept member's uid; null when kept) and `semdedup_keep` (1 kept, 0 dropped),
   for the first ε of `--eps`; the kept fraction at every ε of the list and the cluster-size distribution
   are in the metadata and the summary, to choose k and ε in one run.
`curate filter --drop-duplicates OUT` (or `--min semdedup_keep:1`) keeps the non-duplicates.

Files: this module holds the options and the result (light); entry.py runs the stage; tasks.py the map tasks
(assignment, clusters); common.py what both use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from curate.config import at_least, non_negative, option, positive

KEEP_POLICIES = ("centroid", "centroid_nearest", "score", "random")
AGAINST = ("kept", "all")
RUN_OPTIONS = ("executor", "workers", "tasks", "retries", "ray_address")


def eps_values(values) -> str | None:
    if not values:
        return "give at least one ε"
    bad = [v for v in values if not 0 < v < 2]
    return f"every ε must be in (0, 2), not {bad[0]}" if bad else None


@dataclass(frozen=True)
class DedupConfig:
    clusters: Optional[int] = option(None, "k-means clusters k (default: ceil(N / 10000), at least 1; the "
                                     "summary prints the cluster sizes to choose it).", "--clusters",
                                     check=positive)
    eps: List[float] = option([0.05], "ε: a member whose cosine to an earlier kept member exceeds 1 - ε is a "
                              "duplicate; repeat or comma-separate for the kept fraction at several ε (the "
                              "table's columns use the first).", "--eps", check=eps_values)
    keep_by: str = option("centroid", "Which member of a duplicate group is kept: centroid (the farthest from the "
                          "centroid, the paper's default), centroid_nearest, score (highest --score-column of "
                          "--scores) or random (seeded).", "--keep-by", choices=KEEP_POLICIES)
    against: str = option("kept", "Compare with the earlier kept members (the paper's rule) or with every earlier "
                          "member (all: the reference code's).", "--against", choices=AGAINST)
    scores: Optional[Path] = option(None, "Score table for --keep-by score (uid + the column).", "--scores")
    score_column: str = option("negclip", "Column of --scores for --keep-by score.", "--score-column")
    train_rows: Optional[int] = option(None, "k-means is trained on a seeded sample of this many rows (default "
                                       "256 per cluster, or the whole pool when smaller).", "--train-rows",
                                       check=positive)
    iterations: int = option(20, "k-means iterations.", "--iterations", check=positive)
    seed: int = option(0, "Seed of the k-means sample and initialisation and of --keep-by random.",
                       check=non_negative)
    block_rows: int = option(1024, "Rows of a cluster's similarity block (memory: block x cluster size floats).",
                             "--block-rows", check=at_least(1))
    cache_dir: Optional[Path] = option(None, "Where the pool's fp16 cache goes (default: OUT's directory/"
                                       ".curate-cache).", "--cache-dir")


@dataclass
class DedupResult:
    out: str
    rows: int
    clusters: int
    kept: dict  # ε (as written) -> rows kept
    cluster_sizes: dict  # min, median, p90, p99, max, singletons
    seconds: float
    params: dict = field(default_factory=dict)
    tasks: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)  # seconds: cache, kmeans (training), assign, clusters, write
