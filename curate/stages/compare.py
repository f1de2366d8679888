"""`curate compare`: do curated subsets train better students than a random subset of the same size?

DataComp's closed loop in miniature, offline, with ground truth. On a synth CORPUS (`curate synth`, with a
target set in CORPUS/target):

1. teacher: the cached tiny teacher (`ensure_tiny_teacher`) unless `--teacher CKPT` is given;
2. `curate embed` of CORPUS and of CORPUS/target with the teacher; `curate score` (clipscore, negclip) and
   `curate normsim` (p = inf and p = 2, target = the embedded CORPUS/target images);
3. one subset per method, all of exactly ceil(F·N) samples (F = --fraction, N = the embedded pool), written
   by `curate filter` (or, for random, the same uid file format):
     no_filter            the whole pool (trained for the same number of steps: DataComp's "no filtering")
     random               a seeded uniform sample (a new one for every seed)
     clipscore            top F by CLIPScore
     negclip              top F by negCLIPLoss
     negclip_normsim_inf  top min(1, P·F) by negCLIPLoss, then of those the top F of the pool by NormSim_∞
     negclip_normsim_2    the same with NormSim_2
   (P = --prefilter, default 1.5: the paper's best recipe keeps 30 % by negCLIPLoss, then 20 % by NormSim_∞);
4. one student per method and seed (`curate train` on tensors decoded once), every one with the same
   budget of steps x batch size samples seen; the budgets are read back from the runs' training JSON and
   must all be equal;
5. evaluation of each student on a held-out synth split made here with another seed and no corruption:
   zero-shot top-1 on the held-out split's own target set (not CORPUS/target, which NormSim selected with)
   and retrieval R@1 (mean of image->text and text->image) on its pairs;
6. compare.json (every run's numbers and budget, each method's removal rate per injected corruption kind,
   from the `truth` in the samples' json) and compare.md (mean ± sample std over seeds; removal table).

Artefacts are cached inside COMPARE_DIR under names that carry a hash of their inputs (teacher file, corpus
manifest, parameters), so a rerun reuses embeddings, scores, the held-out split and finished runs, and a
changed input never reuses a stale one. The student configuration and the presets are in PRESETS.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Callable

import numpy as np

from curate.errors import CurateError
from curate.io.atomic import write_text_atomic
from curate.stages.train_student import EVAL_JSON, TRAIN_JSON, StudentConfig
from curate.stages.train_student.data import load_pairs, read_subset_uids
from curate.stages.train_student.evaluation import evaluate_model, load_eval_data, summary_numbers
from curate.stages.train_student.training import save_student, student_transforms, train_on_pairs

FORMAT = "curate-compare/1"
METHODS = ("no_filter", "random", "clipscore", "negclip", "negclip_normsim_inf", "negclip_normsim_2")
METHOD_LABELS = {
    "no_filter": "no filter (whole pool)",
    "random": "random",
    "clipscore": "CLIPScore top-F",
    "negclip": "negCLIPLoss top-F",
    "negclip_normsim_inf": "negCLIPLoss → NormSim∞",
    "negclip_normsim_2": "negCLIPLoss → NormSim₂",
}
# Corruptions whose caption does not describe the image; clones and duplicates are correct, redundant pairs.
MISMATCHED_KINDS = ("swapped", "generic", "noise_image")
# Held-out split: generated with seed (corpus seed + HELDOUT_SEED_OFFSET), clean, with its own target set.
HELDOUT_SEED_OFFSET = 7919

PRESETS = {
    "default": {"steps": 400, "batch_size": 128, "heldout_samples": 1000, "heldout_target_samples": 600},
    "quick": {"steps": 120, "batch_size": 64, "heldout_samples": 300, "heldout_target_samples": 300},
}


@dataclass
class CompareConfig:
    fraction: float = 0.3
    seeds: int = 3
    quick: bool = False
    steps: int | None = None                  # None: from the preset
    batch_size: int | None = None
    heldout_samples: int | None = None
    heldout_target_samples: int | None = None
    model: str = "curate-student"
    loss: str = "infonce"
    lr: float = 2e-3
    prefilter: float = 1.5                    # negclip keeps min(1, prefilter * fraction) before NormSim
    negclip_k: int = 10
    negclip_batch: int = 32768
    teacher: str | None = None                # checkpoint path; None: the cached tiny teacher
    teacher_model: str | None = None          # architecture of --teacher when it is not our checkpoint
    device: str = "cpu"
    threads: int | None = 1                   # torch threads per run (1: small models; see `jobs`)
    jobs: int = 2                             # runs trained at once, in spawned processes

    def resolved(self) -> "CompareConfig":
        preset = PRESETS["quick" if self.quick else "default"]
        return replace(self, **{k: v if getattr(self, k) is None else getattr(self, k) for k, v in preset.items()})


# ---------------------------------------------------------------- small pure helpers (tested directly)

def subset_size(fraction: float | str, pool: int) -> int:
    """ceil(F·N) with F read as the decimal written, exactly as `curate filter --keep` counts."""
    from curate.stages.filter import parse_keep

    return parse_keep(f"x:{fraction}").count(pool)


def prefilter_fraction(fraction: float | str, prefilter: float | str) -> str:
    """min(1, P·F) as a decimal string (the first, negclip, step of the NormSim recipes)."""
    value = min(Decimal(str(prefilter)) * Decimal(str(fraction)), Decimal(1))
    text = format(value.normalize(), "f")
    return text


def removal_rates(pool_truth: list[str | None], kept: np.ndarray) -> dict:
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


def summarise(runs: list[dict]) -> dict:
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


def _fmt(stat: dict, digits: int = 1) -> str:
    if stat["mean"] is None:
        return "—"
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _pct(value) -> str:
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
                     f"{_fmt(stats['zero_shot_top1'])} | {_fmt(stats['retrieval_r1'])} | {_fmt(stats['pmrp_mean'])} |")
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
        cells = [_pct(rem["kinds"].get(k, {}).get("removed_rate")) for k in kinds]
        clean = rem["kinds"].get("clean", {}).get("removed_rate")
        cells.append("—" if clean is None else f"{100.0 * (1.0 - clean):.1f}")
        cells.append(_pct(rem["clean_share"]))
        cells.append(_pct(rem.get("mismatched_share")))
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(cells) + " |")
    if any(m.get("subsets", 1) > 1 for m in doc["methods"].values()):
        lines += ["", "Random: removal rates are the mean over its per-seed subsets."]
    lines += ["", f"Measured {doc['machine']['date']} on {doc['machine']['platform']}, "
              f"{doc['machine']['cpus']} CPUs (load average {doc['machine']['load_start']:.1f} at start, "
              f"{doc['machine']['load_end']:.1f} at end), torch {doc['machine']['torch']}: "
              f"{doc['timings']['total']:.0f} s wall time in all ({doc['timings']['train_eval']:.0f} s training and "
              f"eval), {doc['timings']['cpu_total']:.0f} CPU seconds."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- cache keys

def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _corpus_identity(corpus: Path) -> dict:
    manifest_path = corpus / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        raise CurateError(f"{corpus}: no readable synth manifest.json; `curate compare` needs a corpus made by "
                          "`curate synth` (its ground truth scores the removal rates)") from None
    if not manifest.get("complete"):
        raise CurateError(f"{corpus}: the synth corpus is incomplete (manifest says complete: false); rerun "
                          "`curate synth` into it")
    if not (corpus / "target" / "classes.json").is_file():
        raise CurateError(f"{corpus}/target: no target set (classes.json); make the corpus with "
                          "`curate synth --target-samples N` (N > 0): NormSim needs it as target")
    shards = sorted((corpus).glob("*.tar"))
    return {"content": {"manifest": {k: manifest.get(k) for k in ("parameters", "truth_counts", "corruption_kinds")},
                        "shards": [(p.name, p.stat().st_size) for p in shards]},
            "resolved": str(corpus.resolve())}


def _teacher(config: CompareConfig, log: Callable[[str], None]) -> tuple[str, str, dict]:
    """(checkpoint path, architecture, identity) of the teacher."""
    from curate.models.teacher import read_checkpoint

    if config.teacher is None:
        from curate.stages.teacher.tiny import ensure_tiny_teacher, tiny_teacher_path

        if not tiny_teacher_path().is_file():
            log("training the tiny teacher once (cached for later runs; a few minutes on 2 cores)")
        path = str(ensure_tiny_teacher())
    else:
        path = str(Path(config.teacher).expanduser())
        if not Path(path).is_file():
            raise CurateError(f"--teacher {config.teacher}: checkpoint file does not exist")
    meta = read_checkpoint(path)
    meta = meta.get("curate") if isinstance(meta, dict) else None
    model = meta.get("model") if isinstance(meta, dict) else None
    model = config.teacher_model or model
    if model is None:
        raise CurateError(f"--teacher {path}: not a curate checkpoint; give its architecture with --teacher-model")
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return path, model, {"file": path, "model": model, "sha256": digest[:16]}


# ---------------------------------------------------------------- the stage

def compare(corpus: str | Path, out_dir: str | Path, config: CompareConfig,
            log: Callable[[str], None] = lambda message: None) -> dict:
    """Run the whole comparison (see the module docstring); returns the compare.json document."""
    from curate.io.tables import EmbeddingPool
    from curate.io.uids import write_uid_npy
    from curate.models.teacher import model_config, resolve_device
    from curate.config import RunOptions
    from curate.stages import score
    from curate.stages.embed import EmbedConfig
    from curate.stages.embed.entry import plan_embed
    from curate.stages.embed.entry import run as embed
    from curate.stages.common import pool_field
    from curate.stages.filter import filter_pool
    from curate.stages.normsim import normsim
    from curate.stages.synth import CORRUPTION_KINDS, SynthConfig
    from curate.stages.synth import entry as synth

    cfg = config.resolved()
    _check(cfg)
    cfg = replace(cfg, device=str(resolve_device(cfg.device)))
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    load_start = os.getloadavg()[0]
    timings: dict[str, float] = {}
    corpus, out = Path(corpus), Path(out_dir)
    identity = _corpus_identity(corpus)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache"

    tick = time.perf_counter()
    teacher_path, teacher_model, teacher_id = _teacher(cfg, log)
    timings["teacher"] = time.perf_counter() - tick

    # -- embeddings, scores, NormSim (cached by input hash)
    tick = time.perf_counter()
    # Keys hold contents (teacher digest, corpus manifest and shard sizes), not paths.
    embed_key = _key({"teacher": {k: teacher_id[k] for k in ("model", "sha256")}, "corpus": identity["content"]})
    emb_dir, target_emb = cache / f"emb-{embed_key}", cache / f"target-emb-{embed_key}"
    embed_config = EmbedConfig(model=teacher_model, pretrained=teacher_path, device=cfg.device, workers=2)
    for source, dest in ((corpus, emb_dir), (corpus / "target", target_emb)):
        if plan_embed(str(source), dest, 0, 1)[1]:
            log(f"embedding {source} with {teacher_model}")
        result = embed(str(source), dest, embed_config, RunOptions(rank=0, world_size=1))
        if result.failures:
            raise CurateError(f"embedding {source} failed: {result.failures[0]['error'].splitlines()[-1]}")
    timings["embed"] = time.perf_counter() - tick

    tick = time.perf_counter()
    score_key = _key({"embed": embed_key, "k": cfg.negclip_k, "b": cfg.negclip_batch})
    scores_path = cache / f"scores-{score_key}.parquet"
    if not scores_path.is_file():
        log("scoring: clipscore, negclip")
        score.run(emb_dir, scores_path, score.ScoreConfig(k=cfg.negclip_k, batch_size=cfg.negclip_batch, seed=0,
                                                          device=cfg.device, cache_dir=cache / "memmap"))
    normsim_paths = {}
    for p in ("inf", "2"):
        normsim_paths[p] = cache / f"normsim_{p}-{embed_key}.parquet"
        if not normsim_paths[p].is_file():
            log(f"NormSim_{p} against {corpus / 'target'}")
            normsim(emb_dir, str(target_emb), p, normsim_paths[p], device=cfg.device, cache_dir=cache / "memmap")
    timings["score"] = time.perf_counter() - tick

    # -- subsets (cheap; rewritten every run)
    tick = time.perf_counter()
    pool = EmbeddingPool(emb_dir)
    pool_uids = [str(u) for u in pool.column("uid")]
    pool_truth = pool_field(pool, "json:truth")
    n_pool = len(pool_uids)
    k = subset_size(cfg.fraction, n_pool)
    if k < cfg.batch_size:
        raise CurateError(f"{corpus}: the subsets hold ceil({cfg.fraction} x {n_pool}) = {k} samples, fewer than the "
                          f"batch size {cfg.batch_size}; use a larger corpus or --fraction, or a smaller --batch-size")
    fraction = str(Decimal(str(cfg.fraction)).normalize())
    first = prefilter_fraction(cfg.fraction, cfg.prefilter)
    subsets_dir = out / "subsets"
    subset_uids: dict[tuple[str, int | None], list[str]] = {}
    recipes = {
        "clipscore": ([scores_path], [f"clipscore:{fraction}"]),
        "negclip": ([scores_path], [f"negclip:{fraction}"]),
        "negclip_normsim_inf": ([scores_path, normsim_paths["inf"]], [f"negclip:{first}", f"normsim_inf:{fraction}"]),
        "negclip_normsim_2": ([scores_path, normsim_paths["2"]], [f"negclip:{first}", f"normsim_2:{fraction}"]),
    }
    for method, (tables, keeps) in recipes.items():
        result = filter_pool(tables, subsets_dir / method, keeps=keeps)
        subset_uids[(method, None)] = read_subset_uids(subsets_dir / method)
        assert result.kept == k, (method, result.kept, k)
    write_uid_npy(pool_uids, subsets_dir / "no_filter" / "uids.npy")
    subset_uids[("no_filter", None)] = pool_uids
    for seed in range(cfg.seeds):
        rng = np.random.default_rng([seed, 0x5EED])
        chosen = [pool_uids[i] for i in np.sort(rng.choice(n_pool, size=k, replace=False))]
        write_uid_npy(chosen, subsets_dir / f"random-seed{seed}" / "uids.npy")
        subset_uids[("random", seed)] = chosen
    uid_row = {u: i for i, u in enumerate(pool_uids)}
    methods: dict[str, dict] = {}
    for method in METHODS:
        keys = [key for key in subset_uids if key[0] == method]
        removals = []
        for key in keys:
            mask = np.zeros(n_pool, dtype=bool)
            mask[[uid_row[u] for u in subset_uids[key]]] = True
            removals.append(removal_rates(pool_truth, mask))
        methods[method] = {"label": METHOD_LABELS[method], "subset_size": removals[0]["kept"],
                           "subsets": len(removals), "removal": _mean_removal(removals),
                           "recipe": {"tables": [str(t) for t in recipes[method][0]], "keep": recipes[method][1]}
                           if method in recipes else ("seeded uniform sample" if method == "random" else "all")}
    timings["subsets"] = time.perf_counter() - tick

    # -- held-out split with its own target set (never seen by NormSim)
    tick = time.perf_counter()
    params = json.loads((corpus / "manifest.json").read_text())["parameters"]
    heldout_seed = int(params["seed"]) + HELDOUT_SEED_OFFSET
    heldout_params = {"samples": cfg.heldout_samples, "shard_size": max(1, cfg.heldout_samples), "seed": heldout_seed,
                      "corrupt": 0.0, "target_samples": cfg.heldout_target_samples,
                      "image_size": int(params["image_size"])}
    heldout = cache / f"heldout-{_key(heldout_params)}"
    if not _complete_corpus(heldout, heldout_params):
        log(f"generating the held-out split (seed {heldout_seed}, {cfg.heldout_samples} pairs)")
        synth.run(heldout, SynthConfig(**heldout_params))
    timings["heldout"] = time.perf_counter() - tick

    # -- decode once, then train and evaluate every (method, seed), `jobs` runs at a time
    tick = time.perf_counter()
    preprocess, tokenizer = student_transforms(cfg.model)
    pairs = load_pairs(str(corpus), preprocess, tokenizer, set(pool_uids))
    eval_data = load_eval_data(preprocess, tokenizer, str(heldout), str(heldout / "target"))
    timings["decode"] = time.perf_counter() - tick
    # The architecture's config (not only its name) is part of every run's identity: a changed config JSON
    # must not reuse runs trained with the old one.
    eval_key = _key({"heldout": heldout_params, "model": cfg.model, "arch": model_config(cfg.model)})

    tick = time.perf_counter()
    context = {"pool": embed_key}
    specs = []
    for seed in range(cfg.seeds):
        for method in METHODS:
            student = StudentConfig(model=cfg.model, loss=cfg.loss, steps=cfg.steps, batch_size=cfg.batch_size,
                                    lr=cfg.lr, seed=seed, threads=cfg.threads, device=cfg.device)
            uids = subset_uids.get((method, seed)) or subset_uids[(method, None)]
            specs.append(RunSpec(str(out / "runs" / method / f"seed{seed}"), method, seed, uids, student,
                                 eval_key, context))
    runs = run_all(specs, pairs, eval_data, cfg.jobs, cache, log)
    timings["train_eval"] = time.perf_counter() - tick
    budget = check_budgets(runs)

    import torch

    timings["total"] = time.perf_counter() - started
    # CPU seconds of this process and its finished children (embed loaders, training workers): on a busy
    # machine wall time overstates the cost; CPU time / cores estimates the wall time of an idle one.
    timings["cpu_total"] = _cpu_seconds() - cpu_started
    doc = {
        "format": FORMAT,
        "config": asdict(cfg),
        "corpus": {"path": str(corpus), "samples": n_pool, "parameters": params,
                   "corruption_kinds": list(CORRUPTION_KINDS),
                   "truth_counts": {kind: int(sum(1 for t in pool_truth if t == kind))
                                    for kind in ("clean",) + tuple(CORRUPTION_KINDS)}},
        "teacher": teacher_id,
        "subset_size": k,
        "prefilter_fraction": first,
        "budget": budget,
        "eval": {"heldout": str(heldout), "heldout_seed": heldout_seed, "heldout_samples": cfg.heldout_samples,
                 "target_samples": int(len(eval_data.target_labels)), "classes": len(eval_data.class_names)},
        "methods": methods,
        "runs": runs,
        "summary": summarise(runs),
        "timings": {name: round(value, 2) for name, value in timings.items()},
        "machine": {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "platform": platform.platform(terse=True), "cpus": os.cpu_count(),
                    "torch_threads": cfg.threads or torch.get_num_threads(), "torch": torch.__version__,
                    "load_start": round(load_start, 2), "load_end": round(os.getloadavg()[0], 2)},
    }
    write_text_atomic(out / "compare.json", json.dumps(doc, indent=2, sort_keys=False) + "\n")
    write_text_atomic(out / "compare.md", render_markdown(doc))
    plot_curves(runs, out / "curves.png")
    return doc


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _check(cfg: CompareConfig) -> None:
    if not 0 < cfg.fraction <= 1:
        raise CurateError(f"--fraction must be in (0, 1], got {cfg.fraction}")
    if cfg.seeds < 1:
        raise CurateError(f"--seeds must be >= 1, got {cfg.seeds}")
    if cfg.jobs < 1:
        raise CurateError(f"--jobs must be >= 1, got {cfg.jobs}")
    if not cfg.prefilter >= 1:
        raise CurateError(f"--prefilter must be >= 1 (negclip keeps prefilter x fraction first), got {cfg.prefilter}")
    for name in ("steps", "batch_size", "heldout_samples", "heldout_target_samples"):
        if getattr(cfg, name) < 1:
            raise CurateError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")


def _complete_corpus(path: Path, parameters: dict) -> bool:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(manifest.get("complete")) and manifest.get("parameters") == parameters


def _mean_removal(removals: list[dict]) -> dict:
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


@dataclass
class RunSpec:
    run_dir: str
    method: str
    seed: int
    uids: list[str]
    student: StudentConfig
    eval_key: str
    context: dict

    def key(self) -> str:
        subset_hash = hashlib.sha256("\n".join(sorted(self.uids)).encode()).hexdigest()[:16]
        return _key({"student": asdict(self.student), "subset": subset_hash, "eval": self.eval_key, **self.context})


def finished_run(spec: RunSpec) -> dict | None:
    """The record of a finished run with the same inputs (reruns reuse it), else None."""
    try:
        record = json.loads((Path(spec.run_dir) / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("run_key") == spec.key() else None


def run_one(spec: RunSpec, pairs, eval_data) -> dict:
    """Train and evaluate one student; returns (and writes) its run.json record."""
    from curate.run.threads import torch_threads

    run_dir = Path(spec.run_dir)
    started, cpu_started = time.perf_counter(), time.process_time()
    with torch_threads(spec.student.threads):
        subset = pairs.select(spec.uids)
        trained = train_on_pairs(subset, spec.student)
        saved = save_student(trained, run_dir, {"method": spec.method, "pairs": len(subset.uids),
                                                "truth_counts": subset.truth_counts()})
        result = evaluate_model(trained.model, trained.heads_state, eval_data, spec.student.device)
    write_text_atomic(run_dir / EVAL_JSON, json.dumps(result, indent=2, sort_keys=True) + "\n")
    # The budget tabulated is the one the training JSON logged (read back), not the configuration.
    logged = json.loads((run_dir / TRAIN_JSON).read_text())["budget"]
    record = {"method": spec.method, "seed": spec.seed, "run_key": spec.key(), "dir": str(run_dir), "budget": logged,
              **summary_numbers(result), "final_loss": saved["final_loss"], "train_seconds": saved["train_seconds"],
              "seconds": round(time.perf_counter() - started, 3),
              "cpu_seconds": round(time.process_time() - cpu_started, 3),
              "curve": [[h["step"], h["loss"]] for h in trained.history]}
    write_text_atomic(run_dir / "run.json", json.dumps(record, indent=2) + "\n")
    return record


# Worker-process state for parallel runs: the decoded tensors, loaded once per worker (memory-mapped).
_WORKER: dict = {}


def _worker_init(tensors_path: str) -> None:
    import torch

    from curate.stages.train_student.data import PairSet
    from curate.stages.train_student.evaluation import EvalData

    saved = torch.load(tensors_path, weights_only=True, mmap=True)
    _WORKER["pairs"] = PairSet(**saved["pairs"])
    _WORKER["eval"] = EvalData(**{k: (np.asarray(v) if k in ("heldout_labels", "target_labels") and v is not None
                                      else v) for k, v in saved["eval"].items()})


def _worker_run(spec: RunSpec) -> dict:
    return run_one(spec, _WORKER["pairs"], _WORKER["eval"])


def run_all(specs: list[RunSpec], pairs, eval_data, jobs: int, cache: Path, log: Callable[[str], None]) -> list[dict]:
    """Every run, finished ones reused; `jobs` > 1 trains in that many spawned processes. Each run is
    seeded on its own and trains with a fixed number of threads, so results do not depend on `jobs`."""
    records: dict[int, dict] = {}
    todo = []
    for i, spec in enumerate(specs):
        record = finished_run(spec)
        if record is not None:
            log(f"{spec.method} seed {spec.seed}: reused ({spec.run_dir})")
            records[i] = record
        else:
            todo.append(i)

    def done(i: int, record: dict) -> None:
        records[i] = record
        log(f"{record['method']} seed {record['seed']}: zero-shot {record['zero_shot_top1']:.1f} %, "
            f"R@1 {record['retrieval_r1']:.1f} % ({record['seconds']:.0f} s)")

    if jobs <= 1 or len(todo) <= 1:
        for i in todo:
            done(i, run_one(specs[i], pairs, eval_data))
    else:
        import concurrent.futures as cf

        import torch
        import torch.multiprocessing as tmp

        tensors_path = cache / f"decoded-{os.getpid()}.pt"
        tensors_path.parent.mkdir(parents=True, exist_ok=True)
        eval_state = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict_shallow(eval_data).items()}
        torch.save({"pairs": asdict_shallow(pairs), "eval": eval_state}, tensors_path)
        try:
            with cf.ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=tmp.get_context("spawn"),
                                        initializer=_worker_init, initargs=(str(tensors_path),)) as pool:
                futures = {pool.submit(_worker_run, specs[i]): i for i in todo}
                for future in cf.as_completed(futures):
                    done(futures[future], future.result())
        finally:
            tensors_path.unlink(missing_ok=True)
    return [records[i] for i in range(len(specs))]


def asdict_shallow(obj) -> dict:
    """A dataclass's fields as a dict without deep-copying tensors (dataclasses.asdict copies)."""
    from dataclasses import fields

    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def plot_curves(runs: list[dict], path: Path) -> Path:
    """Training loss of every run, one colour per method (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from curate.io.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    colours = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for method in METHODS:
        for i, run in enumerate(r for r in runs if r["method"] == method):
            steps, losses = zip(*run["curve"]) if run["curve"] else ((), ())
            ax.plot(steps, losses, color=colours[method], alpha=0.8, label=METHOD_LABELS[method] if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("student training curves (same budget)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
