"""Executors (local and a real local Ray), retries and failure reports, rank splits, completion markers.

One local Ray (conftest's module-scoped `ray_session`, `ray.init(num_cpus=2)`) serves the whole module: starting
one costs seconds. Task functions live in tests/executor_tasks.py so that spawned processes and Ray workers can
import them.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

import executor_tasks as et
from curate.errors import CurateError
from curate.run.executors import LocalExecutor, make_executor
from curate.run.markers import Markers
from curate.run.ranks import resolve_rank, split_for_rank

def executor_of(kind: str, request):
    if kind == "ray":
        request.getfixturevalue("ray_session")
        return make_executor("ray")
    return LocalExecutor(workers=2 if kind == "local2" else 1)


def file_tasks(out: Path, n: int, overrides: dict[int, dict] | None = None) -> list[et.FileTask]:
    """Tasks t0..t{n-1}; overrides[i] sets fields of task i (fail_times, user_error, ...)."""
    return [et.FileTask(f"t{i}", str(out), seed=i, **(overrides or {}).get(i, {})) for i in range(n)]


def read_outputs(out: Path, pattern: str = "*.bin") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob(pattern))}


# ---------------------------------------------------------------- same results on every executor

def test_local_pool_and_ray_give_identical_results_and_bytes(tmp_path, ray_session, request):
    reports, outputs = {}, {}
    for kind in ("local", "local2", "ray"):
        out = tmp_path / kind
        tasks = file_tasks(out, 7)
        reports[kind] = executor_of(kind, request).run(et.write_file_task, tasks)
        outputs[kind] = read_outputs(out)
        assert reports[kind].failures == []
        assert [r["name"] for r in reports[kind].results] == [t.name for t in tasks]  # task order
    assert reports["local"].results == reports["local2"].results == reports["ray"].results
    assert len(outputs["local"]) == 7
    assert outputs["local"] == outputs["local2"] == outputs["ray"]
    assert ray_session.is_initialized()  # the executor leaves alone a Ray it did not start


# ---------------------------------------------------------------- retries and failures

@pytest.mark.parametrize("kind", ["local", "ray"])
def test_transient_failures_are_retried(kind, tmp_path, request):
    executor = executor_of(kind, request)
    tasks = file_tasks(tmp_path, 3, {0: {"fail_times": 2}, 2: {"fail_times": 1}})
    report = executor.run(et.write_file_task, tasks, retries=2)
    assert report.failures == []
    assert [et.calls(tmp_path, t.name) for t in tasks] == [3, 1, 2]
    assert all(r is not None for r in report.results)

    # one retry is not enough for a task that fails twice
    out = tmp_path / "fewer"
    report = executor.run(et.write_file_task, file_tasks(out, 2, {1: {"fail_times": 2}}), retries=1)
    assert [(f.task, f.attempts) for f in report.failures] == [("t1", 2)]
    assert "transient failure 2" in report.failures[0].error
    assert et.calls(out, "t1") == 2


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_persistent_failure_is_reported_after_the_others_finish(kind, tmp_path, request):
    tasks = file_tasks(tmp_path, 5, {1: {"fail_times": 99}})
    report = executor_of(kind, request).run(et.write_file_task, tasks, retries=1)
    assert [(f.task, f.attempts) for f in report.failures] == [("t1", 2)]
    assert "RuntimeError" in report.failures[0].error
    assert report.results[1] is None
    assert [r["name"] for i, r in enumerate(report.results) if i != 1] == ["t0", "t2", "t3", "t4"]
    assert sorted(read_outputs(tmp_path)) == ["t0.bin", "t2.bin", "t3.bin", "t4.bin"]
    with pytest.raises(CurateError, match=r"toy: 1 task\(s\) failed.*t1"):
        report.raise_if_failed("toy")


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_user_errors_are_not_retried(kind, tmp_path, request):
    tasks = file_tasks(tmp_path, 2, {0: {"user_error": True}})
    report = executor_of(kind, request).run(et.write_file_task, tasks, retries=3)
    assert [(f.task, f.attempts) for f in report.failures] == [("t0", 1)]
    assert "will not get better" in report.failures[0].error
    assert et.calls(tmp_path, "t0") == 1
    assert report.results[1]["name"] == "t1"


def test_fail_fast_stops_at_the_first_failure_locally(tmp_path):
    tasks = file_tasks(tmp_path, 5, {1: {"fail_times": 99}})
    report = LocalExecutor(1).run(et.write_file_task, tasks, retries=1, fail_fast=True)
    assert [f.task for f in report.failures] == ["t1"]
    assert [et.calls(tmp_path, t.name) for t in tasks] == [1, 2, 0, 0, 0]


def test_fail_fast_cancels_the_rest_on_ray(tmp_path, ray_session):
    n = 12
    tasks = file_tasks(tmp_path, n, {i: {"sleep_s": 0.2} for i in range(1, n)})
    tasks[0].fail_times = 99
    report = make_executor("ray").run(et.write_file_task, tasks, retries=0, fail_fast=True)
    assert [f.task for f in report.failures] == ["t0"]
    time.sleep(2.0)  # long enough for the whole queue on 2 CPUs, had it not been cancelled
    ran = sum(et.calls(tmp_path, t.name) for t in tasks[1:])
    assert ran < (n - 1) // 2, f"{ran} of {n - 1} tasks ran after the failure"


@pytest.mark.parametrize("kind", ["local2", "ray"])
def test_a_dead_worker_process_is_reported_not_raised(kind, tmp_path, request):
    tasks = file_tasks(tmp_path, 3, {1: {"exit_process": True}})
    report = executor_of(kind, request).run(et.write_file_task, tasks, retries=1)
    assert "t1" in [f.task for f in report.failures]
    if kind == "ray":  # Ray restarts the worker and retries the task, then reports it; the others finish
        assert [f.task for f in report.failures] == ["t1"]
        assert "WorkerCrashedError" in report.failures[0].error or "died" in report.failures[0].error
        assert et.calls(tmp_path, "t1") == 2
        assert sorted(read_outputs(tmp_path)) == ["t0.bin", "t2.bin"]


# ---------------------------------------------------------------- Ray set-up errors

def test_without_ray_installed_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    with pytest.raises(CurateError, match=r"pip install 'curate\[ray\]'"):
        make_executor("ray")


def test_unknown_executor_is_a_user_error():
    with pytest.raises(CurateError, match="choose local or ray"):
        make_executor("spark")


def test_unreachable_ray_address_fails_in_seconds():
    pytest.importorskip("ray")
    from curate.run.ray_executor import _check_reachable

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(CurateError, match="cannot reach"):
        _check_reachable(f"127.0.0.1:{port}")
    with pytest.raises(CurateError, match="expected auto, HOST:PORT"):
        _check_reachable("headnode")
    assert time.perf_counter() - start < 10


def test_gpu_tasks_on_a_ray_without_gpus(ray_session):
    from curate.run.ray_executor import RayExecutor

    executor = RayExecutor(address=None, num_gpus=1)
    with pytest.raises(CurateError, match="has 0 GPU|--device cpu"):
        executor._check_gpus(started_locally=True)  # a private local Ray never gains GPUs: refuse, do not hang
    with pytest.warns(RuntimeWarning, match="autoscales"):
        executor._check_gpus(started_locally=False)
    RayExecutor(num_gpus=0)._check_gpus(started_locally=True)  # CPU tasks: nothing to check


# ---------------------------------------------------------------- ranks

def test_rank_split_is_a_deterministic_balanced_partition():
    for n in range(0, 13):
        items = [f"shard-{i:05d}" for i in range(n)]
        for world in (1, 2, 3, 5):
            parts = [split_for_rank(items, r, world) for r in range(world)]
            flat = [x for p in parts for x in p]
            assert sorted(flat) == items and len(flat) == len(set(flat))  # disjoint, union = all
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            assert parts == [split_for_rank(list(items), r, world) for r in range(world)]  # same on every machine
    assert split_for_rank(list(range(7)), 1, 3) == [1, 4]


def test_bad_rank_or_world_size_is_a_user_error(no_slurm):
    for rank, world in [(3, 3), (-1, 3), (0, 0), (2, None)]:
        with pytest.raises(CurateError, match="--rank"):
            resolve_rank(rank, world)
    with pytest.raises(CurateError, match="without --rank"):
        resolve_rank(None, 4)  # would otherwise silently do 1/4 of the work
    with pytest.raises(CurateError):
        split_for_rank([1, 2, 3], 3, 3)
    assert resolve_rank(None, None) == (0, 1)
    assert resolve_rank(2, 3) == (2, 3)


def test_slurm_array_variables_fill_in_rank_and_world_size(no_slurm, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert resolve_rank(None, None) == (2, 3)
    assert resolve_rank(0, None) == (0, 3)  # explicit options win
    assert resolve_rank(None, 5) == (2, 5)
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")  # --array=1-3
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert resolve_rank(None, None) == (2, 3)
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")  # --array=0-8:4 -> ids 0, 4, 8
    monkeypatch.setenv("SLURM_ARRAY_TASK_STEP", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "8")
    assert resolve_rank(None, None) == (2, 3)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    with pytest.raises(CurateError, match="not on the array's grid"):
        resolve_rank(None, None)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "two")
    with pytest.raises(CurateError, match="SLURM_ARRAY_TASK_ID='two'"):
        resolve_rank(None, None)


# ---------------------------------------------------------------- markers

def test_markers_are_written_atomically_and_incomplete_lists_the_missing(tmp_path, monkeypatch):
    markers = Markers(tmp_path, "embed")
    names = ["b", "a", "c", "d"]
    assert markers.incomplete(names) == names
    markers.mark("a", {"rows": 3})
    markers.mark("d")
    assert markers.is_done("a") and not markers.is_done("b")
    assert markers.info("a") == {"rows": 3}
    assert markers.incomplete(names) == ["b", "c"]  # in the given order
    assert sorted(p.name for p in markers.dir.iterdir()) == ["a.done", "d.done"]  # no temp files left

    (markers.dir / ".c.done.tmp-123-deadbeef").write_text("{")  # what a kill -9 mid-write leaves
    assert markers.done() == {"a", "d"}

    import curate.io.atomic

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(curate.io.atomic.os, "replace", crash)
    with pytest.raises(OSError):
        markers.mark("b")
    assert not markers.is_done("b")
    assert markers.incomplete(names) == ["b", "c"]


def run_toy_rank(out: Path, shards: list[str], rank: int, world: int, executor) -> list[str]:
    """What a stage does: its rank's shards, minus the marked ones, through the executor."""
    todo = Markers(out, "toy").incomplete(split_for_rank(shards, rank, world))
    report = executor.run(et.shard_stage_task, [et.ShardTask(s, str(out)) for s in todo], retries=1)
    report.raise_if_failed("toy")
    return todo


def test_ranks_union_equals_one_run_and_a_killed_rank_redoes_only_its_missing_shards(tmp_path, ray_session):
    shards = [f"shard-{i:02d}" for i in range(8)]
    single, ranked = tmp_path / "single", tmp_path / "ranked"
    run_toy_rank(single, shards, 0, 1, LocalExecutor(1))
    executors = [LocalExecutor(1), LocalExecutor(1), make_executor("ray")]  # ranks may use different back ends
    for rank in range(3):
        run_toy_rank(ranked, shards, rank, 3, executors[rank])
    assert read_outputs(ranked, "*.out") == read_outputs(single, "*.out")
    assert len(read_outputs(single, "*.out")) == 8
    assert Markers(ranked, "toy").done() == set(shards)

    # rank 1 (shards 1, 4, 7) "killed": one output written but no marker yet, one not started, a temp file left
    markers = Markers(ranked, "toy")
    markers.path("shard-01").unlink()
    markers.path("shard-04").unlink()
    (ranked / "shard-04.out").unlink()
    (ranked / ".shard-04.out.tmp-999-0badf00d").write_bytes(b"partial")

    redone = [run_toy_rank(ranked, shards, rank, 3, executors[rank]) for rank in range(3)]
    assert redone == [[], ["shard-01", "shard-04"], []]
    assert {s: et.calls(ranked, s) for s in shards} == {s: 2 if s in ("shard-01", "shard-04") else 1 for s in shards}
    assert read_outputs(ranked, "*.out") == read_outputs(single, "*.out")
    assert markers.done() == set(shards)
    # a third run finds nothing to do
    assert [run_toy_rank(ranked, shards, rank, 3, executors[rank]) for rank in range(3)] == [[], [], []]


# ---------------------------------------------------------------- the embed stage end to end

@pytest.mark.slow  # ~20-30 s: two Ray workers import torch and open_clip
def test_embed_on_ray_and_over_ranks_matches_one_local_run(tmp_path, ray_session, no_slurm):
    torch = pytest.importorskip("torch")
    from typer.testing import CliRunner

    from curate.cli import app
    from curate.models import create_model, model_config, save_checkpoint
    from conftest import synth_corpus

    corpus = tmp_path / "corpus"
    synth_corpus(corpus, samples=32, shard_size=8, corrupt=0.2, target_samples=0, image_size=32)
    torch.manual_seed(0)  # a fixed teacher: random init differs between processes
    checkpoint = save_checkpoint(create_model("curate-tiny"), tmp_path / "teacher.pt", "curate-tiny",
                                 model_config("curate-tiny"))
    runner = CliRunner()

    def embed(out: Path, *extra: str) -> None:
        args = ["embed", str(corpus), "--out", str(out), "--model", "curate-tiny", "--pretrained", str(checkpoint),
                "--device", "cpu", "--workers", "0", "--batch-size", "8", *extra]
        result = runner.invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output

    embed(tmp_path / "local")
    embed(tmp_path / "ray", "--executor", "ray", "--tasks", "2")
    for rank in range(3):
        embed(tmp_path / "ranks", "--rank", str(rank), "--world-size", "3")

    local = read_outputs(tmp_path / "local", "*.parquet")
    assert set(local) == \
        {"00000.parquet", "00001.parquet", "00002.parquet", "00003.parquet"}
    assert read_outputs(tmp_path / "ray", "*.parquet") == local
    assert read_outputs(tmp_path / "ranks", "*.parquet") == local
    assert Markers(tmp_path / "ranks", "embed").done() == {"00000", "00001", "00002", "00003"}
