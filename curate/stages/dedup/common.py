"""What dedup's entry and its map tasks share: the layout that names the parts directory and the files in it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STAGE_ASSIGN, STAGE_CLUSTERS = "dedup-assign", "dedup-clusters"
CENTROIDS = "centroids.npy"
ORDER = "order.npy"  # pool rows sorted by cluster, then by row
BOUNDS = "bounds.npy"  # cluster c's rows are order[bounds[c]:bounds[c + 1]]
KEEP_SCORES = "keep_scores.npy"  # --keep-by score: the score of every pool row (NaN where missing)


@dataclass
class DedupLayout:
    """Everything the map outputs depend on; its hash names `<out>.parts/dedup-<hash>/`."""

    fingerprint: str  # the pool version
    clusters: int
    eps: list
    keep_by: str
    against: str
    scores: str | None  # the score table's path, size and mtime, and the column
    train_rows: int
    iterations: int
    seed: int
    block_rows: int
    tasks: int


def assign_file(parts_dir: str | Path, name: str) -> Path:
    """A row span's nearest centroid and cosine to it (int32, float32), one .npz per assignment task."""
    return Path(parts_dir) / f"assign-{name}.npz"


def cluster_file(parts_dir: str | Path, name: str) -> Path:
    """A run of clusters' results per member row (pool row, keep per ε, duplicate row, similarity)."""
    return Path(parts_dir) / f"clusters-{name}.npz"
