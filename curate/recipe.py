"""`curate run RECIPE.toml`: one file describes the whole chain; `--dry-run` validates it and prints the plan.

Sections (all optional except [run]; see examples/recipes/ and README):
  [run] dir, executor, workers, ray_address, device      [synth] out and `curate synth`'s options (samples, ...)
  [teacher] model, pretrained ("tiny-cached" = the project's self-trained curate-tiny), precision
  [embed] shards, out, batch_size, workers, tasks, images_only   [embed_target] the same for target shards
  [import_datacomp] metadata, arch, out                   (instead of [embed], for DataComp's embeddings)
  [score] metrics, k, batch_size, seed, out               [normsim] target, p (list), out, index, nlist, nprobe,
                                                          templates, and for p = 2d iterations, final_fraction,
                                                          subsample, seed, prefilter
  [clones] out and `curate clones`' options               [[filter]] name, keep, min, max, mode, normsim, target,
                                                          fraction_rule, drop_duplicates, drop_contaminated,
                                                          include_uids, union, exclude_uids (paths, or the name
                                                          of an earlier [[filter]] for a uid list)
  [dedup] out and `curate dedup`'s options                [decontaminate] against (list; default: the [normsim]
                                                          target, else [embed_target] out), out, and the options
  [normsim] require_decontamination = true: every [[filter]] ranking by NormSim drops what [decontaminate] flags
  [export] subset, shards, out, shard_size                [truth] subsets (ground-truth removal table)
  [report] out and `curate report`'s options (per_decile, thumb_px, max_points, seed)
Relative `[run] dir` is relative to the working directory; every other relative path to `[run] dir`.
A stage is skipped on rerun when its run marker (written last, with a hash of its parameters) matches;
embed and export resume shard by shard on their own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from curate.config import RunOptions, config_from_table, recipe_keys
from curate.errors import CurateError
from curate.io.atomic import write_text_atomic
from curate.run.markers import Markers
from curate.stages.clones import ClonesConfig
from curate.stages.decontaminate import DecontaminateConfig
from curate.stages.dedup import DedupConfig
from curate.stages.embed import EmbedConfig
from curate.stages.export import ExportConfig
from curate.stages.filter import FilterConfig
from curate.stages.import_datacomp import ImportDatacompConfig
from curate.stages.normsim import SCHEDULE_OPTIONS, NormsimConfig
from curate.stages.report import ReportConfig
from curate.stages.score import ScoreConfig
from curate.stages.synth import SynthConfig
from curate.stages.truth import TruthConfig

REQUIRED = object()

# A section's keys: its inputs and outputs (paths, relative to [run] dir; REQUIRED or a default) written here,
# then every option of its stage's config (curate/config.py), generated: the same names, defaults and checks
# as the command line. [run] device is the default of every section's `device`.
SECTION_CONFIGS: dict[str, tuple[type, str | None]] = {
    "run": (RunOptions, None),
    # the same teacher default as `curate embed` (the paper's ViT-L-14/openai); "tiny-cached" names the
    # project's self-trained curate-tiny and "none" random weights, both only when written out
    "teacher": (EmbedConfig, "teacher"),
    "embed": (EmbedConfig, None),
    "embed_target": (EmbedConfig, None),
    "score": (ScoreConfig, None),
    "normsim": (NormsimConfig, None),
    "filter": (FilterConfig, None),
    "export": (ExportConfig, None),
    "synth": (SynthConfig, None),
    "import_datacomp": (ImportDatacompConfig, None),
    "clones": (ClonesConfig, None),
    "dedup": (DedupConfig, None),
    "decontaminate": (DecontaminateConfig, None),
    "truth": (TruthConfig, None),
    "report": (ReportConfig, None),
}
# section -> key -> (type(s), default) for the keys that are not options. Types are checked; unknown keys are
# errors naming the key.
SCHEMA: dict[str, dict[str, tuple[type | tuple, Any]]] = {
    "run": {"dir": (str, REQUIRED), "device": (str, "auto")},
    "synth": {"out": (str, "corpus")},
    "teacher": {},
    "embed": {"shards": (str, REQUIRED), "out": (str, "emb")},
    "embed_target": {"shards": (str, REQUIRED), "out": (str, "target_emb")},
    "import_datacomp": {"metadata": (str, REQUIRED), "out": (str, "emb")},
    "score": {"out": (str, "scores.parquet")},
    # p: a list here (one table per p); prefilter: a subset path or the name of a [[filter]], run first
    # require_decontamination: every [[filter]] that ranks by NormSim drops what [decontaminate] flags
    "normsim": {"target": (str, REQUIRED), "p": (list, ["inf"]), "out": (str, "normsim.parquet"),
                "prefilter": (str, ""), "require_decontamination": (bool, False)},
    "clones": {"out": (str, "clones.parquet")},
    "dedup": {"out": (str, "dedup.parquet")},
    # against: evaluation / target image embeddings (default: the [normsim] target, else [embed_target] out)
    "decontaminate": {"against": (list, []), "out": (str, "contaminated.parquet")},
    "filter": {"name": (str, REQUIRED)},
    "export": {"subset": (str, REQUIRED), "shards": (str, ""), "out": (str, "export")},
    "truth": {"subsets": (list, [])},
    "report": {"out": (str, "report.html")},
}
CHOICES = {("run", "device"): ("auto", "cpu", "cuda")}  # the non-option keys' choices (options check their own)
NAMED_TARGETS = ("imagenet-text", "none")  # [normsim]/[[filter]] targets that are names, not paths


@dataclass
class Step:
    name: str          # unique step name, e.g. "filter:negclip_then_normsim"
    section: str
    params: dict
    inputs: list[str]
    outputs: list[str]
    run: Callable[[], dict | None]

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.params, sort_keys=True).encode()).hexdigest()[:16]


def load_recipe(path: str | Path) -> dict:
    """Parse and validate a recipe; every problem is a CurateError naming the file, section and key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise CurateError(f"{path}: recipe file does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise CurateError(f"{path}: not valid TOML ({exc})") from None
    return validate_recipe(raw, path)


def validate_recipe(raw: dict, path: str | Path) -> dict:
    """A recipe given as a dict (what a TOML file parses to) validated as `load_recipe` validates a file: every
    problem is a CurateError naming `path` (what the messages call its source), the section and the key."""
    unknown = sorted(set(raw) - set(SCHEMA))
    if unknown:
        raise CurateError(f"{path}: unknown section [{unknown[0]}]; known: {', '.join(SCHEMA)}")
    if "run" not in raw:
        raise CurateError(f"{path}: missing [run] section (it needs at least `dir`)")
    recipe: dict[str, Any] = {"run": _validate(path, "run", raw["run"])}
    defaults = {"device": recipe["run"]["device"]}
    for section, value in raw.items():
        if section == "run":
            continue
        entries = value if section == "filter" else [value]
        if section == "filter" and not isinstance(value, list):
            raise CurateError(f"{path}: write filters as [[filter]] tables (a list), each with a `name`")
        recipe[section] = [_validate(path, section, e, defaults) for e in entries]
        if section != "filter":
            recipe[section] = recipe[section][0]
    names = [f["name"] for f in recipe.get("filter", [])]
    if len(set(names)) != len(names):
        raise CurateError(f"{path}: two [[filter]] tables share a name; names must be unique")
    targets = [("normsim", recipe.get("normsim", {}))] + [("filter", f) for f in recipe.get("filter", [])]
    for section, table in targets:
        if table.get("target") == "imagenet":
            from curate.io.targets import imagenet_help

            raise CurateError(imagenet_help(f'{path}: [{section}] target = "imagenet"', 'target = "in1k_emb"',
                                            'target = "imagenet-text"'))
    if "embed" in recipe and "import_datacomp" in recipe:
        raise CurateError(f"{path}: give either [embed] or [import_datacomp], not both")
    for ref in [recipe.get("export", {}).get("subset")] + list(recipe.get("truth", {}).get("subsets", [])):
        if ref and ref not in names:
            raise CurateError(f"{path}: subset {ref!r} is not the name of a [[filter]] (have: {', '.join(names) or 'none'})")
    if "normsim" in recipe:
        _check_normsim_2d(path, recipe, raw["normsim"])
    _check_decontamination(path, recipe)
    filters_before: list[str] = []
    for f in recipe.get("filter", []):
        for key in UID_LIST_KEYS:
            for ref in f[key]:
                if ref in names and ref not in filters_before:
                    raise CurateError(f"{path}: [[filter]] {f['name']!r} {key} names [[filter]] {ref!r}, which must "
                                      "come before it")
        filters_before.append(f["name"])
    return recipe


UID_LIST_KEYS = ("include_uids", "union", "exclude_uids")


def _check_decontamination(path: Path, recipe: dict) -> None:
    """[decontaminate] against defaults to the NormSim target (else the embedded target set); [normsim]
    require_decontamination sets every NormSim-ranking [[filter]]'s drop_contaminated to its table."""
    if "decontaminate" in recipe:
        d = recipe["decontaminate"]
        if not d["against"]:
            target = recipe.get("normsim", {}).get("target", "")
            d["against"] = [target] if target and target not in NAMED_TARGETS else \
                [recipe["embed_target"]["out"]] if "embed_target" in recipe else []
        if not d["against"]:
            raise CurateError(f"{path}: [decontaminate] needs `against` (evaluation image embeddings), or a "
                              "[normsim] target / [embed_target] to default to")
    n = recipe.get("normsim")
    if not n or not n["require_decontamination"]:
        return
    if "decontaminate" not in recipe:
        raise CurateError(f"{path}: [normsim] require_decontamination = true needs a [decontaminate] section "
                          "(never select toward a task with its own evaluation images in the subset)")
    if n["target"] not in recipe["decontaminate"]["against"]:
        raise CurateError(f"{path}: [normsim] require_decontamination = true: [decontaminate] against must "
                          f"include the NormSim target {n['target']!r}")
    table = recipe["decontaminate"]["out"]
    for f in recipe.get("filter", []):
        uses = [s.split(":")[0] for s in f["keep"] + f["min"] + f["max"]]
        if f["normsim"] or any(u.startswith("normsim_") for u in uses):
            if f["drop_contaminated"] and f["drop_contaminated"] != table:
                raise CurateError(f"{path}: [[filter]] {f['name']!r} drop_contaminated = {f['drop_contaminated']!r}, "
                                  f"but [normsim] require_decontamination = true asks for {table!r}")
            f["drop_contaminated"] = table


def _check_normsim_2d(path: Path, recipe: dict, raw: dict) -> None:
    """The 2d schedule keys: only with p = 2d (their ranges are the config's checks), then set to the schedule
    the run uses (the defaults filled in); a `prefilter` naming a [[filter]] runs it before NormSim, so it may
    only use the [score] table."""
    n = recipe["normsim"]
    if "2d" not in [str(p) for p in n["p"]]:
        given = [key for key in SCHEDULE_OPTIONS if key in raw]
        if given:
            raise CurateError(f"{path}: [normsim] {given[0]} sets NormSim_2-D's schedule; it needs \"2d\" in p")
        return
    schedule = NormsimConfig(**{key: n[key] for key in SCHEDULE_OPTIONS if key != "prefilter"}).schedule()
    n.update({key: getattr(schedule, key) for key in SCHEDULE_OPTIONS if key != "prefilter"})
    prefilter = prefilter_filter(recipe)
    if prefilter is not None:
        uses = [s.split(":")[0] for s in prefilter["keep"] + prefilter["min"] + prefilter["max"]]
        if prefilter["normsim"] or any(u.startswith("normsim_") for u in uses):
            raise CurateError(f"{path}: [normsim] prefilter = {prefilter['name']!r} runs before NormSim, so that "
                              "[[filter]] can only use the [score] metrics (clipscore, negclip)")


def prefilter_filter(recipe: dict) -> dict | None:
    """The [[filter]] that [normsim] prefilter names (it runs before NormSim_2-D), or None (a path, or none)."""
    name = recipe.get("normsim", {}).get("prefilter", "")
    return next((f for f in recipe.get("filter", []) if name and f["name"] == name), None)


def section_keys(section: str) -> list[str]:
    """Every key a section takes: its own (SCHEMA), then its stage config's options."""
    keys = list(SCHEMA[section])
    if section in SECTION_CONFIGS:
        keys += [k for k in recipe_keys(*SECTION_CONFIGS[section]) if k not in keys]
    return keys


def _validate(path: Path, section: str, table: Any, defaults: dict | None = None) -> dict:
    if not isinstance(table, dict):
        raise CurateError(f"{path}: [{section}] must be a table of keys")
    spec = SCHEMA[section]
    known = section_keys(section)
    for key in table:
        if key not in known:
            raise CurateError(f"{path}: [{section}] unknown key {key!r}; known: {', '.join(known)}")
    out = {}
    if section in SECTION_CONFIGS:  # the options: checked as the stage checks them, defaults filled in
        config, config_section = SECTION_CONFIGS[section]
        cfg = config_from_table(config, table, f"{path}: [{section}]", config_section, defaults)
        values = {name: getattr(cfg, name) for name in recipe_keys(config, config_section)}
        out.update({name: str(v) if isinstance(v, Path) else v for name, v in values.items()})  # TOML's strings
    for key, (types, default) in spec.items():
        if key in out:
            continue
        if key not in table:
            if default is REQUIRED:
                raise CurateError(f"{path}: [{section}] needs `{key}`")
            out[key] = default
            continue
        value = table[key]
        if isinstance(value, bool) != (types is bool) or not isinstance(value, types):
            want = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise CurateError(f"{path}: [{section}] {key} = {value!r} should be {want}")
        choices = CHOICES.get((section, key))
        if choices and value not in choices:
            raise CurateError(f"{path}: [{section}] {key} = {value!r}; choose one of {', '.join(choices)}")
        out[key] = value
    return out


def section_config(config: type, section: dict):
    """A stage's config from its validated recipe section (the section's inputs and outputs left out)."""
    return config(**{name: section[name] for name in recipe_keys(config)})


def run_options(run: dict) -> RunOptions:
    """The recipe's [run] executor settings as every stage's RunOptions."""
    return RunOptions(**{name: run[name] for name in recipe_keys(RunOptions)})


def executor_options(run: dict) -> dict:
    """The recipe's [run] executor settings without `tasks` (filter and export keep their own task counts), as
    keyword arguments of their RunOptions."""
    return {"executor": run["executor"], "workers": run["workers"], "retries": run["retries"],
            "ray_address": run["ray_address"] or None}


def require_reduced(result, step: str, tasks_key: str) -> dict:
    """A map/reduce stage's summary (as a dict), or an error when this Slurm rank's peers are not done (nothing
    to chain yet)."""
    if not isinstance(result, dict):
        result = dataclasses.asdict(result)
    if result["out"] is None:
        raise CurateError(f"{step}: {result[tasks_key]['missing']} map tasks of other ranks are still missing; "
                          "rerun when they are done")
    return result


def plan(recipe: dict) -> list[Step]:
    """The ordered steps of a validated recipe, with their resolved inputs and outputs."""
    run = recipe["run"]
    root = Path(run["dir"])
    at = lambda p: p if ("://" in p or Path(p).is_absolute() or p in NAMED_TARGETS) else str(root / p)  # noqa: E731
    teacher = recipe.get("teacher") or {k: o.default for k, o in recipe_keys(EmbedConfig, "teacher").items()}
    steps: list[Step] = []
    cache_dir = lambda section: at(section["cache_dir"]) if section["cache_dir"] else None  # noqa: E731

    def add(name, section, params, inputs, outputs, fn):
        steps.append(Step(name, section, {"section": params, "inputs": inputs}, inputs, outputs, fn))

    if "synth" in recipe:
        s = recipe["synth"]
        out = at(s["out"])

        def run_synth(bar=None, s=s, out=out):
            from curate.stages.synth import entry as synth

            return dataclasses.asdict(synth.run(out, section_config(SynthConfig, s), progress=bar))
        add("synth", "synth", s, [], [out], run_synth)

    pretrained = {"value": teacher["pretrained"]}

    def teacher_weights(bar=None) -> str:
        if pretrained["value"] == "tiny-cached":
            from curate.stages.teacher import TINY_TEACHER_TRAIN
            from curate.stages.teacher.tiny import ensure_tiny_teacher

            def on_log(entry: dict) -> None:  # training steps on the bar (the first run trains for minutes)
                if bar is not None:
                    bar.unit = "steps"
                    bar.set_total(TINY_TEACHER_TRAIN.steps)
                    bar(entry["step"] - bar.done)

            pretrained["value"] = str(ensure_tiny_teacher(on_log=on_log))
        return pretrained["value"]

    # what the embed steps' digests hold: a retrained cached teacher (its recipe changed) reruns them
    teacher_identity = dict(teacher)
    if teacher["pretrained"] == "tiny-cached":
        from curate.stages.teacher.tiny import tiny_teacher_path

        teacher_identity["weights"] = tiny_teacher_path().name
    needs_teacher = any(k in recipe for k in ("embed", "embed_target")) or \
        "imagenet-text" in [recipe.get("normsim", {}).get("target")] + [f["target"] for f in recipe.get("filter", [])]
    if needs_teacher:
        add("teacher", "teacher", teacher, [], [], lambda bar=None: {"pretrained": teacher_weights(bar)})

    for section in ("embed", "embed_target"):
        if section in recipe:
            e = recipe[section]
            shards, out = at(e["shards"]), at(e["out"])

            def run_embed(bar=None, e=e, shards=shards, out=out, section=section):
                from curate.stages.embed import entry

                options = {k: e[k] for k in recipe_keys(EmbedConfig)}
                config = EmbedConfig(**{**teacher, "pretrained": teacher_weights()}, **options)
                result = entry.run(shards, out, config, run_options(run), progress=bar)
                if result.failures:
                    raise CurateError(f"{section}: {len(result.failures)} task(s) failed; rerun to retry")
                return {k: getattr(result, k) for k in ("embedded", "skipped", "shards_total", "content_uids",
                                                        "seconds")}
            add(section, section, {**e, "teacher": teacher_identity}, [shards], [out], run_embed)

    emb = at(recipe.get("embed", recipe.get("import_datacomp", {"out": "emb"}))["out"])
    if "import_datacomp" in recipe:
        d = recipe["import_datacomp"]

        def run_import(bar=None, d=d):
            from curate.stages.import_datacomp import entry as import_datacomp

            return vars(import_datacomp.run(at(d["metadata"]), emb, section_config(ImportDatacompConfig, d),
                                            progress=bar))
        add("import_datacomp", "import_datacomp", d, [at(d["metadata"])], [emb], run_import)

    score_tables: list[str] = []
    if "score" in recipe:
        s = recipe["score"]
        out = at(s["out"])
        score_tables.append(out)

        def run_score(bar=None, s=s, out=out):
            from curate.stages.score import entry as score

            config = ScoreConfig(**{k: s[k] for k in recipe_keys(ScoreConfig)} | {"cache_dir": cache_dir(s)})
            return require_reduced(score.run(emb, out, config, run_options(run), progress=bar), "score",
                                   "negclip_tasks")
        add("score", "score", s, [emb], [out], run_score)

    if "dedup" in recipe:
        u = recipe["dedup"]
        out = at(u["out"])

        def run_dedup(bar=None, u=u, out=out):
            from curate.stages.dedup import entry as dedup

            config = section_config(DedupConfig, u)
            config = dataclasses.replace(config, scores=Path(at(str(u["scores"]))) if u["scores"] else None,
                                         cache_dir=cache_dir(u))
            return dataclasses.asdict(dedup.run(emb, out, config, run_options(run), progress=bar))
        add("dedup", "dedup", u, [emb] + ([at(u["scores"])] if u["scores"] else []), [out], run_dedup)

    if "decontaminate" in recipe:
        c = recipe["decontaminate"]
        out, against = at(c["out"]), [at(a) for a in c["against"]]

        def run_decontaminate(bar=None, c=c, out=out, against=against):
            from curate.stages.decontaminate import entry as decontaminate

            config = dataclasses.replace(section_config(DecontaminateConfig, c), cache_dir=cache_dir(c))
            return require_reduced(decontaminate.run(emb, against, out, config, run_options(run), progress=bar),
                                   "decontaminate", "tasks")
        add("decontaminate", "decontaminate", c, [emb] + against, [out], run_decontaminate)

    subsets: dict[str, str] = {}

    def add_filter(f: dict, tables: list[str]) -> None:
        out = at(f"subsets/{f['name']}")
        subsets[f["name"]] = out
        paths = {key: at(f[key]) if f[key] else None for key in ("drop_duplicates", "drop_contaminated")}
        paths.update({key: [subsets.get(ref, at(ref)) for ref in f[key]] for key in UID_LIST_KEYS})

        def run_filter(bar=None, f=f, out=out, tables=list(tables), paths=paths):
            from curate.stages.filter import entry

            options = {k: f[k] for k in recipe_keys(FilterConfig)}
            config = FilterConfig(**{**options, **paths, "normsim": f["normsim"] or None,
                                     "target": at(f["target"]) if f["target"] else None}, emb=Path(emb))
            # the run's executor settings make it the map-task filter, except with inline NormSim (in memory)
            opts = RunOptions() if f["normsim"] else RunOptions(**executor_options(run))
            result = entry.run(tables, out, config, opts)
            return {"kept": result.kept, "pool": result.pool}
        inputs = [p for key, p in paths.items() if key not in UID_LIST_KEYS and p] + \
            [p for key in UID_LIST_KEYS for p in paths[key]]
        add(f"filter:{f['name']}", "filter", f, list(tables) + inputs, [out], run_filter)

    prefilter = prefilter_filter(recipe)
    if prefilter is not None:  # NormSim_2-D starts from its subset: it runs on the [score] table first
        add_filter(prefilter, score_tables)

    if "normsim" in recipe:
        n = recipe["normsim"]
        options = {k: n[k] for k in recipe_keys(NormsimConfig) if k not in SCHEDULE_OPTIONS} | \
            {"cache_dir": cache_dir(n)}
        for p in n["p"]:
            out = at(n["out"]).replace(".parquet", f"_{p}.parquet") if len(n["p"]) > 1 else at(n["out"])
            score_tables.append(out)
            target = None if n["target"] == "none" else at(n["target"])
            schedule, params, inputs = {}, {key: n[key] for key in n if key not in SCHEDULE_OPTIONS}, []
            if str(p) == "2d":
                pre = "" if not n["prefilter"] else subsets.get(n["prefilter"], at(n["prefilter"]))
                schedule = {key: n[key] for key in SCHEDULE_OPTIONS if key != "prefilter"} | {"prefilter": pre or None}
                params.update({key: n[key] for key in SCHEDULE_OPTIONS})
                inputs = [pre] if pre else []

            def run_normsim(bar=None, p=str(p), out=out, target=target, schedule=schedule):
                from curate.stages.normsim import entry as normsim

                config = NormsimConfig(target=target, p=p, **options, **schedule)
                return require_reduced(normsim.run(emb, out, config, run_options(run), progress=bar),
                                       f"normsim {p}", "normsim_tasks")
            add(f"normsim:{p}", "normsim", {**params, "p": p}, [emb] + ([target] if target else []) + inputs, [out],
                run_normsim)

    if "clones" in recipe:
        c = recipe["clones"]
        out = at(c["out"])

        def run_clones(bar=None, c=c, out=out):
            from curate.stages.clones import entry as clones

            return clones.run(emb, out, section_config(ClonesConfig, c)).metadata()
        add("clones", "clones", c, [emb], [out], run_clones)

    for f in recipe.get("filter", []):
        if f is not prefilter:
            add_filter(f, score_tables)

    if "truth" in recipe:
        names = recipe["truth"]["subsets"] or list(subsets)
        out = at("truth.json")

        def run_truth(bar=None, names=names, out=out):
            from curate.stages import truth

            result = truth.run(emb, {n: subsets[n] for n in names}, out, section_config(TruthConfig, recipe["truth"]))
            return {"truth": result.table}
        add("truth", "truth", recipe["truth"], [subsets[n] for n in names], [out], run_truth)

    if "export" in recipe:
        x = recipe["export"]
        shards = at(x["shards"]) if x["shards"] else at(recipe.get("embed", {}).get("shards", ""))
        out = at(x["out"])

        def run_export(bar=None, x=x, shards=shards, out=out):
            from curate.stages.export import entry

            config = ExportConfig(**{k: x[k] for k in recipe_keys(ExportConfig)})
            report = entry.run(shards, subsets[x["subset"]], out, config, RunOptions(**executor_options(run)),
                               progress=bar)
            return {k: v for k, v in vars(report).items() if isinstance(v, (int, float, str))}
        add("export", "export", x, [shards, subsets[x["subset"]]], [out], run_export)

    if "report" in recipe:
        out = at(recipe["report"]["out"])

        def run_report(bar=None, out=out):
            from curate.stages.report import entry as report

            return {"report": report.run(str(root), out, section_config(ReportConfig, recipe["report"])).out}
        add("report", "report", recipe["report"], [str(root)], [out], run_report)
    # a change anywhere upstream reruns everything after it: chain each step's digest into the next
    upstream = ""
    for step in steps:
        step.params["upstream"] = upstream
        upstream = step.digest
    return steps


def step_status(step: Step, markers: Markers) -> str:
    if markers.is_done(_marker_name(step)) and markers.info(_marker_name(step)).get("digest") == step.digest \
            and all(Path(o).exists() for o in step.outputs):
        return "done"
    if step.section == "teacher":
        pretrained = step.params["section"]["pretrained"]
        if pretrained == "tiny-cached":
            from curate.stages.teacher.tiny import tiny_teacher_path

            return "cached" if tiny_teacher_path().is_file() else "todo (trains curate-tiny once, ~3 min)"
        return "loads " + pretrained
    if step.section in ("embed", "embed_target"):
        try:
            from curate.io.shards import expand_shards

            total = len(expand_shards(step.inputs[0]))
        except CurateError:
            return "todo (shards not there yet)"
        done = len(Markers(step.outputs[0], "embed").done()) if Path(step.outputs[0]).exists() else 0
        return f"todo ({done} of {total} shards done)"
    return "todo"


def _marker_name(step: Step) -> str:
    return step.name.replace(":", "--")


def execute(recipe: dict, echo: Callable[[str], None] = print, force: bool = False,
            progress: Callable[[str], Any] | None = None) -> list[dict]:
    """Run every step not already done; returns one record per step. `progress(label)`: a context manager
    giving the progress bar (curate.ui.StageProgress) a step reports to."""
    root = Path(recipe["run"]["dir"])
    root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(root / "run.json", json.dumps(recipe, indent=2, sort_keys=True))
    markers = Markers(root, "run")
    records = []
    steps = plan(recipe)
    for number, step in enumerate(steps, 1):
        where = f"[{number}/{len(steps)}]"
        status = step_status(step, markers)
        if not force and step.section != "teacher" and status == "done":
            echo(f"{where} [dim]skip[/] {step.name}: done")
            records.append({"step": step.name, "status": "skipped (done)"})
            continue
        echo(f"{where} [bold]run[/] {step.name} → {', '.join(step.outputs) or '-'}"
             + (f" ({status})" if status.startswith(("todo (", "loads", "cached")) else ""))
        started = time.perf_counter()
        with (progress(step.name) if progress else contextlib.nullcontext()) as bar:
            result = step.run(bar) or {}
        seconds = time.perf_counter() - started
        markers.mark(_marker_name(step), {"digest": step.digest, "seconds": round(seconds, 3)})
        records.append({"step": step.name, "status": "done", "seconds": seconds, "result": result})
    return records
