"""Training pairs of `curate train` and `curate compare`: decoded, preprocessed samples in corpus order, and the
uids of a subset."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from curate.io.shards import SampleError, decode_sample, expand_shards, iter_shard, sample_uid


@dataclass
class PairSet:
    """Decoded, preprocessed training pairs in corpus order."""

    uids: list[str]
    images: torch.Tensor             # [N,3,H,W]
    tokens: torch.Tensor             # [N,L]
    truth: list[str | None]          # the synth ground truth per pair (None outside synth corpora)
    labels: list[list | None] = field(default_factory=list)  # the synth multi-hot attribute labels, if any
    skipped: dict = field(default_factory=dict)   # reason -> count
    shards: int = 0

    def select(self, uids: Sequence[str] | set[str]) -> "PairSet":
        """The pairs whose uid is in `uids`, in corpus order."""
        wanted = set(uids)
        rows = [i for i, u in enumerate(self.uids) if u in wanted]
        index = torch.as_tensor(rows, dtype=torch.long)
        return PairSet([self.uids[i] for i in rows], self.images[index], self.tokens[index],
                       [self.truth[i] for i in rows], [self.labels[i] for i in rows], dict(self.skipped), self.shards)

    def label_matrix(self) -> np.ndarray | None:
        """(N, L) uint8 multi-hot labels, or None when some pair has none (then no PMRP)."""
        if not self.labels or any(not isinstance(r, list) for r in self.labels) \
                or len({len(r) for r in self.labels}) != 1:
            return None
        return np.asarray(self.labels, dtype=np.uint8)

    def truth_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.truth:
            key = str(t) if t is not None else "unknown"
            counts[key] = counts.get(key, 0) + 1
        return counts


def load_pairs(shards, preprocess: Callable, tokenizer: Callable, uids: set[str] | None = None,
               on_problem: Callable[[str, str], None] | None = None) -> PairSet:
    """Decode every usable sample of `shards` (or only those whose uid is in `uids`) into tensors.

    Unusable samples are skipped and counted by reason (and passed to `on_problem`); a uid seen twice keeps
    its first sample, as in `curate embed`.
    """
    urls = expand_shards(shards)
    skipped: dict[str, int] = {}

    def problem(key: str, reason: str) -> None:
        short = reason.split(" (")[0].split(":")[0]
        skipped[short] = skipped.get(short, 0) + 1
        if on_problem is not None:
            on_problem(key, reason)

    images, captions, kept_uids, truth, labels = [], [], [], [], []
    seen: set[str] = set()
    for url in urls:
        for raw in iter_shard(url, problem):
            if uids is not None and sample_uid(raw) not in uids:
                continue
            try:
                sample = decode_sample(raw)
                pixels = preprocess(sample.image)
            except SampleError as exc:
                problem(raw.key, str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - a transform failure is a per-sample skip
                problem(raw.key, f"preprocess failed ({type(exc).__name__}: {exc})")
                continue
            if sample.uid in seen:
                problem(raw.key, "duplicate uid; kept the first")
                continue
            seen.add(sample.uid)
            images.append(pixels)
            captions.append(sample.caption)
            kept_uids.append(sample.uid)
            meta = sample.meta if isinstance(sample.meta, dict) else {}
            truth.append(meta.get("truth"))
            labels.append(meta.get("labels"))
    if not images:
        return PairSet([], torch.zeros(0), torch.zeros(0, dtype=torch.long), [], [], skipped, len(urls))
    return PairSet(kept_uids, torch.stack(images), tokenizer(captions), truth, labels, skipped, len(urls))


def read_subset_uids(subset: str | Path) -> list[str]:
    """The uids of a `curate filter` output directory (its uids.npy) or of a DataComp `.npy` subset file."""
    from curate.io.uids import read_uid_npy, subset_file

    return read_uid_npy(subset_file(subset))


def is_subset_spec(source: str | Path) -> bool:
    path = Path(source)
    return (path.is_dir() and (path / "uids.npy").is_file()) or (path.is_file() and path.suffix == ".npy")
