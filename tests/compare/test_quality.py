"""The pure pieces of `curate compare` against plain loops and hand cases: signal ROC-AUCs per kind, removal per
phenomenon, clone / dedup / decontamination detection against the truth, PCME's Spearman and AUC, the oracle subset,
the summary over seeds (intervals, headroom, paired differences) and the best method."""

from __future__ import annotations

import math

import numpy as np
import pytest

from curate.compare import tables
from curate.compare.quality import (PoolTruth, clone_quality, decontamination_quality, dedup_quality, group_sizes,
                                    pcme_quality, phenomenon_removal, signal_aucs, truth_from_fields)


def make_truth(kind, family=None, rank=None, specificity=None, group=None, copy=None) -> PoolTruth:
    n = len(kind)
    return PoolTruth(kind=np.asarray(kind, dtype=object),
                     family=np.asarray(family or ["rest"] * n, dtype=object),
                     concept_rank=np.asarray(rank or [5] * n), specificity=np.asarray(specificity or [4] * n),
                     group=np.asarray(group if group is not None else list(range(n))),
                     planted_copy=np.asarray(copy or [""] * n, dtype=object))


def loop_auc(scores, positive):
    """P(positive scores higher than negative), ties 1/2, over every pair."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_signal_aucs_match_pairwise_loops():
    rng = np.random.default_rng(1)
    kinds = rng.choice(["clean", "swapped", "clone", "planted"], size=80)
    truth = make_truth(kinds.tolist())
    score = rng.normal(size=80).round(1)  # ties included
    score[5] = np.nan  # never counted
    aucs = signal_aucs({"s": score}, truth)["s"]
    assert set(aucs) == {"swapped", "clone", "planted"}
    for kind in aucs:
        rows = [i for i in range(80) if kinds[i] in ("clean", kind) and np.isfinite(score[i])]
        assert aucs[kind] == pytest.approx(loop_auc(score[rows], [kinds[i] == "clean" for i in rows]))
    hand = signal_aucs({"s": np.array([0.9, 0.8, 0.1, 0.85])}, make_truth(["clean", "clean", "generic", "generic"]))
    assert hand["s"]["generic"] == pytest.approx(0.75)  # pairs (0.9>0.1, 0.9>0.85, 0.8>0.1, 0.8<0.85): 3 of 4


def test_phenomenon_removal_hand_case():
    truth = make_truth(["clean", "clean", "clean", "clean", "swapped", "clean"],
                       family=["rest", "rest", "target", "rest", "rest", "rest"],
                       rank=[1, 12, 20, 2, 1, 9], specificity=[1, 7, 3, 2, 6, 6])
    kept = np.array([0, 1, 1, 1, 1, 0], bool)
    removal = phenomenon_removal(truth, kept)
    assert removal["head_concept"] == {"pool": 2, "kept": 1, "removed_rate": 0.5}  # rows 0 and 3 (ranks 1, 2)
    assert removal["tail_concept"] == {"pool": 2, "kept": 1, "removed_rate": 0.5}  # rows 1 and 5 (rest, rank >= 9)
    assert removal["underspecified"]["pool"] == 2 and removal["underspecified"]["removed_rate"] == 0.5  # rows 0, 3
    assert removal["specific"] == {"pool": 2, "kept": 1, "removed_rate": 0.5}  # rows 1, 5 (row 4 is not clean)
    assert removal["target_family"] == {"pool": 1, "kept": 1, "removed_rate": 0.0}


def test_clone_quality_against_semantic_groups_and_injections():
    # groups: {0,1,2} share 7, {3} alone, {4,5} share 9; rows 1 and 5 are injected copies
    truth = make_truth(["clean", "clone", "clean", "clean", "clean", "semantic_twin"], group=[7, 7, 7, 3, 9, 9])
    flags = np.array([0, 1, 0, 1, 1, 0], bool)
    q = clone_quality(flags, truth)
    assert (q["tp"], q["fp"], q["fn"]) == (2, 1, 3)  # flagged 1, 4 in groups; 3 alone; missed 0, 2, 5
    assert q["precision"] == pytest.approx(2 / 3) and q["recall"] == pytest.approx(2 / 5)
    assert q["injected"]["tp"] == 1 and q["injected"]["recall"] == 0.5
    assert group_sizes(np.array([7, 7, -1, 3])).tolist() == [2, 2, 1, 1]


def test_dedup_quality_hand_case_and_loop():
    truth = make_truth(["clean", "duplicate", "clean", "clean", "clone", "clean"], group=[4, 4, 4, 8, 8, 5])
    dropped = np.array([0, 1, 1, 1, 0, 1], bool)
    q = dedup_quality(dropped, truth)
    # group 4: 2 drops, 2 redundant -> 2 correct; group 8: 1 drop, 1 redundant -> 1; group 5: 1 drop, 0 -> 0
    assert q["dropped"] == 4 and q["redundant"] == 3
    assert q["precision"] == pytest.approx(3 / 4) and q["recall"] == pytest.approx(1.0)
    assert q["recall_by_kind"] == {"clone": 1.0, "duplicate": 1.0, "semantic_twin": None}
    rng = np.random.default_rng(2)
    groups = rng.integers(0, 30, 200)
    truth = make_truth(["clean"] * 200, group=groups.tolist())
    dropped = rng.random(200) < 0.3
    correct = redundant = 0
    for g in set(groups.tolist()):
        members = [i for i in range(200) if groups[i] == g]
        correct += min(sum(dropped[i] for i in members), len(members) - 1)
        redundant += len(members) - 1
    q = dedup_quality(dropped, truth)
    assert q["precision"] == pytest.approx(correct / dropped.sum()) and q["recall"] == pytest.approx(correct / redundant)


def test_decontamination_quality_hand_case():
    truth = make_truth(["planted", "planted", "planted", "clean", "clean"], copy=["exact", "near", "near", "", ""])
    q = decontamination_quality(np.array([1, 1, 0, 1, 0], bool), truth)
    assert q["recall"] == pytest.approx(2 / 3) and q["precision"] == pytest.approx(2 / 3) and q["planted"] == 3
    assert q["recall_by_copy"] == {"exact": 1.0, "near": 0.5}


def test_pcme_quality_matches_loops():
    rng = np.random.default_rng(4)
    kinds = rng.choice(["clean", "partial_mismatch", "swapped"], size=60, p=[0.6, 0.3, 0.1]).tolist()
    specificity = rng.integers(1, 8, 60).tolist()
    truth = make_truth(kinds, specificity=specificity)
    uncertainty = rng.normal(size=60) - 0.2 * np.asarray(specificity)
    p_match = rng.random(60)
    q = pcme_quality(uncertainty, p_match, truth)
    clean = [i for i in range(60) if kinds[i] == "clean"]
    from curate.metrics.stats import spearman
    assert q["spearman_uncertainty_specificity"] == pytest.approx(
        spearman(uncertainty[clean], np.asarray(specificity)[clean]))
    rows = [i for i in range(60) if kinds[i] in ("clean", "partial_mismatch")]
    assert q["auc_partial_mismatch"] == pytest.approx(loop_auc(p_match[rows], [kinds[i] == "clean" for i in rows]))


def test_truth_from_fields_fills_missing_values():
    truth = truth_from_fields({"truth": ["clean", None], "family": ["rest", "target"], "concept_rank": [3, None],
                               "specificity": [2, None], "semantic_group": [11, None], "planted_copy": [None, "near"]})
    assert truth.kind.tolist() == ["clean", "unknown"] and truth.group.tolist() == [11, -1]
    assert truth.concept_rank.tolist() == [3, 0] and truth.planted_copy.tolist() == ["", "near"]


# ---------------------------------------------------------------- the oracle

def test_oracle_rows_take_correct_unique_target_first():
    truth = make_truth(["clean", "swapped", "clone", "clean", "clean", "planted", "clean", "duplicate"],
                       family=["rest", "target", "rest", "target", "rest", "target", "rest", "rest"],
                       group=[1, 2, 1, 3, 4, 5, 6, 6])
    rows = tables.oracle_rows(truth, 3)
    # correct and unique: target 3; rest: one of {0, 2} (group 1), 4, one of {6, 7} (group 6): 3 then two of those
    assert 3 in rows and len(rows) == 3 and not set(rows) & {1, 5}
    assert len({int(truth.group[r]) for r in rows}) == 3
    every = tables.oracle_rows(truth, 8)  # asked for all: the wrong and planted ones come last
    assert sorted(every.tolist()) == list(range(8))
    rng = np.random.default_rng(5)
    n = 300
    family = rng.choice(["rest", "target"], n, p=[0.85, 0.15])
    # as in the world, the family is part of the meaning: a group never mixes families
    truth = make_truth(rng.choice(["clean", "clone", "swapped", "planted"], n, p=[0.7, 0.1, 0.15, 0.05]).tolist(),
                       family=family.tolist(), group=(2 * rng.integers(0, 100, n) + (family == "target")).tolist())
    rows = tables.oracle_rows(truth, 90)
    kinds, families = truth.kind[rows], truth.family[rows]
    assert set(kinds) <= {"clean", "clone"} and len(set(truth.group[rows].tolist())) == 90
    correct_target_groups = {int(g) for g, k, f in zip(truth.group, truth.kind, truth.family)
                             if k in ("clean", "clone") and f == "target"}
    assert (families == "target").sum() == len(correct_target_groups)  # every target meaning, once


# ---------------------------------------------------------------- the summary over seeds

def run(method, seed, zs, r1):
    return {"method": method, "seed": seed, "zero_shot_top1": zs, "retrieval_r1": r1}


def test_summary_over_seeds_hand_case():
    runs = [run("random", 0, 20.0, 2.0), run("random", 1, 30.0, 4.0),
            run("oracle", 0, 60.0, 6.0), run("oracle", 1, 70.0, 8.0),
            run("negclip", 0, 40.0, 3.0), run("negclip", 1, 30.0, 5.0)]
    summary = tables.summary_over_seeds(runs)
    neg = summary["negclip"]
    assert neg["zero_shot"]["mean"] == 35.0 and neg["zero_shot"]["std"] == pytest.approx(math.sqrt(50))
    half = 12.706 * math.sqrt(50) / math.sqrt(2)
    assert neg["zero_shot"]["ci95"] == pytest.approx([35.0 - half, 35.0 + half], abs=0.01)
    # headroom per seed: (40-20)/(60-20) = 0.5, (30-30)/(70-30) = 0
    assert neg["headroom"]["mean"] == pytest.approx(0.25) and neg["headroom"]["n"] == 2
    assert neg["headroom_of_means"] == pytest.approx((35 - 25) / (65 - 25))
    assert neg["vs_random"]["zero_shot"]["mean"] == 10.0  # paired: 20, 0
    assert summary["oracle"]["headroom"]["mean"] == 1.0 and summary["random"]["headroom"]["mean"] == 0.0
    assert neg["retrieval_r1"]["mean"] == 4.0 and neg["seeds"] == [0, 1]
    assert tables.best_method(summary, ("negclip", "oracle")) == "oracle"
    assert tables.best_method(summary, ("negclip", "clipscore")) == "negclip"
