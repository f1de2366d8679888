"""`curate run`: recipe validation errors name the key; a small recipe runs end to end and reruns skip."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from curate.errors import CurateError
from curate.io.uids import read_uid_npy
from curate.recipe import execute, load_recipe, plan

REPO = Path(__file__).resolve().parents[1]
BASE = """
[run]
dir = "{dir}"
device = "cpu"
"""


def write(tmp_path, text):
    path = tmp_path / "r.toml"
    path.write_text(BASE.format(dir=tmp_path / "out") + text)
    return path


@pytest.mark.parametrize("text, message", [
    ("[scoer]\n", r"unknown section \[scoer\]"),
    ("[score]\nkk = 3\n", r"\[score\] unknown key 'kk'"),
    ("[score]\nk = 'ten'\n", r"\[score\] k = 'ten' should be int"),
    ("[score]\nk = 0\n", r"\[score\] k = 0 must be >= 1"),
    ("[teacher]\nprecision = 'fp8'\n", r"precision = 'fp8'; choose one of fp32, fp16, bf16"),
    ("[embed]\nout = 'x'\n", r"\[embed\] needs `shards`"),
    ("[[filter]]\nname = 'a'\n[[filter]]\nname = 'a'\n", "share a name"),
    ("[[filter]]\nname = 'a'\n[export]\nsubset = 'b'\n", "subset 'b' is not the name of a"),
    ("[filter]\nname = 'a'\n", r"\[\[filter\]\]"),
    ("[score\n", "not valid TOML"),
    ("[normsim]\ntarget = 't'\niterations = 5\n", r"\[normsim\] iterations sets NormSim_2-D's schedule; it needs "
                                                 r"\"2d\" in p"),
    ("[normsim]\ntarget = 'none'\np = ['2d']\niterations = 0\n", r"\[normsim\] iterations = 0 must be an integer "
                                                                  r"from 1 to 10000"),
    ("[normsim]\ntarget = 'none'\np = ['2d']\nsubsample = 0\n", r"\[normsim\] subsample = 0 must be in \(0, 1\]"),
    ("[normsim]\ntarget = 'none'\np = ['2d']\nfinal_fraction = 1.5\n", r"\[normsim\] final_fraction = 1.5 must be in"),
    ("[normsim]\ntarget = 'none'\np = ['2d']\nseed = -2\n", r"\[normsim\] seed = -2 must be an integer from 0"),
    ("[normsim]\ntarget = 'none'\np = ['2d']\nprefilter = 'pre'\n[[filter]]\nname = 'pre'\n"
     "keep = ['normsim_2d:0.5']\n", r"prefilter = 'pre' runs before NormSim, so that \[\[filter\]\] can only use"),
    ("[normsim]\ntarget = 't'\nrequire_decontamination = true\n", r"needs a \[decontaminate\] section"),
    ("[normsim]\ntarget = 't'\nrequire_decontamination = true\n[decontaminate]\nagainst = ['u']\n",
     r"against must include the NormSim target 't'"),
    ("[decontaminate]\n", r"\[decontaminate\] needs `against`"),
    ("[[filter]]\nname = 'a'\nunion = ['b']\n[[filter]]\nname = 'b'\n", r"union names \[\[filter\]\] 'b', which "
                                                                         "must come before it"),
])
def test_validation_errors_name_the_key(tmp_path, text, message):
    with pytest.raises(CurateError, match=message):
        load_recipe(write(tmp_path, text))


def test_missing_file_and_run_section(tmp_path):
    with pytest.raises(CurateError, match="does not exist"):
        load_recipe(tmp_path / "nope.toml")
    (tmp_path / "x.toml").write_text("[score]\n")
    with pytest.raises(CurateError, match=r"missing \[run\]"):
        load_recipe(tmp_path / "x.toml")


def test_shipped_recipes_validate():
    for path in sorted((REPO / "examples" / "recipes").glob("*.toml")):
        steps = plan(load_recipe(path))
        assert steps, path


SMALL = """
[synth]
samples = 120
shard_size = 40
seed = 5
corrupt = 0.3
target_samples = 30
[teacher]
model = "curate-tiny"  # random weights of the small model: the paper's ViT-L-14 would take minutes on CPU
pretrained = "none"
[embed]
shards = "corpus"
batch_size = 32
workers = 0
[embed_target]
shards = "corpus/target"
workers = 0
[score]
batch_size = 16
k = 2
[normsim]
target = "target_emb"
p = ["inf", "2"]
[[filter]]
name = "both"
keep = ["negclip:0.5", "normsim_inf:0.25"]
[truth]
[export]
subset = "both"
shard_size = 10
"""


BEYOND_PAIRS = SMALL.replace("""[normsim]
target = "target_emb"
p = ["inf", "2"]
[[filter]]""", """[normsim]
target = "target_emb"
p = ["inf", "2"]
require_decontamination = true
[dedup]
clusters = 2
eps = [0.0001]  # a random-weight teacher embeds every picture alike: only the corpus's exact duplicates
[decontaminate]
threshold = 0.9999
[[filter]]
name = "scored"
keep = ["negclip:0.5"]
drop_duplicates = "dedup.parquet"
[[filter]]""").replace("""[truth]""", """[[filter]]
name = "combined"
keep = ["clipscore:0.1"]
union = ["scored"]
exclude_uids = ["subsets/both"]
[truth]""")


def test_a_recipe_runs_with_dedup_decontamination_and_uid_lists_and_a_rerun_skips(tmp_path):
    recipe = load_recipe(write(tmp_path, BEYOND_PAIRS))
    assert recipe["decontaminate"]["against"] == ["target_emb"]  # the NormSim target by default
    assert recipe["filter"][1]["drop_contaminated"] == "contaminated.parquet"  # it ranks by NormSim
    assert recipe["filter"][0]["drop_contaminated"] is None
    records = execute(recipe, echo=lambda s: None)
    assert all(r["status"] == "done" for r in records), records
    out = tmp_path / "out"
    truth = json.loads((out / "truth.json").read_text())
    assert truth["both"]["kept"] == 30 and truth["both"]["pool"] == 120  # 0.25 * 120
    assert len(list((out / "export").glob("*.tar"))) == 3
    steps = {name: json.loads((out / "subsets" / name / "stats.json").read_text())["steps"]
             for name in ("scored", "both", "combined")}
    assert steps["scored"][0]["step"] == "drop_duplicates"
    assert steps["both"][0]["step"] == "drop_contaminated"
    assert [s["step"] for s in steps["combined"]] == ["keep", "union", "exclude_uids"]
    scored, both, combined = (set(read_uid_npy(out / "subsets" / n / "uids.npy")) for n in ("scored", "both",
                                                                                             "combined"))
    assert scored <= combined | both and not combined & both
    assert steps["combined"][1]["listed"] == len(scored) and steps["combined"][1]["not_in_pool"] == 0
    assert steps["combined"][2]["listed"] == len(both)
    again = execute(recipe, echo=lambda s: None)
    assert [r["status"] for r in again if r["step"] != "teacher"] == ["skipped (done)"] * (len(again) - 1)


def test_cli_dry_run_and_error_exit(tmp_path):
    path = write(tmp_path, SMALL)
    cli = [sys.executable, "-m", "curate.cli"]
    dry = subprocess.run(cli + ["run", str(path), "--dry-run"], capture_output=True, text=True)
    assert dry.returncode == 0 and "filter:both" in dry.stdout and "todo" in dry.stdout
    bad = write(tmp_path, "[score]\nkk = 1\n")
    res = subprocess.run(cli + ["run", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown key 'kk'" in res.stderr and "Traceback" not in res.stderr


def test_the_run_executor_settings_reach_the_filter_unless_it_computes_normsim_inline(tmp_path, monkeypatch):
    """[run] workers / executor make the recipe's filter the map-task filter (same outputs, bounded memory);
    a filter with inline NormSim stays in memory, which the map-task filter refuses."""
    from curate.config import RunOptions
    from curate.stages.filter import FilterResult, entry

    calls = []

    def fake_filter(tables, out, cfg, opts):
        calls.append((cfg, opts))
        return FilterResult(pool=10, kept=5, mode="sequential", steps=[], out_dir="")

    monkeypatch.setattr(entry, "run", fake_filter)
    text = "workers = 2\nretries = 3\n" + SMALL + """
[[filter]]
name = "inline"
keep = ["negclip:0.5"]
normsim = "inf"
target = "target_emb"
"""
    steps = {s.name: s for s in plan(load_recipe(write(tmp_path, text)))}
    steps["filter:both"].run()
    steps["filter:inline"].run()
    assert calls[0][1] == RunOptions(executor="local", workers=2, retries=3, ray_address=None)
    assert calls[1][1] == RunOptions()
    assert [cfg.fraction_rule for cfg, _ in calls] == ["exact", "exact"]
    assert (calls[1][0].normsim, calls[1][0].target) == ("inf", str(tmp_path / "out" / "target_emb"))
    assert steps["filter:both"].run() == {"kept": 5, "pool": 10}  # recorded as the result's own fields


def test_the_run_executor_settings_reach_the_export(tmp_path, monkeypatch):
    from curate.config import RunOptions
    from curate.stages.export import ExportConfig, ExportReport, entry

    calls = []
    monkeypatch.setattr(entry, "run", lambda *args, **kwargs: calls.append((args[3:], kwargs)) or ExportReport())
    text = "executor = \"ray\"\nray_address = \"auto\"\n" + SMALL
    steps = {s.name: s for s in plan(load_recipe(write(tmp_path, text)))}
    steps["export"].run()
    run_options = RunOptions(executor="ray", workers=1, retries=1, ray_address="auto")
    assert calls == [((ExportConfig(shard_size=10), run_options), {"progress": None})]


PREFILTERED = """
[normsim]
target = "none"
p = ["2d"]
iterations = 7
final_fraction = 0.2
seed = 3
prefilter = "clipscore_50"
[[filter]]
name = "final"
keep = ["normsim_2d:0.2"]
[[filter]]
name = "clipscore_50"
keep = ["clipscore:0.5"]
"""


def test_a_normsim_2d_prefilter_names_a_filter_that_runs_first(tmp_path, monkeypatch):
    """The reference's recipe in one file: the pre-filter's [[filter]] runs on the [score] table before NormSim_2-D,
    which gets its subset and the schedule keys; the other filters run after, on both tables."""
    from curate.stages.filter import FilterResult, entry
    from curate.stages.normsim import entry as normsim_entry

    calls = []
    monkeypatch.setattr(entry, "run", lambda tables, out, *a, **k: calls.append(("filter", tables, out))
                        or FilterResult(pool=10, kept=5, mode="sequential", steps=[], out_dir=str(out)))
    monkeypatch.setattr(normsim_entry, "run", lambda emb, out, cfg, opts, progress: calls.append(("normsim", cfg))
                        or {"out": "x"})
    steps = plan(load_recipe(write(tmp_path, "[score]\n" + PREFILTERED)))
    assert [s.name for s in steps] == ["score", "filter:clipscore_50", "normsim:2d", "filter:final"]
    for step in steps[1:]:
        step.run()
    out = tmp_path / "out"
    assert calls[0] == ("filter", [str(out / "scores.parquet")], str(out / "subsets" / "clipscore_50"))
    options = calls[1][1]
    assert {k: getattr(options, k) for k in ("iterations", "final_fraction", "subsample", "seed", "prefilter")} == {
        "iterations": 7, "final_fraction": 0.2, "subsample": 0.1, "seed": 3,
        "prefilter": str(out / "subsets" / "clipscore_50")}
    assert calls[2] == ("filter", [str(out / "scores.parquet"), str(out / "normsim.parquet")],
                        str(out / "subsets" / "final"))
    assert str(out / "subsets" / "clipscore_50") in steps[2].inputs


def test_normsim_2d_recipe_defaults_are_the_cli_defaults(tmp_path):
    from curate.stages.normsim import NormsimConfig

    recipe = load_recipe(write(tmp_path, "[normsim]\ntarget = 'none'\np = ['2d']\n"))
    defaults = NormsimConfig(p="2d").schedule()
    assert [recipe["normsim"][k] for k in ("iterations", "final_fraction", "subsample", "seed")] == [
        defaults.iterations, defaults.final_fraction, defaults.subsample, defaults.seed] == [100, 0.3, 0.1, 0]
    step = plan(recipe)[0]
    assert step.params["section"]["prefilter"] == "" and step.inputs == [str(tmp_path / "out" / "emb")]
    other = plan(load_recipe(write(tmp_path, "[normsim]\ntarget = 't'\n")))[0]
    assert "iterations" not in other.params["section"]  # p = inf: the same digest as before these keys
