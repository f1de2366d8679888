"""The pure pieces of `curate compare` (tested directly): subset sizes, the oracle subset, removal rates and subset
composition, the summary over seeds (means, intervals, headroom, paired differences), the budget check, and
compare.md."""

from __future__ import annotations

import math
from decimal import Decimal

import numpy as np

from curate.compare import METHOD_LABELS, ROWS
from curate.compare.quality import PoolTruth, phenomenon_removal
from curate.errors import CurateError
from curate.metrics.stats import headroom, mean_std_ci, paired_differences
from curate.stages.synth import MISMATCHED_KINDS, REDUNDANT_KINDS

METRICS = {"zero_shot": "zero_shot_top1", "retrieval_r1": "retrieval_r1"}  # summary name -> run record key


def subset_size(fraction: float | str, pool: int) -> int:
    """ceil(F·N) with F read as the decimal written, exactly as `curate filter --keep` counts."""
    from curate.stages.filter.common import parse_keep

    return parse_keep(f"x:{fraction}").count(pool)


def prefilter_fraction(fraction: float | str, prefilter: float | str) -> str:
    """min(1, P·F) as a decimal string (the first, negclip, step of the NormSim recipes)."""
    value = min(Decimal(str(prefilter)) * Decimal(str(fraction)), Decimal(1))
    return format(value.normalize(), "f")


def oracle_rows(truth: PoolTruth, k: int, seed: int = 0) -> np.ndarray:
    """The oracle's k pool rows: correct pairs (clean or a redundant kind, never a planted evaluation image), one per
    semantic group (the first in a seeded order), target family first, then the rest; when those are fewer than k,
    the other correct pairs, then anything. Sorted pool rows."""
    n = len(truth)
    order = np.random.default_rng([seed, 0x0AC1E]).permutation(n)
    correct = np.isin(truth.kind, ("clean",) + REDUNDANT_KINDS)
    first = np.zeros(n, dtype=bool)
    seen: set[int] = set()
    for row in order:
        if correct[row] and truth.group[row] not in seen:
            seen.add(int(truth.group[row]))
            first[row] = True
    tier = np.where(first & (truth.family == "target"), 0, np.where(first, 1, np.where(correct, 2, 3)))
    ranked = order[np.argsort(tier[order], kind="stable")]
    return np.sort(ranked[:k])


def random_rows(n: int, k: int, seed: int) -> np.ndarray:
    """The random method's k pool rows for `seed`: a seeded uniform sample without replacement, sorted."""
    return np.sort(np.random.default_rng([seed, 0x5EED]).choice(n, size=k, replace=False))


def removal_and_composition(pool_truth: list[str | None], kept: np.ndarray, truth: PoolTruth | None = None) -> dict:
    """Per truth kind pool/kept counts and rates (curate.stages.truth.removal_rates), the subset's clean share and
    mismatched share (MISMATCHED_KINDS: pairs whose caption does not describe the image), and with `truth` the
    removal of each phenomenon (quality.phenomenon_removal)."""
    from curate.stages.truth import removal_rates as kind_rates

    kinds = np.asarray([str(t) if t is not None else "unknown" for t in pool_truth], dtype=object)
    kept = np.asarray(kept, dtype=bool)
    n_kept = int(kept.sum())
    mismatched = np.isin(kinds, MISMATCHED_KINDS)
    out = {"kinds": kind_rates(kinds, kept), "kept": n_kept,
           "clean_share": float((kept & (kinds == "clean")).sum() / n_kept) if n_kept else None,
           "mismatched_share": float((kept & mismatched).sum() / n_kept) if n_kept else None}
    if truth is not None:
        out["phenomena"] = phenomenon_removal(truth, kept)
    return out


def mean_removal(removals: list[dict]) -> dict:
    """The removal table of one subset, or the mean over several (random: one subset per seed)."""
    if len(removals) == 1:
        return removals[0]

    def mean_of(values):
        return None if any(v is None for v in values) else float(np.mean(values))

    first = removals[0]
    mean = {"kinds": {}, "kept": first["kept"],
            "clean_share": mean_of([r["clean_share"] for r in removals]),
            "mismatched_share": mean_of([r["mismatched_share"] for r in removals])}
    for kind, counts in first["kinds"].items():
        mean["kinds"][kind] = {"pool": counts["pool"], "kept": float(np.mean([r["kinds"][kind]["kept"] for r in removals])),
                               "removed_rate": mean_of([r["kinds"][kind]["removed_rate"] for r in removals])}
    if "phenomena" in first:
        mean["phenomena"] = {name: {"pool": counts["pool"],
                                    "kept": float(np.mean([r["phenomena"][name]["kept"] for r in removals])),
                                    "removed_rate": mean_of([r["phenomena"][name]["removed_rate"] for r in removals])}
                             for name, counts in first["phenomena"].items()}
    return mean


def per_seed(runs: list[dict], row: str, key: str) -> dict[int, float]:
    return {r["seed"]: r[key] for r in runs if r["method"] == row and r.get(key) is not None}


def summary_over_seeds(runs: list[dict]) -> dict:
    """summary[row][metric] = {mean, std, ci95, n} (curate.metrics.stats.mean_std_ci) over seeds, for zero_shot,
    retrieval_r1 and headroom (per seed: (row − random) / (oracle − random) of zero-shot; headroom_retrieval the
    same of R@1), `vs_random`: the paired differences row − random per seed, and `headroom_of_means`."""
    out: dict = {}
    for row in ROWS:
        if not any(r["method"] == row for r in runs):
            continue
        entry: dict = {}
        for name, key in METRICS.items():
            entry[name] = mean_std_ci(list(per_seed(runs, row, key).values()))
        for name, key in (("headroom", "zero_shot_top1"), ("headroom_retrieval", "retrieval_r1")):
            mine, rnd, ora = (per_seed(runs, r, key) for r in (row, "random", "oracle"))
            seeds = sorted(set(mine) & set(rnd) & set(ora))
            entry[name] = mean_std_ci([headroom(mine[s], rnd[s], ora[s]) for s in seeds])
        zs = {r: mean_std_ci(list(per_seed(runs, r, "zero_shot_top1").values()))["mean"] for r in (row, "random", "oracle")}
        entry["headroom_of_means"] = headroom(zs[row], zs["random"], zs["oracle"])
        entry["vs_random"] = {name: mean_std_ci(paired_differences(per_seed(runs, row, key), per_seed(runs, "random", key)))
                              for name, key in METRICS.items()}
        entry["seeds"] = sorted(per_seed(runs, row, "zero_shot_top1"))
        out[row] = entry
    return out


def best_method(summary: dict, candidates) -> str | None:
    """The candidate with the highest mean zero-shot (the first in `candidates` order on ties)."""
    scored = [(summary[m]["zero_shot"]["mean"], -i, m) for i, m in enumerate(candidates)
              if m in summary and summary[m]["zero_shot"]["mean"] is not None]
    return max(scored)[2] if scored else None


def check_budgets(runs: list[dict]) -> dict:
    """Every run must have seen the same samples (steps x batch size); returns that budget or raises."""
    budgets = {(r["budget"]["steps"], r["budget"]["batch_size"], r["budget"]["samples_seen"]) for r in runs}
    if len(budgets) != 1:
        detail = "; ".join(f"{r['method']} seed {r['seed']}: {r['budget']['samples_seen']}" for r in runs)
        raise CurateError(f"runs were trained with different budgets ({detail}); rerun them with one "
                          "--steps and --batch-size")
    steps, batch, seen = budgets.pop()
    if steps * batch != seen:
        raise CurateError(f"a run logs samples_seen {seen} but steps x batch size = {steps * batch}")
    return {"steps": steps, "batch_size": batch, "samples_seen": seen}


# ---------------------------------------------------------------- compare.md

def stat_text(stat: dict, digits: int = 1, scale: float = 1.0) -> str:
    """`mean ± std` (the mean alone for one seed; — for none)."""
    if stat is None or stat["mean"] is None:
        return "—"
    if stat["std"] is None:
        return f"{scale * stat['mean']:.{digits}f}"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def interval_text(stat: dict, digits: int = 1, scale: float = 1.0) -> str:
    if stat is None or stat.get("ci95") is None:
        return "—"
    lo, hi = stat["ci95"]
    return f"[{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"


def percent_text(value) -> str:
    return "—" if value is None else f"{100.0 * value:.1f}"


def number_text(value, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def render_markdown(doc: dict) -> str:
    """compare.md from a compare.json document (every number comes from `doc`)."""
    cfg, budget = doc["config"], doc["budget"]
    lines = [
        f"# curate compare: {doc['corpus']['samples']} pool samples, fraction {cfg['fraction']}, "
        f"{cfg['seeds']} seed(s){' (quick)' if cfg['quick'] else ''}",
        "",
        f"Student {cfg['model']} ({cfg['loss']}), budget {budget['samples_seen']} samples seen "
        f"({budget['steps']} steps × batch {budget['batch_size']}) for every run; teacher {doc['teacher']['model']} "
        f"({doc['teacher']['file']}). Zero-shot: top-1 on {doc['eval']['target_samples']} held-out target images "
        f"({doc['eval']['classes']} classes, chance {100.0 / doc['eval']['classes']:.1f} %); retrieval: R@1 "
        f"(mean of image→text and text→image) on {doc['eval']['heldout_samples']} held-out pairs. "
        "Mean ± sample std over seeds, in %, with the 95 % Student-t interval of the mean; headroom = (row − random) "
        "/ (oracle − random) of zero-shot per seed; Δ = row − random per seed (paired).",
        "",
        "| method | subset | zero-shot top-1 | 95 % interval | retrieval R@1 | headroom | Δ zero-shot vs random |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row, stats in doc["summary"].items():
        lines.append(f"| {METHOD_LABELS[row]} | {doc['methods'][row]['subset_size']} | {stat_text(stats['zero_shot'])} | "
                     f"{interval_text(stats['zero_shot'])} | {stat_text(stats['retrieval_r1'])} | "
                     f"{stat_text(stats['headroom'], 2)} | {stat_text(stats['vs_random']['zero_shot'])} |")
    if doc.get("best"):
        lines += ["", f"Best filtered subset (highest mean zero-shot): {METHOD_LABELS[doc['best']]}; the AdaCL and "
                  "PCME++ loss rows train on it."]
    kinds = [k for k in next(iter(doc["signals"].values()), {})] if doc.get("signals") else []
    if kinds:
        lines += ["", "Signal quality without students: ROC-AUC of each score for clean (positive) against each kind "
                  "(0.5 = blind; below 0.5 = prefers the kind):", "",
                  "| score | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
        for score, row in doc["signals"].items():
            lines.append(f"| {score} | " + " | ".join(number_text(row.get(k)) for k in kinds) + " |")
    kinds = doc["corpus"]["kinds"]
    phenomena = list(next(iter(doc["methods"].values()))["removal"].get("phenomena", {}))
    lines += ["", "Removal at equal kept fraction (% of the pool's samples of a kind or phenomenon left out of the "
              "subset; clean: % kept; phenomena are clean samples: head = concept ranks 1–3, tail = ranks ≥ 9, "
              "underspecified = ≤ 2 attributes named, specific = ≥ 6):", "",
              "| method | clean kept | " + " | ".join(kinds) + " | " + " | ".join(p.replace("_", " ") for p in phenomena)
              + " |", "|---|" + "---:|" * (1 + len(kinds) + len(phenomena))]
    for row in doc["summary"]:
        rem = doc["methods"][row]["removal"]
        clean = rem["kinds"].get("clean", {}).get("removed_rate")
        cells = ["—" if clean is None else f"{100.0 * (1.0 - clean):.1f}"]
        cells += [percent_text(rem["kinds"].get(k, {}).get("removed_rate")) for k in kinds]
        cells += [percent_text(rem.get("phenomena", {}).get(p, {}).get("removed_rate")) for p in phenomena]
        lines.append(f"| {METHOD_LABELS[row]} | " + " | ".join(cells) + " |")
    if any(m.get("subsets", 1) > 1 for m in doc["methods"].values()):
        lines += ["", "Random: removal rates are the mean over its per-seed subsets."]
    detection = []
    clones, dedup, contamination = doc.get("clones"), doc.get("dedup"), doc.get("decontamination")
    if clones:
        detection.append(("AdaCL clone flags (clone_prob > 0.5)", "semantic groups (every member of a group ≥ 2)",
                          clones))
        detection.append(("AdaCL clone flags (clone_prob > 0.5)", "injected clone + duplicate + semantic_twin",
                          clones["injected"]))
    if dedup:
        detection.append((f"SemDeDup drops (ε = {dedup.get('eps')})", "semantic groups (g − 1 of a group of g)", dedup))
    if contamination:
        detection.append((f"decontaminate (cosine ≥ {contamination.get('threshold')})", "planted target images",
                          contamination))
    if detection:
        lines += ["", "Detection against the ground truth:", "", "| signal | truth | precision | recall | F1 |",
                  "|---|---|---:|---:|---:|"]
        lines += [f"| {name} | {truth} | {number_text(d['precision'])} | {number_text(d['recall'])} | "
                  f"{number_text(d['f1'])} |" for name, truth, d in detection]
    if doc.get("pcme"):
        p = doc["pcme"]
        lines += ["", f"PCME++: Spearman ρ(text uncertainty, caption specificity) over clean samples = "
                  f"{number_text(p['spearman_uncertainty_specificity'])}; p_match ROC-AUC clean vs partial_mismatch = "
                  f"{number_text(p['auc_partial_mismatch'])}."]
    lines += ["", f"Measured {doc['machine']['date']} on {doc['machine']['platform']}, "
              f"{doc['machine']['cpus']} CPUs (load average {doc['machine']['load_start']:.1f} at start, "
              f"{doc['machine']['load_end']:.1f} at end), torch {doc['machine']['torch']}: "
              f"{doc['timings']['total']:.0f} s wall time in all ({doc['timings']['train_eval']:.0f} s training and "
              f"eval), {doc['timings']['cpu_total']:.0f} CPU seconds."]
    return "\n".join(lines) + "\n"
