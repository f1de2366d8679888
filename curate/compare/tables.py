"""The pure pieces of `curate compare` (tested directly): subset sizes, removal rates and subset composition, means
over seeds, the budget check, and compare.md."""

from __future__ import annotations

import math
from decimal import Decimal

import numpy as np

from curate.errors import CurateError
from curate.compare import METHOD_LABELS, METHODS, MISMATCHED_KINDS


def subset_size(fraction: float | str, pool: int) -> int:
    """ceil(F·N) with F read as the decimal written, exactly as `curate filter --keep` counts."""
    from curate.stages.filter.common import parse_keep

    return parse_keep(f"x:{fraction}").count(pool)


def prefilter_fraction(fraction: float | str, prefilter: float | str) -> str:
    """min(1, P·F) as a decimal string (the first, negclip, step of the NormSim recipes)."""
    value = min(Decimal(str(prefilter)) * Decimal(str(fraction)), Decimal(1))
    text = format(value.normalize(), "f")
    return text


def removal_and_composition(pool_truth: list[str | None], kept: np.ndarray) -> dict:
    """Per truth kind pool/kept counts and rates (curate.stages.truth.removal_rates), plus the subset's clean
    share and mismatched share (swapped, generic and noise_image: pairs whose caption does not describe the image)."""
    from curate.stages.truth import removal_rates as kind_rates

    truth = np.asarray([str(t) if t is not None else "unknown" for t in pool_truth], dtype=object)
    kept = np.asarray(kept, dtype=bool)
    n_kept = int(kept.sum())
    mismatched = np.isin(truth, MISMATCHED_KINDS)
    return {"kinds": kind_rates(truth, kept), "kept": n_kept,
            "clean_share": float((kept & (truth == "clean")).sum() / n_kept) if n_kept else None,
            "mismatched_share": float((kept & mismatched).sum() / n_kept) if n_kept else None}


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (ddof = 1; None for a single value) of the finite values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return {"mean": float(np.mean(vals)), "std": std, "n": len(vals)}


def summary_over_seeds(runs: list[dict]) -> dict:
    """Per method: mean ± std over seeds of zero-shot top-1 and retrieval R@1 (and PMRP) from the runs."""
    out: dict = {}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        out[method] = {metric: mean_std([r[metric] for r in mine])
                       for metric in ("zero_shot_top1", "retrieval_r1", "pmrp_mean")}
        out[method]["seeds"] = sorted(r["seed"] for r in mine)
    return out


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


def mean_std_text(stat: dict, digits: int = 1) -> str:
    """`mean ± std` (the mean alone for one seed; — for none)."""
    if stat["mean"] is None:
        return "—"
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def percent_text(value) -> str:
    return "—" if value is None else f"{100.0 * value:.1f}"


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
        "Mean ± sample std over seeds, in %.",
        "",
        "| method | subset | zero-shot top-1 | retrieval R@1 | PMRP |",
        "|---|---:|---:|---:|---:|",
    ]
    for method, stats in doc["summary"].items():
        lines.append(f"| {METHOD_LABELS[method]} | {doc['methods'][method]['subset_size']} | "
                     f"{mean_std_text(stats['zero_shot_top1'])} | {mean_std_text(stats['retrieval_r1'])} | {mean_std_text(stats['pmrp_mean'])} |")
    kinds = doc["corpus"]["corruption_kinds"]
    lines += ["", "Removal rate per injected corruption kind (% of that kind in the pool left out of the subset), "
              "share of the clean samples kept, and the subset's composition: clean share, and mismatched share "
              f"({', '.join(MISMATCHED_KINDS)}: the caption does not describe the image; clones and duplicates "
              "are correct but redundant pairs). From the ground truth, in %:", "",
              "| method | " + " | ".join(f"{k} removed" for k in kinds)
              + " | clean kept | subset clean | subset mismatched |",
              "|---|" + "---:|" * (len(kinds) + 3)]
    for method in doc["summary"]:
        rem = doc["methods"][method]["removal"]
        cells = [percent_text(rem["kinds"].get(k, {}).get("removed_rate")) for k in kinds]
        clean = rem["kinds"].get("clean", {}).get("removed_rate")
        cells.append("—" if clean is None else f"{100.0 * (1.0 - clean):.1f}")
        cells.append(percent_text(rem["clean_share"]))
        cells.append(percent_text(rem.get("mismatched_share")))
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(cells) + " |")
    if any(m.get("subsets", 1) > 1 for m in doc["methods"].values()):
        lines += ["", "Random: removal rates are the mean over its per-seed subsets."]
    lines += ["", f"Measured {doc['machine']['date']} on {doc['machine']['platform']}, "
              f"{doc['machine']['cpus']} CPUs (load average {doc['machine']['load_start']:.1f} at start, "
              f"{doc['machine']['load_end']:.1f} at end), torch {doc['machine']['torch']}: "
              f"{doc['timings']['total']:.0f} s wall time in all ({doc['timings']['train_eval']:.0f} s training and "
              f"eval), {doc['timings']['cpu_total']:.0f} CPU seconds."]
    return "\n".join(lines) + "\n"


def mean_removal(removals: list[dict]) -> dict:
    """The removal table of one subset, or the mean over several (random: one subset per seed)."""
    if len(removals) == 1:
        return removals[0]
    kinds = removals[0]["kinds"]
    mean = {"kinds": {}, "kept": removals[0]["kept"],
            "clean_share": float(np.mean([r["clean_share"] for r in removals])),
            "mismatched_share": float(np.mean([r["mismatched_share"] for r in removals]))}
    for kind, first in kinds.items():
        rates = [r["kinds"][kind]["removed_rate"] for r in removals]
        mean["kinds"][kind] = {"pool": first["pool"], "kept": float(np.mean([r["kinds"][kind]["kept"] for r in removals])),
                               "removed_rate": None if None in rates else float(np.mean(rates))}
    return mean
