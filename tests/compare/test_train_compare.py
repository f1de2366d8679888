"""Student training (`curate train`), student eval, and `curate compare`.

Everything runs on tiny synth corpora with a randomly initialised teacher checkpoint, so that the whole file
stays fast; the numbers of a real comparison are in docs (measured with `curate compare`). The one exception is
the oracle control: students trained on the ground truth's subset must beat random ones on the target task.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
import sys

import numpy as np
import pytest
import torch

from curate.errors import CurateError
from curate.io.shards import expand_shards, iter_shard
from curate.io.uids import read_uid_npy, write_uid_npy
from curate.compare import LOSS_ROWS, METHOD_LABELS, METHODS, ROWS, CompareConfig
from curate.compare import entry as compare
from curate.compare import tables
from curate.stages.synth import TRUTH_KINDS
from conftest import synth_corpus
from curate.stages.train_student import StudentConfig
from curate.stages.train_student.entry import run as train_run
from curate.stages.train_student.evaluation import evaluate_student, load_student, zero_shot_accuracy

FAST = dict(steps=3, batch_size=16, threads=1, device="cpu", log_every=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synth_corpus(root / "pool", samples=160, shard_size=80, seed=21, corrupt=0.5, target_samples=24)
    synth_corpus(root / "heldout", samples=40, shard_size=40, seed=22, corrupt=0.0, target_samples=24)
    return root


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory):
    """A randomly initialised curate-student saved as a teacher checkpoint (fast to embed with)."""
    from curate.models.teacher import create_model, model_config, save_checkpoint

    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_checkpoint(create_model("curate-student"), path, "curate-student", model_config("curate-student"))
    return path


def corpus_truth(shards) -> dict[str, str]:
    """uid -> truth, read straight from the shards' .json members (independent of the pipeline)."""
    truth = {}
    for url in expand_shards(str(shards)):
        for raw in iter_shard(url, lambda key, reason: None):
            doc = json.loads(raw.members["json"])
            truth[doc["uid"]] = doc["truth"]
    return truth


# ---------------------------------------------------------------- training

@pytest.mark.parametrize("loss", ["infonce", "adacl", "pcme"])
def test_training_is_deterministic_for_a_seed(corpus, tmp_path, loss):
    config = StudentConfig(loss=loss, seed=3, **FAST)
    first = train_run(str(corpus / "pool"), tmp_path / "a", config)
    second = train_run(str(corpus / "pool"), tmp_path / "b", config)
    a = torch.load(tmp_path / "a" / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "student.pt", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name in a["state_dict"]:
        assert torch.equal(a["state_dict"][name], b["state_dict"][name]), name
    assert first.history == second.history
    assert [h["step"] for h in first.history] == [1, 2, 3]
    # another seed gives another model
    other = train_run(str(corpus / "pool"), tmp_path / "c", StudentConfig(loss=loss, seed=4, **FAST))
    assert other.history != first.history
    assert (tmp_path / "a" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if loss == "pcme":
        assert "pcme_heads" in a["curate"] and "pcme_a" in first.history[-1]
    if loss == "adacl":
        assert "adacl_m1" in first.history[-1] and "adacl_m1_t2i" in first.history[-1]


def test_adacl_training_logs_finite_margins_every_step_and_the_loss_decreases(corpus, tmp_path):
    # 16 steps: on the curate-synth/2 world the 32-px student halves its loss after 13 steps (12 were enough before)
    config = StudentConfig(loss="adacl", seed=5, **{**FAST, "steps": 16})
    record = train_run(str(corpus / "pool"), tmp_path / "adacl", config)
    history = record.history
    assert [h["step"] for h in history] == list(range(1, 17))
    for h in history:
        for key in ("adacl_m1", "adacl_m2", "adacl_m1_t2i", "adacl_m2_t2i", "loss"):
            assert math.isfinite(h[key]), (h["step"], key)
        assert h["adacl_m1"] > 0 and h["adacl_m1_t2i"] > 0
        # a step either updated its margins from an anchor below 1 - ε or says why it kept them
        assert h["adacl_kept"] is None and h["adacl_p_hat_u"] < 0.9 or isinstance(h["adacl_kept"], str)
    # the first step starts from plain InfoNCE (m1 = 1/τ, m2 = 0) and tunes away from it
    assert history[0]["adacl_m1"] != pytest.approx(history[0]["logit_scale"], rel=1e-3)
    first, last = statistics.mean(h["loss"] for h in history[:3]), statistics.mean(h["loss"] for h in history[-3:])
    assert last < 0.5 * first


def test_budget_is_logged_and_independent_of_subset_size(corpus, tmp_path):
    truth = corpus_truth(corpus / "pool")
    uids = sorted(truth)
    write_uid_npy(uids[:40], tmp_path / "small" / "uids.npy")
    write_uid_npy(uids[:120], tmp_path / "large" / "uids.npy")
    records = []
    for name in ("small", "large"):
        train_run(str(tmp_path / name), tmp_path / f"student-{name}", StudentConfig(**FAST),
                      corpus=str(corpus / "pool"))
        records.append(json.loads((tmp_path / f"student-{name}" / "train.json").read_text()))
    small, large = (r["budget"] for r in records)
    assert small["train_pairs"] == 40 and large["train_pairs"] == 120
    assert small["samples_seen"] == large["samples_seen"] == 3 * 16
    # the pairs trained on are exactly the subset's, with their ground truth
    assert sum(records[0]["data"]["truth_counts"].values()) == 40
    expected = {}
    for u in uids[:40]:
        expected[truth[u]] = expected.get(truth[u], 0) + 1
    assert records[0]["data"]["truth_counts"] == expected


def test_check_budgets_refuses_unequal_runs():
    run = lambda method, steps, batch: {"method": method, "seed": 0, "budget": {  # noqa: E731
        "steps": steps, "batch_size": batch, "samples_seen": steps * batch}}
    assert tables.check_budgets([run("random", 10, 8), run("negclip", 10, 8)])["samples_seen"] == 80
    with pytest.raises(CurateError, match="different budgets"):
        tables.check_budgets([run("random", 10, 8), run("negclip", 20, 4), run("clipscore", 10, 16)])
    lying = run("random", 10, 8)
    lying["budget"]["samples_seen"] = 81
    with pytest.raises(CurateError, match="steps x batch size"):
        tables.check_budgets([lying])


def test_train_input_errors(corpus, tmp_path):
    uids = sorted(corpus_truth(corpus / "pool"))
    write_uid_npy(uids[:8], tmp_path / "tiny" / "uids.npy")
    with pytest.raises(CurateError, match="fewer than --batch-size 16"):
        train_run(str(tmp_path / "tiny"), tmp_path / "s", StudentConfig(**FAST), corpus=str(corpus / "pool"))
    with pytest.raises(CurateError, match="--corpus"):
        train_run(str(tmp_path / "tiny"), tmp_path / "s", StudentConfig(**FAST))
    write_uid_npy(uids[:20] + ["f" * 32], tmp_path / "foreign" / "uids.npy")
    with pytest.raises(CurateError, match="1 of the subset's 21 uids"):
        train_run(str(tmp_path / "foreign"), tmp_path / "s", StudentConfig(**FAST), corpus=str(corpus / "pool"))
    with pytest.raises(CurateError, match="--loss"):
        train_run(str(corpus / "pool"), tmp_path / "s", StudentConfig(**{**FAST, "loss": "hinge"}))


def test_cli_train_error_is_one_line(corpus, tmp_path, monkeypatch, capsys):
    from curate import cli

    write_uid_npy(sorted(corpus_truth(corpus / "pool"))[:20], tmp_path / "sub" / "uids.npy")
    monkeypatch.setattr(sys, "argv", ["curate", "train", str(tmp_path / "sub"), "--out", str(tmp_path / "s")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--corpus" in err and "Traceback" not in err


# ---------------------------------------------------------------- evaluation

def test_zero_shot_accuracy_matches_a_loop():
    rng = np.random.default_rng(0)
    n_classes, n_templates, dim, n = 4, 3, 5, 30
    images = rng.standard_normal((n, dim))
    prompts = rng.standard_normal((n_classes * n_templates, dim))
    prompts /= np.linalg.norm(prompts, axis=1, keepdims=True)
    labels = rng.integers(0, n_classes, n)
    correct = 0
    for i in range(n):
        best, best_score = -1, -math.inf
        for c in range(n_classes):
            mean = [sum(prompts[c * n_templates + t][d] for t in range(n_templates)) / n_templates for d in range(dim)]
            norm = math.sqrt(sum(x * x for x in mean))
            score = sum(images[i][d] * mean[d] / norm for d in range(dim))
            if score > best_score:
                best, best_score = c, score
        correct += best == labels[i]
    assert zero_shot_accuracy(images, labels, prompts, n_classes)["top1"] == pytest.approx(100.0 * correct / n)


def test_zero_shot_hand_case():
    # two classes along the axes, one template each; images 1 and 2 point at class 0, image 3 at class 1
    prompts = np.array([[1.0, 0.0], [0.0, 1.0]])
    images = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    result = zero_shot_accuracy(images, np.array([0, 1, 1]), prompts, 2)
    assert result["top1"] == pytest.approx(200.0 / 3)  # image 2 (label 1) is misclassified
    assert result["per_class_top1"] == [100.0, 50.0]


def test_evaluate_student_from_checkpoint(corpus, tmp_path):
    train_run(str(corpus / "pool"), tmp_path / "s", StudentConfig(loss="pcme", **FAST))
    model, heads, meta = load_student(tmp_path / "s" / "student.pt")
    assert heads is not None and meta["budget"]["samples_seen"] == 48
    result = evaluate_student(tmp_path / "s" / "student.pt", str(corpus / "heldout"), str(corpus / "heldout" / "target"))
    assert result["embedding"] == "pcme_mean"
    assert result["zero_shot"]["n"] == 24 and 0.0 <= result["zero_shot"]["top1"] <= 100.0
    assert result["retrieval"]["n_images"] == 40
    assert result["retrieval"]["r1_mean"] == pytest.approx(
        0.5 * (result["retrieval"]["i2t"]["R@1"] + result["retrieval"]["t2i"]["R@1"]))
    assert "pmrp_mean" in result["retrieval"]  # the synth labels give PMRP


# ---------------------------------------------------------------- compare: pure pieces

def test_removal_rates_from_truth():
    truth = ["clean", "clean", "swapped", "swapped", "generic", "clean", "swapped", "noise_image"]
    kept = np.array([1, 1, 0, 1, 0, 0, 0, 1], dtype=bool)
    result = tables.removal_and_composition(truth, kept)
    assert result["kinds"]["swapped"] == {"pool": 3, "kept": 1, "removed_rate": pytest.approx(2 / 3),
                                         "kept_rate": pytest.approx(1 / 3)}
    assert result["kinds"]["generic"]["removed_rate"] == 1.0
    assert result["kinds"]["noise_image"]["removed_rate"] == 0.0
    assert result["kinds"]["clean"]["removed_rate"] == pytest.approx(1 / 3)
    assert result["clean_share"] == pytest.approx(2 / 4) and result["kept"] == 4
    assert result["mismatched_share"] == pytest.approx(2 / 4)  # one swapped, one noise_image among 4 kept


def test_removal_rates_match_a_loop_on_random_input():
    rng = np.random.default_rng(5)
    kinds = TRUTH_KINDS
    truth = [kinds[i] for i in rng.integers(0, len(kinds), 300)]
    kept = rng.random(300) < 0.3
    result = tables.removal_and_composition(truth, kept)
    for kind in kinds:
        in_pool = kept_count = 0
        for t, k in zip(truth, kept):
            if t == kind:
                in_pool += 1
                kept_count += bool(k)
        assert result["kinds"][kind]["removed_rate"] == pytest.approx(1 - kept_count / in_pool)


def test_subset_size_counts_like_filter():
    assert tables.subset_size(0.3, 1000) == 300
    assert tables.subset_size(0.07, 100) == 7  # the decimal as written, not float arithmetic (8)
    assert tables.subset_size(0.3, 7) == 3
    assert tables.prefilter_fraction(0.3, 1.5) == "0.45"
    assert tables.prefilter_fraction(0.8, 1.5) == "1"


# ---------------------------------------------------------------- compare: a whole quick run

@pytest.fixture(scope="module")
def compared(corpus, random_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    config = CompareConfig(fraction=0.3, seeds=2, quick=True, steps=2, batch_size=16, heldout_samples=40,
                           heldout_target_samples=24, model="curate-student", teacher=str(random_teacher),
                           jobs=1, device="cpu", pcme_steps=5, loss_rows=True)
    messages: list[str] = []
    doc = compare.run(corpus / "pool", out, config, log=messages.append)
    return out, doc, config, messages


def test_compare_runs_every_method_and_seed_with_one_budget(compared):
    out, doc, _, _ = compared
    assert {(r["method"], r["seed"]) for r in doc.runs} == {(m, s) for m in ROWS for s in (0, 1)}
    # the budget of each run, read back from its own training log, is the same everywhere
    budgets = set()
    for run in doc.runs:
        logged = json.loads((out / "runs" / run["method"] / f"seed{run['seed']}" / "train.json").read_text())
        budgets.add(logged["budget"]["samples_seen"])
        assert logged["budget"] == run["budget"]
    assert budgets == {2 * 16} and doc.budget["samples_seen"] == 32
    # every subset has the same size, except no_filter (the whole pool)
    sizes = {m: len(read_uid_npy(out / "subsets" / (m if m != "random" else "random-seed0") / "uids.npy"))
             for m in METHODS}
    assert sizes.pop("no_filter") == 160
    assert set(sizes.values()) == {48}
    pairs = {r["method"]: json.loads((out / "runs" / r["method"] / "seed0" / "train.json").read_text())["budget"]
             ["train_pairs"] for r in doc.runs if r["seed"] == 0}
    assert pairs["no_filter"] == 160 and pairs["negclip"] == 48
    # the loss rows train on the best filtered subset with their loss
    assert doc.best in METHODS[3:]
    best_zero_shot = doc.summary[doc.best]["zero_shot"]["mean"]
    assert all(doc.summary[m]["zero_shot"]["mean"] <= best_zero_shot for m in METHODS[3:])
    for row, loss in LOSS_ROWS.items():
        logged = json.loads((out / "runs" / row / "seed0" / "train.json").read_text())
        assert logged["config"]["loss"] == loss and logged["data"]["pairs"] == 48
        assert doc.methods[row]["recipe"] == {"subset": doc.best, "loss": loss}


def test_compare_json_schema(compared):
    out, doc, _, _ = compared
    stored = json.loads((out / "compare.json").read_text())
    for row in ROWS:
        for metric in ("zero_shot", "retrieval_r1", "headroom"):
            assert set(stored["summary"][row][metric]) == {"mean", "std", "ci95", "n"}, (row, metric)
        assert stored["summary"][row]["zero_shot"]["n"] == 2
    assert set(stored["clones"]) >= {"precision", "recall", "f1"}
    assert set(stored["pcme"]) >= {"spearman_uncertainty_specificity", "auc_partial_mismatch"}
    assert set(stored["dedup"]) >= {"precision", "recall", "f1"} and "recall" in stored["decontamination"]
    kinds = [k for k in TRUTH_KINDS[1:] if stored["corpus"]["truth_counts"][k]]
    for score in ("clipscore", "negclip", "normsim_inf", "normsim_2", "normsim_2d", "clone_free", "p_match",
                  "pcme_certainty"):
        assert set(stored["signals"][score]) == set(kinds), score
        assert all(v is None or 0.0 <= v <= 1.0 for v in stored["signals"][score].values())


def test_compare_table_comes_from_the_runs(compared):
    out, doc, _, _ = compared
    stored = json.loads((out / "compare.json").read_text())
    md = (out / "compare.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in md.splitlines() if line.startswith("| ") and " ± " in line}
    assert len(rows) == len(ROWS)
    for method in ROWS:
        zs = [r["zero_shot_top1"] for r in stored["runs"] if r["method"] == method]
        r1 = [r["retrieval_r1"] for r in stored["runs"] if r["method"] == method]
        row = rows[METHOD_LABELS[method]]
        assert row[1] == f"{statistics.mean(zs):.1f} ± {statistics.stdev(zs):.1f}"
        assert row[3] == f"{statistics.mean(r1):.1f} ± {statistics.stdev(r1):.1f}"
        # and each run's number is the one its eval.json holds
        for run in (r for r in stored["runs"] if r["method"] == method):
            ev = json.loads((out / "runs" / method / f"seed{run['seed']}" / "eval.json").read_text())
            assert run["zero_shot_top1"] == ev["zero_shot"]["top1"]
            assert run["retrieval_r1"] == ev["retrieval"]["r1_mean"]
    assert "Measured" in md and str(stored["budget"]["samples_seen"]) in md
    assert "Signal quality" in md and "| clipscore |" in md and "Detection against the ground truth" in md


def test_compare_removal_rates_match_the_ground_truth(compared, corpus):
    out, doc, _, _ = compared
    truth = corpus_truth(corpus / "pool")
    for method in METHODS:
        if method == "random":
            continue
        kept = set(read_uid_npy(out / "subsets" / method / "uids.npy"))
        for kind in set(truth.values()):
            members = [u for u, t in truth.items() if t == kind]
            expected = 1.0 - sum(u in kept for u in members) / len(members)
            assert doc.methods[method]["removal"]["kinds"][kind]["removed_rate"] == pytest.approx(expected), \
                (method, kind)
    # the oracle keeps no mismatched pair and no planted evaluation image
    for kind in ("swapped", "generic", "noise_image", "partial_mismatch", "planted"):
        assert doc.methods["oracle"]["removal"]["kinds"][kind]["removed_rate"] == 1.0, kind
    # random: the mean over its per-seed subsets
    per_seed = []
    for seed in (0, 1):
        kept = set(read_uid_npy(out / "subsets" / f"random-seed{seed}" / "uids.npy"))
        swapped = [u for u, t in truth.items() if t == "swapped"]
        per_seed.append(1.0 - sum(u in kept for u in swapped) / len(swapped))
    assert doc.methods["random"]["removal"]["kinds"]["swapped"]["removed_rate"] == pytest.approx(np.mean(per_seed))
    md = (out / "compare.md").read_text()
    removed = doc.methods["negclip"]["removal"]["kinds"]["noise_image"]["removed_rate"]
    assert re.search(rf"\| {re.escape(METHOD_LABELS['negclip'])} \|.*\| {100 * removed:.1f} \|", md)


def test_compare_rerun_reuses_artefacts(compared, corpus):
    """A rerun finds the chain's run markers (the recipe planner's) and the finished runs: it embeds, scores,
    filters and trains nothing again, and rewrites none of those files."""
    out, doc, config, _ = compared
    made = sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in (".parquet", ".npy", ".pt")
                  and not {"no_filter", "oracle"} & set(p.parts)
                  and not any(part.startswith("random-seed") for part in p.parts))
    assert any(p.parent.name == "emb" for p in made) and (out / "scores.parquet") in made
    before = {p: p.stat().st_mtime_ns for p in made}
    messages: list[str] = []
    again = compare.run(corpus / "pool", out, config, log=messages.append)
    assert {p: p.stat().st_mtime_ns for p in made} == before
    steps = [m for m in messages if re.search(r"\b(skip|run)\b", m)]
    # the chain's 10 recipe steps (teacher, embed x 2, score, normsim x 2, clones, 4 filters; the teacher always
    # runs: it resolves the checkpoint) and the 13 steps outside the recipe are all skipped
    assert len(steps) == 11 + 13 and all("skip" in m and "done" in m for m in steps if "teacher" not in m), messages
    assert sum("reused" in m for m in messages) == len(doc.runs)
    assert not any(m.startswith(("generating", "training the tiny teacher")) for m in messages)
    assert [r["zero_shot_top1"] for r in again.runs] == [r["zero_shot_top1"] for r in doc.runs]


def test_compare_chain_runs_again_when_the_corpus_changes(compared, corpus, tmp_path):
    """The chain's markers hold paths, not contents: inputs.json records what the corpus and the teacher were, and
    a corpus regenerated in place (other parameters) is embedded and scored again, not taken from the markers."""
    out, doc, config, _ = compared
    moved = tmp_path / "compare"
    shutil.copytree(out, moved)
    pool = tmp_path / "pool"
    synth_corpus(pool, samples=160, shard_size=80, seed=21, corrupt=0.5, target_samples=24)
    first = compare.run(pool, moved, config, log=lambda message: None)
    shutil.rmtree(pool)
    synth_corpus(pool, samples=160, shard_size=80, seed=23, corrupt=0.5, target_samples=24)
    messages: list[str] = []
    second = compare.run(pool, moved, config, log=messages.append)
    assert any("changed" in m for m in messages)
    assert any("run" in m and "embed" in m and "skip" not in m for m in messages)
    assert sum("reused" in m for m in messages) == 0
    pool_uids = set(corpus_truth(pool))
    assert set(read_uid_npy(moved / "subsets" / "negclip" / "uids.npy")) <= pool_uids
    assert first.corpus["parameters"]["seed"] == 21 and second.corpus["parameters"]["seed"] == 23



def test_a_changed_score_parameter_remakes_the_subsets_that_read_the_scores(compared, corpus, tmp_path):
    """SemDeDup → negCLIPLoss is filtered outside the chain, from scores.parquet: another negCLIPLoss batch makes
    scores.parquet anew, and that subset with it (not a subset of the old scores kept by its marker): every step
    after the chain reruns when the chain did, as in a recipe."""
    import dataclasses

    import pyarrow.parquet as pq

    out, _, config, _ = compared
    moved = tmp_path / "compare"
    shutil.copytree(out, moved)
    messages: list[str] = []
    compare.run(corpus / "pool", moved, dataclasses.replace(config, negclip_batch=8), log=messages.append)
    ran = {found.group(1) for m in messages if (found := re.search(r"\[bold\]run\[/\] (\S+)", m))}
    assert {"score", "filter:semdedup_negclip", "filter:negclip"} <= ran
    scores = pq.read_table(moved / "scores.parquet").to_pydict()
    kept_by_dedup = pq.read_table(moved / "dedup.parquet").to_pydict()
    eligible = [u for u, keep in zip(kept_by_dedup["uid"], kept_by_dedup["semdedup_keep"]) if keep >= 1]
    negclip = dict(zip(scores["uid"], scores["negclip"]))
    k = tables.subset_size(config.fraction, len(scores["uid"]))
    expected = sorted(eligible, key=lambda u: (-negclip[u], u))[:k]
    assert sorted(read_uid_npy(moved / "subsets" / "semdedup_negclip" / "uids.npy")) == sorted(expected)

def test_compare_needs_a_synth_corpus_with_target(tmp_path, random_teacher):
    synth_corpus(tmp_path / "plain", samples=20, shard_size=20, seed=1, corrupt=0.0, target_samples=0)
    with pytest.raises(CurateError, match="target"):
        compare.run(tmp_path / "plain", tmp_path / "out", CompareConfig(teacher=str(random_teacher)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CurateError, match="manifest"):
        compare.run(tmp_path / "empty", tmp_path / "out", CompareConfig(teacher=str(random_teacher)))



def test_the_report_of_a_run_dir_shows_the_comparison_and_its_curves(compared, tmp_path):
    """What `make demo` does after its recipe: the comparison in RUN_DIR/compare, then `curate report RUN_DIR`.
    Its tables and the students' curves are in the HTML, not the 'no comparison' placeholder."""
    from curate.stages.report import ReportConfig
    from curate.stages.report import entry as report

    out, doc, _, _ = compared
    shutil.copytree(out, tmp_path / "run" / "compare")
    report.run(str(tmp_path / "run"), tmp_path / "report.html", ReportConfig())
    html = (tmp_path / "report.html").read_text()
    section = lambda name: html.split(f'<section id="{name}">')[1].split("</section>")[0]  # noqa: E731
    assert METHOD_LABELS["negclip_normsim_inf"] in section("compare") and "ROC-AUC" in section("compare")
    assert "No comparison" not in section("compare") and "<img" in section("curves")


def test_negclip_batch_is_the_teachers_training_batch_when_its_checkpoint_says(compared, tmp_path):
    """negCLIPLoss's B is the teacher's own training batch (the paper); a checkpoint without it (random weights,
    open_clip's) falls back to OpenAI CLIP's 32768."""
    from curate.models.teacher import create_model, model_config, save_checkpoint

    _, doc, _, _ = compared
    assert doc.config["negclip_batch"] == 32768  # the random teacher's checkpoint records no training
    path = save_checkpoint(create_model("curate-student"), tmp_path / "trained.pt", "curate-student",
                           model_config("curate-student"), {"train_config": {"batch_size": 128}})
    _, model, identity = compare.resolve_teacher(CompareConfig(teacher=str(path)), log=lambda message: None)
    assert model == "curate-student" and identity["train_batch_size"] == 128
