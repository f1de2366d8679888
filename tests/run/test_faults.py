"""Faults: `kill -9` at seeded random points of `curate embed`, `score` and `export`, then a rerun.

Each stage first runs uninterrupted into a reference directory. Then the same command runs into a second
directory and is killed (SIGKILL to its whole process group, decode workers included) several times, at a
random delay or right after a random number of its outputs appeared, and finally runs to completion. While
any of these runs is alive the output directory is polled every few milliseconds: every file under a final
name must already be byte-identical to the reference's file of that name (so no partial file is ever
visible). At the end both directories must hold the same files with the same bytes, and no temp file of a
killed writer (`.NAME.tmp-HOST-PID-RANDOM`) may be left over: the final run sweeps them away.

The reference embed runs with `--workers 0` and the faulted runs with `--workers 2`, so the byte comparison
also proves that decode workers do not change the tables. Every run has its non-local sockets refused and
logged: none of embed, score and export needs the network.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import NO_NETWORK_SITECUSTOMIZE, make_embedding_dir, record_robustness
from curate.io.atomic import TEMP_NAME  # the temp names of atomic writes
from curate.io.uids import write_uid_npy

CURATE_BIN = Path(sys.executable).parent / "curate"
KILLS_PER_STAGE = 3
SEED = 20240917


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    """Subprocess environment with every non-local socket refused and logged: the runs need no network."""
    site = tmp_path_factory.mktemp("offline")
    (site / "sitecustomize.py").write_text(NO_NETWORK_SITECUSTOMIZE)
    log = site / "net.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "CURATE_TEST_NET_LOG": str(log), "COLUMNS": "200"}
    yield env
    assert not log.exists(), log.read_text()


@pytest.fixture(scope="module")
def tally(request):
    counts = {"kills": 0, "runs": 0, "polls": 0, "files_checked": 0, "partial_files_seen": 0, "crashes": 0,
              "good_samples_expected": 0, "good_samples_lost": 0}
    yield counts
    record_robustness(request.config, "test_faults", counts)


def final_files(root: Path) -> dict[str, Path]:
    """Every file under `root` except atomic-write temp files, by relative path."""
    if not root.exists():
        return {}
    files = {}
    for path in root.rglob("*"):
        if TEMP_NAME.match(path.name):
            continue
        try:
            if path.is_file():
                files[str(path.relative_to(root))] = path
        except FileNotFoundError:
            continue
    return files


def read_all(root: Path) -> dict[str, bytes]:
    return {rel: path.read_bytes() for rel, path in final_files(root).items()}


class Watch:
    """Polls an output directory: every file under a final name must equal the reference's file."""

    def __init__(self, root: Path, reference: dict[str, bytes], same=None):
        self.root, self.reference = root, reference
        self.same = same or (lambda reference, rel, data: data == reference.get(rel))
        self.checked: dict[tuple, bool] = {}
        self.violations: list[str] = []
        self.polls = 0

    def poll(self) -> set[str]:
        self.polls += 1
        present = set()
        for rel, path in final_files(self.root).items():
            try:
                st = path.stat()
                key = (rel, st.st_ino, st.st_size, st.st_mtime_ns)
                if key not in self.checked:
                    data = path.read_bytes()
                    self.checked[key] = self.same(self.reference, rel, data)
                    if not self.checked[key]:
                        self.violations.append(f"{rel}: {len(data)} bytes differ from the reference "
                                               f"({len(self.reference.get(rel, b''))} bytes)")
            except FileNotFoundError:  # replaced or removed between listing and reading
                continue
            present.add(rel)
        return present


def run_watched(cmd: list[str], watch: Watch, log: Path, env: dict, kill_after_s: float | None = None,
                kill_after_files: int | None = None, extra_delay_s: float = 0.0,
                appeared: list[float] | None = None) -> tuple[int, bool]:
    """Run `cmd` in its own process group, polling `watch`; SIGKILL it after a delay or after N new files.

    Returns (exit code, whether it was killed); `appeared` receives the seconds at which new files showed up."""
    before = watch.poll()
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    started, trigger, killed, new = time.monotonic(), None, False, set()
    while proc.poll() is None:
        now_new = watch.poll() - before
        now = time.monotonic()
        if appeared is not None:
            appeared += [now - started] * len(now_new - new)
        new = now_new
        if kill_after_s is not None and now - started >= kill_after_s:
            trigger = now
        if kill_after_files is not None and trigger is None and len(new) >= kill_after_files:
            trigger = now + extra_delay_s
        if trigger is not None and now >= trigger:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the CLI and its decode workers
                killed = True
            except ProcessLookupError:
                pass
            proc.wait()
            break
        time.sleep(0.01)  # a partial file would be visible for far longer than this
    code = proc.wait()
    # workers of a killed run may outlive the group leader for a moment; let them go before the next run
    deadline = time.monotonic() + 10
    while killed and time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    watch.poll()
    with open(log, "a") as out:
        out.write(f"\n[test_faults] exit {code}, killed={killed} after {time.monotonic() - started:.2f} s "
                  f"(kill_after_s={kill_after_s}, kill_after_files={kill_after_files}, new files {len(new)})\n")
    return code, killed


def fault_cycle(cmd_ref: list[str], ref_dir: Path, cmd_fault: list[str], fault_dir: Path, expected_files: int,
                tally: dict, log: Path, seed: int, env: dict, same=None) -> tuple[dict[str, bytes], dict[str, bytes], Watch]:
    """Reference run, KILLS_PER_STAGE killed runs at seeded random points, a final run; returns both trees.

    Kill points, seeded: the first at a random delay before the reference wrote its first file (start-up,
    reading), the others while outputs are being written: after a random number of new files, or at a
    random delay within the reference's writing window.
    """
    appeared: list[float] = []
    code, _ = run_watched(cmd_ref, Watch(ref_dir, {}, lambda *_: True), log, env, appeared=appeared)
    assert code == 0, log.read_text()[-3000:]
    reference = read_all(ref_dir)
    first, last = (min(appeared), max(appeared)) if appeared else (0.5, 1.0)
    watch = Watch(fault_dir, reference, same)
    rng = np.random.default_rng(seed)
    for number in range(KILLS_PER_STAGE):
        if number == 0:
            code, killed = run_watched(cmd_fault, watch, log, env, kill_after_s=float(rng.uniform(0.2, max(0.3, first))))
        elif number % 2:
            count = int(rng.integers(1, max(2, expected_files)))
            code, killed = run_watched(cmd_fault, watch, log, env, kill_after_files=count,
                                       extra_delay_s=float(rng.uniform(0, 0.05)))
        else:
            code, killed = run_watched(cmd_fault, watch, log, env, kill_after_s=float(rng.uniform(first, last + 0.05)))
        tally["kills"] += killed
        tally["runs"] += 1
        assert killed or code == 0, log.read_text()[-3000:]
    code, killed = run_watched(cmd_fault, watch, log, env)
    tally["runs"] += 1
    output = log.read_text()
    tally["crashes"] += output.count("Traceback (most recent call last)")
    assert code == 0 and not killed, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    tally["polls"] += watch.polls
    tally["files_checked"] += len(watch.checked)
    tally["partial_files_seen"] += len(watch.violations)
    assert not watch.violations, watch.violations
    faulted = read_all(fault_dir)
    leftovers = [p.name for p in fault_dir.rglob("*") if p.name.startswith(".") and p.is_file()
                 and not TEMP_NAME.match(p.name) and ".curate-cache" not in p.parts]
    assert not leftovers, leftovers
    stale = [str(p.relative_to(fault_dir)) for p in fault_dir.rglob("*") if TEMP_NAME.match(p.name)]
    tally["stale_temps_left"] = tally.get("stale_temps_left", 0) + len(stale)
    assert not stale, f"temp files of killed writers left after the final run: {stale}"
    return reference, faulted, watch


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from conftest import synth_corpus

    out = tmp_path_factory.mktemp("faults") / "corpus"
    synth_corpus(out, samples=60, shard_size=12, seed=4, corrupt=0.2, target_samples=0)
    return out


def test_embed_killed_at_random_points_resumes_to_identical_tables(corpus, tmp_path, tally, offline_env):
    common = [str(CURATE_BIN), "embed", str(corpus), "--batch-size", "4", "--device", "cpu", "--model", "curate-tiny",
              "--pretrained", "none"]
    reference, faulted, _ = fault_cycle(
        common + ["--out", str(tmp_path / "ref"), "--workers", "0"], tmp_path / "ref",
        common + ["--out", str(tmp_path / "fault"), "--workers", "2"], tmp_path / "fault",
        expected_files=10, tally=tally, log=tmp_path / "log.txt", seed=SEED, env=offline_env)
    assert sorted(faulted) == sorted(reference)
    assert len([r for r in reference if r.endswith(".parquet")]) == 5
    for rel in reference:
        assert faulted[rel] == reference[rel], rel
    import pyarrow.parquet as pq

    rows = sum(pq.read_metadata(tmp_path / "fault" / r).num_rows for r in reference
               if r.endswith(".parquet") and not r.endswith(".errors.parquet"))
    tally["good_samples_expected"] += 60
    tally["good_samples_lost"] += 60 - rows
    assert rows == 60


def test_score_killed_at_random_points_resumes_to_identical_scores(tmp_path, tally, offline_env):
    emb = make_embedding_dir(tmp_path / "emb", [3000] * 4, dim=32, seed=1)
    common = [str(CURATE_BIN), "score", str(emb), "--metric", "clipscore,negclip", "--k", "3", "--batch-size", "1024",
              "--device", "cpu"]
    reference, faulted, _ = fault_cycle(
        common + ["--out", str(tmp_path / "ref" / "scores.parquet")], tmp_path / "ref",
        common + ["--out", str(tmp_path / "fault" / "scores.parquet")], tmp_path / "fault",
        expected_files=3, tally=tally, log=tmp_path / "log.txt", seed=SEED + 1, env=offline_env)
    assert "scores.parquet" in reference and len(reference) == 3  # the scores and two fp16 memmap caches
    assert faulted == reference


def test_export_killed_at_random_points_resumes_to_identical_shards(corpus, tmp_path, tally, offline_env):
    from curate.io.shards import expand_shards, iter_shard, sample_uid

    uids = [sample_uid(raw) for url in expand_shards(str(corpus)) for raw in iter_shard(url, lambda k, r: None)]
    subset = sorted(set(uids[::2]))
    write_uid_npy(subset + ["f" * 32], tmp_path / "uids.npy")

    def same(reference: dict[str, bytes], rel: str, data: bytes) -> bool:
        if rel != "export_manifest.json":
            return data == reference.get(rel)
        manifest = json.loads(data)  # must parse: a manifest under its final name is complete
        return manifest["config"] == json.loads(reference[rel])["config"]

    def run(out: Path) -> list[str]:
        return [str(CURATE_BIN), "export", str(corpus), "--subset", str(tmp_path / "uids.npy"), "--out", str(out),
                "--shard-size", "3"]

    reference, faulted, _ = fault_cycle(run(tmp_path / "ref"), tmp_path / "ref", run(tmp_path / "fault"),
                                        tmp_path / "fault", expected_files=len(subset) // 3, tally=tally,
                                        log=tmp_path / "log.txt", seed=SEED + 2, env=offline_env, same=same)
    tars = sorted(r for r in reference if r.endswith(".tar"))
    assert len(tars) == -(-len(subset) // 3)
    for rel in reference:
        if rel != "export_manifest.json":
            assert faulted[rel] == reference[rel], rel
    report_ref = json.loads(reference["export_manifest.json"])["report"]
    report_fault = json.loads(faulted["export_manifest.json"])["report"]
    for field in ("out_dir", "tars_reused", "noop"):
        report_ref.pop(field), report_fault.pop(field)
    assert report_fault == report_ref and report_ref["written"] == len(subset)
    tally["good_samples_expected"] += len(subset)
    tally["good_samples_lost"] += len(subset) - report_fault["written"]
