"""How well each selection signal of `curate compare` sees the world's phenomena, without training a student (pure
functions of score arrays and the ground truth, `PoolTruth`).

- signal_aucs: ROC-AUC of every score for clean against each other kind (clean should score higher);
- phenomenon_removal: the share of each phenomenon's samples a subset leaves out (at equal kept fraction);
- clone_quality: the clone flags against the semantic groups (a sample is a clone when another pool sample has its
  meaning) and against the injected redundancy (clone, duplicate, semantic_twin);
- dedup_quality: SemDeDup's drops against the semantic groups (g − 1 of a group of g are redundant);
- decontamination_quality: the contamination flags against the planted target images;
- pcme_quality: Spearman of the text uncertainty against caption specificity, p_match's AUC on partial mismatches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from curate.metrics.clones import precision_recall_f1
from curate.metrics.pcme import binary_roc_auc
from curate.metrics.stats import spearman
from curate.stages.synth import TRUTH_KINDS

HEAD_RANKS = 3  # concept ranks 1..3 of the rest's Zipf law are the head
TAIL_FROM_RANK = 9  # ranks >= 9 of the rest family are its tail
UNDERSPECIFIED = 2  # captions naming <= 2 attributes
SPECIFIC = 6  # captions naming >= 6 attributes
INJECTED_REDUNDANCY = ("clone", "duplicate", "semantic_twin")


@dataclass
class PoolTruth:
    """The ground truth of every pool row (pool order), read from the samples' .json."""

    kind: np.ndarray  # str: clean, a corruption kind or planted
    family: np.ndarray  # str: target or rest
    concept_rank: np.ndarray  # int (0 when unknown)
    specificity: np.ndarray  # int: attributes the caption names
    group: np.ndarray  # int semantic group, -1 when none (noise images)
    planted_copy: np.ndarray  # str: exact, near or ""

    def __len__(self) -> int:
        return len(self.kind)


def truth_from_fields(fields: dict[str, list]) -> PoolTruth:
    """PoolTruth from per-row json field values (None where a sample lacks the field)."""
    def ints(name: str, missing: int) -> np.ndarray:
        return np.asarray([missing if v is None else int(v) for v in fields[name]], dtype=np.int64)

    def strs(name: str, missing: str) -> np.ndarray:
        return np.asarray([missing if v is None else str(v) for v in fields[name]], dtype=object)

    return PoolTruth(kind=strs("truth", "unknown"), family=strs("family", "unknown"),
                     concept_rank=ints("concept_rank", 0), specificity=ints("specificity", -1),
                     group=ints("semantic_group", -1), planted_copy=strs("planted_copy", ""))


def phenomena(truth: PoolTruth) -> dict[str, np.ndarray]:
    """Masks of the phenomena measured by removal (clean samples only, so that each isolates one property)."""
    clean = truth.kind == "clean"
    rest = truth.family == "rest"
    return {
        "head_concept": clean & rest & (truth.concept_rank >= 1) & (truth.concept_rank <= HEAD_RANKS),
        "tail_concept": clean & rest & (truth.concept_rank >= TAIL_FROM_RANK),
        "underspecified": clean & (truth.specificity >= 0) & (truth.specificity <= UNDERSPECIFIED),
        "specific": clean & (truth.specificity >= SPECIFIC),
        "target_family": clean & (truth.family == "target"),
    }


def phenomenon_removal(truth: PoolTruth, kept: np.ndarray) -> dict[str, dict]:
    """Per phenomenon: {pool, kept, removed_rate} (removed_rate None when the pool has none)."""
    kept = np.asarray(kept, dtype=bool)
    out = {}
    for name, mask in phenomena(truth).items():
        n, k = int(mask.sum()), int((mask & kept).sum())
        out[name] = {"pool": n, "kept": k, "removed_rate": 1.0 - k / n if n else None}
    return out


def signal_aucs(scores: dict[str, np.ndarray], truth: PoolTruth) -> dict[str, dict[str, float | None]]:
    """signals[score][kind] = ROC-AUC of the score for clean (positive) against that kind (negative), over the rows
    of those two kinds with a finite score; None when either side is empty."""
    present = set(truth.kind.tolist())
    kinds = [k for k in TRUTH_KINDS if k != "clean" and k in present]  # one column order for every corpus
    out: dict[str, dict] = {}
    for name, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        finite = np.isfinite(values)
        row = {}
        for kind in kinds:
            rows = finite & ((truth.kind == "clean") | (truth.kind == kind))
            positive = truth.kind[rows] == "clean"
            auc = binary_roc_auc(values[rows], positive) if positive.any() and (~positive).any() else None
            row[kind] = None if auc is None or not np.isfinite(auc) else float(auc)
        out[name] = row
    return out


def group_sizes(groups: np.ndarray) -> np.ndarray:
    """For every row, how many rows share its semantic group (1 for rows without a group)."""
    groups = np.asarray(groups, dtype=np.int64)
    sizes = np.ones(len(groups), dtype=np.int64)
    has = groups >= 0
    _, inverse, counts = np.unique(groups[has], return_inverse=True, return_counts=True)
    sizes[has] = counts[inverse]
    return sizes


def clone_quality(flags: np.ndarray, truth: PoolTruth) -> dict:
    """The clone flags against meaning: a row is a true clone when another row has its semantic group (every member
    of a group of two or more, originals included); `injected`: against the injected clone, duplicate and
    semantic_twin samples only. Precision, recall, F1 (curate.metrics.clones.precision_recall_f1)."""
    flags = np.asarray(flags, dtype=bool)
    semantic = group_sizes(truth.group) >= 2
    result = precision_recall_f1(flags, semantic)
    result["injected"] = precision_recall_f1(flags, np.isin(truth.kind, INJECTED_REDUNDANCY))
    result["flagged"] = int(flags.sum())
    result["true_clones"] = int(semantic.sum())
    return result


def dedup_quality(dropped: np.ndarray, truth: PoolTruth) -> dict:
    """SemDeDup's drops against meaning: of a semantic group of g rows, g − 1 are redundant. Correct drops in a group
    = min(its drops, g − 1); precision = correct drops / drops, recall = correct drops / Σ (g − 1). `recall_by_kind`:
    for each injected redundancy kind, the share of its samples whose group lost at least one member."""
    dropped = np.asarray(dropped, dtype=bool)
    has = truth.group >= 0
    groups, inverse, sizes = np.unique(truth.group[has], return_inverse=True, return_counts=True)
    drops = np.bincount(inverse, weights=dropped[has].astype(np.float64), minlength=len(groups))
    correct = float(np.minimum(drops, sizes - 1).sum())
    redundant = float((sizes - 1).sum())
    n_dropped = int(dropped.sum())
    precision = correct / n_dropped if n_dropped else 0.0
    recall = correct / redundant if redundant else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    group_dropped = np.zeros(len(truth), dtype=bool)
    group_dropped[np.flatnonzero(has)] = drops[inverse] > 0
    by_kind = {kind: float(group_dropped[truth.kind == kind].mean()) if (truth.kind == kind).any() else None
               for kind in INJECTED_REDUNDANCY}
    return {"precision": precision, "recall": recall, "f1": f1, "dropped": n_dropped, "redundant": int(redundant),
            "recall_by_kind": by_kind}


def decontamination_quality(flagged: np.ndarray, truth: PoolTruth) -> dict:
    """The contamination flags against the planted target images: recall (overall, exact and near copies) and
    precision (planted among the flagged)."""
    flagged = np.asarray(flagged, dtype=bool)
    planted = truth.kind == "planted"
    result = precision_recall_f1(flagged, planted)
    result["planted"] = int(planted.sum())
    result["recall_by_copy"] = {copy: float(flagged[planted & (truth.planted_copy == copy)].mean())
                                if (planted & (truth.planted_copy == copy)).any() else None
                                for copy in ("exact", "near")}
    return result


def pcme_quality(uncertainty_txt: np.ndarray, p_match: np.ndarray, truth: PoolTruth) -> dict:
    """Spearman's ρ of the text uncertainty against caption specificity over the clean rows (PCME's claim: vaguer
    captions are more uncertain, so ρ < 0), and p_match's ROC-AUC for clean against partial_mismatch."""
    clean = truth.kind == "clean"
    rho = spearman(np.asarray(uncertainty_txt)[clean], truth.specificity[clean])
    rows = clean | (truth.kind == "partial_mismatch")
    positive = truth.kind[rows] == "clean"
    auc = binary_roc_auc(np.asarray(p_match)[rows], positive) if (~positive).any() and positive.any() else None
    return {"spearman_uncertainty_specificity": None if not np.isfinite(rho) else float(rho),
            "auc_partial_mismatch": None if auc is None else float(auc), "n_clean": int(clean.sum())}
