"""`curate compare`'s entry: the teacher, the curation chain as a recipe run by the recipe planner, the subsets,
the held-out split, the students, compare.json / compare.md (`run`)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

import numpy as np

from curate.config import check_config
from curate.errors import CurateError
from curate.io.atomic import write_text_atomic
from curate.stages.score import ScoreConfig
from curate.compare import (FORMAT, HELDOUT_SEED_OFFSET, LOSS_ROWS, METHOD_LABELS, METHODS, SELECTION_METHODS,
                            CompareConfig, CompareResult)
from curate.compare.quality import (clone_quality, decontamination_quality, dedup_quality, pcme_quality,
                                    signal_aucs)
from curate.compare.runs import RunSpec, content_key, plot_curves, run_all
from curate.compare.signals import extra_steps, read_column, read_truth, run_steps, signal_keeps
from curate.compare.tables import (best_method, check_budgets, mean_removal, oracle_rows, prefilter_fraction,
                                   random_rows, removal_and_composition, render_markdown, subset_size,
                                   summary_over_seeds)
from curate.stages.train_student import StudentConfig

INPUTS_JSON = "inputs.json"  # the corpus's and the teacher's identity the chain's outputs were made from
HELDOUT_DIR = "heldout"
# The scores whose ROC-AUC per kind compare.json reports (signals): name -> (table, column).
SIGNAL_COLUMNS = {"clipscore": ("scores.parquet", "clipscore"), "negclip": ("scores.parquet", "negclip"),
                  "normsim_inf": ("normsim_inf.parquet", "normsim_inf"), "normsim_2": ("normsim_2.parquet", "normsim_2"),
                  "normsim_2d": ("normsim_2d.parquet", "normsim_2d"), "clone_free": ("signals.parquet", "clone_free"),
                  "p_match_calibrated": ("pcme_calibrated.parquet", "p_match"), "p_match": ("pcme.parquet", "p_match"),
                  "pcme_certainty": ("signals.parquet", "pcme_certainty"),
                  "semdedup_keep": ("dedup.parquet", "semdedup_keep")}
CHAIN_SECTIONS = {"embed": "embed", "embed_target": "embed", "score": "score", "normsim": "score",
                  "clones": "score", "filter": "subsets"}  # recipe section -> the timing it counts in


def corpus_identity(corpus: Path) -> dict:
    """What the corpus is (its synth manifest and its shards' names and sizes), or a CurateError when it is not a
    complete synth corpus with a target set."""
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
    shards = sorted(corpus.glob("*.tar"))
    return {"manifest": {k: manifest.get(k) for k in ("parameters", "truth_counts", "corruption_kinds")},
            "shards": [[p.name, p.stat().st_size] for p in shards]}


def resolve_teacher(config: CompareConfig, log: Callable[[str], None]) -> tuple[str, str, dict]:
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
    # negCLIPLoss's B is the teacher's training batch (the paper); a curate checkpoint records it
    train = meta.get("train_config") if isinstance(meta, dict) else None
    batch = train.get("batch_size") if isinstance(train, dict) else None
    return path, model, {"file": path, "model": model, "sha256": digest[:16],
                         "train_batch_size": batch if isinstance(batch, int) and batch > 0 else None}


def decimal_text(value: float) -> str:
    return format(Decimal(str(value)).normalize(), "f")


def method_keeps(cfg: CompareConfig) -> dict[str, list[str]]:
    """The `--keep` steps of each method filtered in the chain (F and min(1, P·F) as the decimals written)."""
    fraction = decimal_text(cfg.fraction)
    first = prefilter_fraction(cfg.fraction, cfg.prefilter)
    return {"clipscore": [f"clipscore:{fraction}"], "negclip": [f"negclip:{fraction}"],
            "negclip_normsim_inf": [f"negclip:{first}", f"normsim_inf:{fraction}"],
            "negclip_normsim_2": [f"negclip:{first}", f"normsim_2:{fraction}"]}


def chain_recipe(corpus: Path, out: Path, cfg: CompareConfig, teacher_path: str, teacher_model: str) -> dict:
    """The curation chain as a recipe (what a recipe file would hold), run dir = `out`: embed the corpus and its
    target set, score, NormSim (inf and 2) against the target images, AdaCL's clone discovery, one [[filter]] per
    method of `method_keeps` (NormSim_2-D has no target, so it runs outside, with the other signals)."""
    from curate.recipe import validate_recipe

    device = cfg.device  # resolved: cpu, cuda or cuda:N (the [run] device names the kind)
    raw: dict[str, Any] = {
        "run": {"dir": str(out), "device": "cuda" if device.startswith("cuda") else "cpu"},
        "teacher": {"model": teacher_model, "pretrained": teacher_path},
        # overwrite: a shard embedded by another teacher is embedded again (the step reruns when the teacher did)
        "embed": {"shards": str(corpus.resolve()), "out": "emb", "device": device, "overwrite": True},
        "embed_target": {"shards": str((corpus / "target").resolve()), "out": "target_emb", "device": device,
                         "overwrite": True},
        "score": {"metrics": ["clipscore", "negclip"], "k": cfg.negclip_k, "batch_size": cfg.negclip_batch,
                  "seed": 0, "device": device, "out": "scores.parquet"},
        "normsim": {"target": "target_emb", "p": ["inf", "2"], "out": "normsim.parquet"},
        "clones": {"batch_size": cfg.clones_batch, "device": device, "out": "clones.parquet"},
        "filter": [{"name": method, "keep": keeps} for method, keeps in method_keeps(cfg).items()],
    }
    return validate_recipe(raw, f"{out} (the chain of curate compare)")


def forget_stale_chain(steps: list, out: Path, identity: dict, log: Callable[[str], None]) -> None:
    """When the chain's outputs in `out` were made from another corpus or teacher (inputs.json), remove them, so
    that the planner makes them again; then record this identity."""
    path = out / INPUTS_JSON
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        recorded = None
    if recorded is not None and recorded != identity:
        log(f"{out}: the corpus or the teacher changed since its chain ran; embedding and scoring again")
        for output in [o for step in steps for o in step.outputs] + [str(out / ".curate-cache")]:
            target = Path(output)
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    write_text_atomic(path, json.dumps(identity, indent=2, sort_keys=True) + "\n")


def run(corpus: str | Path, out_dir: str | Path, cfg: CompareConfig = CompareConfig(),
        log: Callable[[str], None] = lambda message: None, progress=None) -> CompareResult:
    """Run the whole comparison (see the package docstring) and write compare.json, compare.md and curves.png.
    `log(message)`: what is being done (the chain's steps as `curate run` reports them); `progress(label)`: a
    context manager giving the progress bar of a chain step (as in curate.recipe.execute)."""
    from curate.io.tables import EmbeddingPool
    from curate.io.uids import write_uid_npy
    from curate.models.teacher import model_config, resolve_device
    from curate.recipe import execute, plan
    from curate.stages.synth import CORRUPTION_KINDS, TRUTH_KINDS, SynthConfig
    from curate.stages.synth import entry as synth
    from curate.stages.synth.entry import world_identity
    from curate.stages.train_student.data import load_pairs, read_subset_uids
    from curate.stages.train_student.evaluation import load_eval_data
    from curate.stages.train_student.training import student_transforms

    check_config(cfg)
    cfg = cfg.resolved()
    check_config(cfg)
    cfg = replace(cfg, device=str(resolve_device(cfg.device)))
    started, cpu_started = time.perf_counter(), cpu_seconds()
    load_start = os.getloadavg()[0]
    timings: dict[str, float] = {}
    corpus, out = Path(corpus), Path(out_dir)
    identity = corpus_identity(corpus)
    out.mkdir(parents=True, exist_ok=True)

    tick = time.perf_counter()
    teacher_path, teacher_model, teacher_id = resolve_teacher(cfg, log)
    if cfg.negclip_batch is None:
        cfg = replace(cfg, negclip_batch=teacher_id["train_batch_size"] or ScoreConfig().batch_size)
    timings["teacher"] = time.perf_counter() - tick

    # -- the chain: embed -> score -> normsim -> filters, by the recipe planner (its markers make reruns skip)
    recipe = chain_recipe(corpus, out, cfg, teacher_path, teacher_model)
    steps = {step.name: step for step in plan(recipe)}
    # contents, not paths: a changed corpus or teacher file makes the chain (and the runs) anew
    pool_identity = {"teacher": {k: teacher_id[k] for k in ("model", "sha256")}, "corpus": identity}
    forget_stale_chain(list(steps.values()), out, pool_identity, log)
    records = execute(recipe, echo=log, progress=progress)
    for name in set(CHAIN_SECTIONS.values()):
        timings[name] = sum(r.get("seconds", 0.0) for r in records
                            if CHAIN_SECTIONS.get(steps[r["step"]].section) == name)

    # -- the stages the recipe has no section for (NormSim_2-D, PCME, SemDeDup, decontamination) and their filters
    emb_dir = Path(steps["embed"].outputs[0])
    target_emb = Path(steps["embed_target"].outputs[0])
    fraction = decimal_text(cfg.fraction)
    # the chain's last digest holds every chain step's parameters: a filter here that reads scores.parquet or
    # clones.parquet is made again when they were
    chained = {**pool_identity, "chain": list(steps.values())[-1].digest}
    extras = extra_steps(emb_dir, target_emb, out, cfg, fraction, chained, cfg.device)
    timings["signals"] = run_steps(extras, out, log)

    # -- subsets: the filters', the whole pool, the oracle's and a seeded random one per seed
    tick = time.perf_counter()
    pool = EmbeddingPool(emb_dir)
    pool_uids = [str(u) for u in pool.column("uid")]
    truth = read_truth(pool)
    pool_truth = truth.kind.tolist()
    n_pool = len(pool_uids)
    k = subset_size(cfg.fraction, n_pool)
    if k < cfg.batch_size:
        raise CurateError(f"{corpus}: the subsets hold ceil({cfg.fraction} x {n_pool}) = {k} samples, fewer than the "
                          f"batch size {cfg.batch_size}; use a larger corpus or --fraction, or a smaller --batch-size")
    subsets_dir = out / "subsets"
    subset_uids: dict[tuple[str, int | None], list[str]] = {}
    recipes: dict[str, object] = {}
    for method, keeps in method_keeps(cfg).items():
        step = steps[f"filter:{method}"]
        subset_uids[(method, None)] = read_subset_uids(step.outputs[0])
        recipes[method] = {"tables": [Path(t).name for t in step.inputs], "keep": keeps}
    for method, (tables, options) in signal_keeps(cfg, fraction).items():
        subset_uids[(method, None)] = read_subset_uids(subsets_dir / method)
        recipes[method] = {"tables": tables, **options}
    for method in recipes:
        if len(subset_uids[(method, None)]) != k:
            raise CurateError(f"{subsets_dir / method}: {len(subset_uids[(method, None)])} samples, not ceil(F x N) = "
                              f"{k}; remove it and rerun")
    write_uid_npy(pool_uids, subsets_dir / "no_filter" / "uids.npy")
    subset_uids[("no_filter", None)] = pool_uids
    oracle = [pool_uids[i] for i in oracle_rows(truth, k)]
    write_uid_npy(oracle, subsets_dir / "oracle" / "uids.npy")
    subset_uids[("oracle", None)] = oracle
    recipes["oracle"] = "ground truth: correct pairs, one per semantic group, target family first"
    for seed in range(cfg.seeds):
        chosen = [pool_uids[i] for i in random_rows(n_pool, k, seed)]
        write_uid_npy(chosen, subsets_dir / f"random-seed{seed}" / "uids.npy")
        subset_uids[("random", seed)] = chosen
    uid_row = {u: i for i, u in enumerate(pool_uids)}
    methods: dict[str, dict] = {}
    for method in METHODS:
        removals = []
        for key in [key for key in subset_uids if key[0] == method]:
            mask = np.zeros(n_pool, dtype=bool)
            mask[[uid_row[u] for u in subset_uids[key]]] = True
            removals.append(removal_and_composition(pool_truth, mask, truth))
        methods[method] = {"label": METHOD_LABELS[method], "subset_size": removals[0]["kept"],
                           "subsets": len(removals), "removal": mean_removal(removals),
                           "recipe": recipes.get(method, "seeded uniform sample" if method == "random" else "all")}
    quality = signal_quality(out, pool_uids, truth, cfg)
    timings["subsets"] += time.perf_counter() - tick

    # -- held-out split with its own target set (never seen by NormSim)
    tick = time.perf_counter()
    params = json.loads((corpus / "manifest.json").read_text())["parameters"]
    heldout_seed = int(params["seed"]) + HELDOUT_SEED_OFFSET
    heldout_params = {"samples": cfg.heldout_samples, "shard_size": max(1, cfg.heldout_samples), "seed": heldout_seed,
                      "corrupt": 0.0, "target_samples": cfg.heldout_target_samples,
                      "image_size": int(params["image_size"])}
    heldout = out / HELDOUT_DIR
    if not complete_corpus(heldout, heldout_params):
        log(f"generating the held-out split (seed {heldout_seed}, {cfg.heldout_samples} pairs)")
        shutil.rmtree(heldout, ignore_errors=True)  # a split made with other parameters, or an unfinished one
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
    eval_key = content_key({"heldout": heldout_params, "model": cfg.model, "arch": model_config(cfg.model),
                            "world": world_identity()})

    tick = time.perf_counter()
    context = {"pool": content_key(pool_identity)}

    def spec(row: str, subset: str, seed: int, loss: str) -> RunSpec:
        student = StudentConfig(model=cfg.model, loss=loss, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                                seed=seed, threads=cfg.threads, device=cfg.device)
        uids = subset_uids.get((subset, seed)) or subset_uids[(subset, None)]
        return RunSpec(str(out / "runs" / row / f"seed{seed}"), row, seed, uids, student, eval_key, context)

    runs = run_all([spec(m, m, seed, cfg.loss) for seed in range(cfg.seeds) for m in METHODS],
                   pairs, eval_data, cfg.jobs, out, log)
    best = best_method(summary_over_seeds(runs), SELECTION_METHODS)
    if cfg.loss_rows and best is not None:
        loss_specs = [spec(row, best, seed, loss) for seed in range(cfg.seeds) for row, loss in LOSS_ROWS.items()
                      if loss != cfg.loss]
        runs += run_all(loss_specs, pairs, eval_data, cfg.jobs, out, log)
        for row, loss in LOSS_ROWS.items():
            if loss != cfg.loss:
                methods[row] = {**methods[best], "label": METHOD_LABELS[row], "loss": loss,
                                "recipe": {"subset": best, "loss": loss}}
    timings["train_eval"] = time.perf_counter() - tick
    budget = check_budgets(runs)

    import torch

    timings["total"] = time.perf_counter() - started
    # CPU seconds of this process and its finished children (embed loaders, training workers): on a busy
    # machine wall time overstates the cost; CPU time / cores estimates the wall time of an idle one.
    timings["cpu_total"] = cpu_seconds() - cpu_started
    timing_order = ("teacher", "embed", "score", "signals", "subsets", "heldout", "decode", "train_eval", "total",
                    "cpu_total")
    manifest = json.loads((corpus / "manifest.json").read_text())
    result = CompareResult(
        format=FORMAT,
        config=asdict(cfg),
        corpus={"path": str(corpus), "samples": n_pool, "parameters": params, "world": manifest.get("world"),
                "corruption_kinds": list(CORRUPTION_KINDS),
                "kinds": [kind for kind in TRUTH_KINDS[1:] if kind in set(pool_truth)],
                "truth_counts": {kind: int(sum(1 for t in pool_truth if t == kind)) for kind in TRUTH_KINDS},
                "semantic_groups": manifest.get("semantic_groups")},
        teacher=teacher_id,
        subset_size=k,
        prefilter_fraction=prefilter_fraction(cfg.fraction, cfg.prefilter),
        budget=budget,
        eval={"heldout": str(heldout), "heldout_seed": heldout_seed, "heldout_samples": cfg.heldout_samples,
              "target_samples": int(len(eval_data.target_labels)), "classes": len(eval_data.class_names)},
        methods=methods,
        best=best,
        runs=runs,
        summary=summary_over_seeds(runs),
        **quality,
        timings={name: round(timings[name], 2) for name in timing_order},
        machine={"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "platform": platform.platform(terse=True), "cpus": os.cpu_count(),
                 "torch_threads": cfg.threads or torch.get_num_threads(), "torch": torch.__version__,
                 "load_start": round(load_start, 2), "load_end": round(os.getloadavg()[0], 2)},
    )
    doc = result.document()
    write_text_atomic(out / "compare.json", json.dumps(doc, indent=2, sort_keys=False) + "\n")
    write_text_atomic(out / "compare.md", render_markdown(doc))
    plot_curves(runs, out / "curves.png")
    return result


def signal_quality(out: Path, uids: list[str], truth, cfg: CompareConfig) -> dict:
    """signals, clones, pcme, dedup and decontamination of compare.json, from the tables in `out` and the truth."""
    scores = {name: read_column(out / table, column, uids) for name, (table, column) in SIGNAL_COLUMNS.items()}
    signals = signal_aucs(scores, truth)
    clones = clone_quality(read_column(out / "signals.parquet", "clone_free", uids) == 0, truth)
    pcme = pcme_quality(read_column(out / "pcme.parquet", "uncertainty_txt", uids),
                        read_column(out / "pcme.parquet", "p_match", uids), truth)
    dedup = dedup_quality(read_column(out / "dedup.parquet", "semdedup_keep", uids) == 0, truth)
    dedup["eps"] = cfg.dedup_eps
    contamination = decontamination_quality(read_column(out / "contamination.parquet", "contaminated", uids) == 1,
                                            truth)
    contamination["threshold"] = cfg.contamination_threshold
    return {"signals": signals, "clones": clones, "pcme": pcme, "dedup": dedup, "decontamination": contamination}


def cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def complete_corpus(path: Path, parameters: dict) -> bool:
    """Whether `path` holds a finished synth corpus of this world made with `parameters`."""
    from curate.stages.synth.entry import world_identity

    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(manifest.get("complete")) and manifest.get("parameters") == parameters \
        and manifest.get("world") == world_identity()
