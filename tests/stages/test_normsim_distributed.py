"""Distributed NormSim (p = inf, 2): map tasks over runs of whole tables + a concatenation give the one-process
table, byte for byte.

Ranks are simulated by calling the stage's `run` once per rank in this process; the local process pool and a real local
Ray (the module-scoped `ray_session` of tests/conftest.py) run the same tasks in other processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import SLURM_VARS, make_embedding_dir, run_cli, run_normsim
from curate.errors import CurateError
from curate.io.tables import EmbeddingPool
from curate.run.mapreduce import parts_root
from curate.run.markers import MARKER_DIR
from curate.stages.normsim import common, entry
from curate.stages.normsim.common import table_spans, table_starts
from curate.stages.normsim.tasks import NORMSIM_STAGE, normsim_layout

DIM = 64
TABLE_ROWS = [60, 45, 70, 30, 55]  # 5 tables: 5 map tasks by default (tasks never split a table)
# (p, index, target rows): exact and ivf p=inf; p=2 by the second moment (M >= D) and directly (M < D)
CASES = [("inf", "flat", 100), ("inf", "ivf", 100), ("2", "flat", 100), ("2", "flat", 20)]


pytestmark = pytest.mark.usefixtures("no_slurm")


@pytest.fixture
def pool(tmp_path) -> Path:
    return make_embedding_dir(tmp_path / "emb", TABLE_ROWS, dim=DIM, seed=2)


def target_file(tmp_path: Path, rows: int, seed: int = 7, dim: int = DIM) -> str:
    target = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    path = tmp_path / f"target-{rows}-{seed}-{dim}.npy"
    np.save(path, target)
    return str(path)


def run(pool, target, p, out, index="flat", **options):
    return run_normsim(pool, out, target=target, p=p, index=index, device="cpu", cache_dir=Path(out).parent / "cache",
                       **options)


def in_process(pool, target, p, out, index="flat") -> bytes:
    result = run(pool, target, p, out, index)
    assert result.normsim_tasks is None and not parts_root(out).exists()  # the default path makes no parts
    return Path(out).read_bytes()


def task_files(out: Path) -> dict[str, int]:
    """{task name: mtime_ns} of the map outputs beside `out`."""
    return {f.stem: f.stat().st_mtime_ns for f in parts_root(out).glob("normsim_*/t*.npy")}


def marker_names(out: Path) -> set[str]:
    return {f.stem for f in parts_root(out).glob(f"normsim_*/{MARKER_DIR}/{NORMSIM_STAGE}/*.done")}


# ---------------------------------------------------------------- ranks

@pytest.mark.parametrize("p, index, rows", CASES)
def test_three_ranks_give_the_in_process_table_byte_for_byte(pool, tmp_path, p, index, rows):
    target = target_file(tmp_path, rows)
    want = in_process(pool, target, p, tmp_path / "one" / "n.parquet", index)
    out = tmp_path / "ranks" / "n.parquet"
    infos = []
    for rank in range(3):
        result = run(pool, target, p, out, index, rank=rank, world_size=3)
        infos.append(result.normsim_tasks)
        assert (result.out is None) == (rank < 2)  # only the rank that completes the set reduces
        assert out.exists() == (rank == 2)
    assert [i["ran"] for i in infos] == [2, 2, 1] and [i["missing"] for i in infos] == [3, 1, 0]
    assert infos[2]["reduced"] and infos[2]["tasks"] == 5
    assert out.read_bytes() == want
    # a second reducer (any rank rerun) writes the same bytes without recomputing a task
    before = task_files(out)
    again = run(pool, target, p, out, index, rank=0, world_size=3)
    assert again.normsim_tasks["ran"] == 0 and task_files(out) == before and out.read_bytes() == want


def test_ranks_reading_the_fp16_cache_give_the_table_streamed_from_parquet(pool, tmp_path, monkeypatch):
    """Several blocks per table (ring buffers reused), tasks over the cache; the one-process run streams."""
    monkeypatch.setattr(common, "READ_BATCH_ROWS", 16)
    target = target_file(tmp_path, 100)
    want = in_process(pool, target, "inf", tmp_path / "one" / "n.parquet")
    out = tmp_path / "ranks" / "n.parquet"
    EmbeddingPool(pool).matrix("image_embedding", out.parent / "cache")
    for rank in range(2):
        result = run(pool, target, "inf", out, rank=rank, world_size=2, tasks=3)
    assert result.normsim_tasks["tasks"] == 3 and out.read_bytes() == want


def test_a_missing_rank_is_finished_by_a_rerun_that_runs_only_its_tasks(pool, tmp_path, monkeypatch):
    target = target_file(tmp_path, 100)
    want = in_process(pool, target, "2", tmp_path / "one" / "n.parquet")
    out = tmp_path / "ranks" / "n.parquet"
    for rank in (0, 2):  # rank 1 "was killed" before it started
        assert run(pool, target, "2", out, rank=rank, world_size=3).out is None
    everything = {f"t{i:05d}" for i in range(5)}
    rank1 = {"t00001", "t00004"}
    assert marker_names(out) == set(task_files(out)) == everything - rank1
    before = task_files(out)
    # the same command without --rank/--world-size: finds the started parts, runs what is missing, reduces
    # and, as the only driver, deletes the parts once the table is written (seen here just before)
    seen = {}
    remove = entry.remove_single_driver_parts
    monkeypatch.setattr(entry, "remove_single_driver_parts", lambda *a: (seen.update(task_files(out)), remove(*a)))
    result = run(pool, target, "2", out)
    info = result.normsim_tasks
    assert result.out == str(out) and info["ran"] == 2 and info["already_done"] == 3
    assert {name for name in seen if seen[name] != before.get(name)} == rank1  # the others were not rewritten
    assert out.read_bytes() == want
    assert not parts_root(out).exists()


def test_slurm_array_variables_choose_the_rank(pool, tmp_path, monkeypatch):
    target = target_file(tmp_path, 100)
    out = tmp_path / "n.parquet"
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    for task_id in ("1", "0"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task_id)
        result = run(pool, target, "inf", out)
        assert result.normsim_tasks["rank"] == int(task_id) and result.normsim_tasks["world_size"] == 2
    assert result.out == str(out)
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)
    assert out.read_bytes() == in_process(pool, target, "inf", tmp_path / "one" / "n.parquet")


def test_distributed_scores_match_a_plain_numpy_formula(pool, tmp_path):
    target_path = target_file(tmp_path, 20)
    target = np.load(target_path).astype(np.float64)
    v = EmbeddingPool(pool).matrix("image_embedding").astype(np.float64)
    products = v @ target.T
    for p, want in (("inf", np.abs(products).max(axis=1)), ("2", np.sqrt((products ** 2).sum(axis=1)))):
        out = tmp_path / p / "n.parquet"
        for rank in range(2):
            run(pool, target_path, p, out, rank=rank, world_size=2, tasks=4)
        np.testing.assert_allclose(pq.read_table(out).column(f"normsim_{p}").to_numpy(), want, atol=1e-5)


def test_task_spans_are_runs_of_whole_tables_covering_the_pool(pool):
    emb = EmbeddingPool(pool)
    params = {"target_sha256": "x", "target_rows": 3}
    starts = table_starts(emb)
    assert starts == [0, 60, 105, 175, 205, 260]
    for tasks, want in [(1, [(0, 260)]), (2, [(0, 105), (105, 260)]), (3, [(0, 60), (60, 175), (175, 260)]),
                        (5, list(zip(starts[:-1], starts[1:]))), (32, list(zip(starts[:-1], starts[1:])))]:
        assert table_spans(emb, normsim_layout(emb, "inf", params, 8192, tasks).tasks) == want


# ---------------------------------------------------------------- executors

def test_local_process_pool_matches_in_process(pool, tmp_path):
    target = target_file(tmp_path, 100)
    want = in_process(pool, target, "inf", tmp_path / "one" / "n.parquet")
    out = tmp_path / "pool" / "n.parquet"
    result = run(pool, target, "inf", out, executor="local", workers=2, tasks=3)
    assert result.normsim_tasks["tasks"] == 3 and result.normsim_tasks["ran"] == 3
    assert out.read_bytes() == want


@pytest.mark.parametrize("p, index", [("2", "flat"), ("inf", "flat"), ("inf", "ivf")])
def test_ray_matches_in_process(tmp_path, ray_session, p, index):
    # products big enough for OpenBLAS to use its threads: Ray's workers start with one (OMP_NUM_THREADS=1)
    # and give other bits unless the tasks pin the driver's count (without it, p=2 differs here)
    pool = make_embedding_dir(tmp_path / "emb", [700, 500, 600], dim=256, seed=3)
    target = target_file(tmp_path, 300, dim=256)
    out = tmp_path / "ray" / "n.parquet"
    result = run(pool, target, p, out, index, executor="ray", tasks=3)
    assert result.normsim_tasks["ran"] == 3
    assert out.read_bytes() == in_process(pool, target, p, tmp_path / "one" / "n.parquet", index)


BLAS_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from curate.run.threads import blas_thread_count, blas_threads
    data = np.load(sys.argv[1])
    before = blas_thread_count()
    with blas_threads(int(sys.argv[2])):
        inside = blas_thread_count()
        pinned = data["v"] @ data["x"]
    np.savez(sys.argv[3], pinned=pinned, before=before, inside=inside, after=blas_thread_count())
""")


def test_a_one_thread_worker_pinned_to_the_drivers_blas_threads_gives_its_bits(tmp_path):
    """Ray starts workers with one BLAS thread and OpenBLAS may round differently with another count, so a task
    pins the driver's count. Checked in a process started with OPENBLAS_NUM_THREADS=1, as Ray's workers are:
    inside the block it runs the driver's count and its product has the driver's bits. (Whether 1 and 2
    threads round differently depends on the CPU, so nothing here assumes they do.)"""
    from curate.run.threads import blas_thread_count, blas_threads

    threads = blas_thread_count()
    if not threads or threads < 2:
        pytest.skip("needs numpy on OpenBLAS with >= 2 threads")
    rng = np.random.default_rng(0)
    v, x = rng.standard_normal((512, 512)).astype(np.float32), rng.standard_normal((512, 1000)).astype(np.float32)
    np.savez(tmp_path / "in.npz", v=v, x=x)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", BLAS_SCRIPT, str(tmp_path / "in.npz"), str(threads),
                           str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    got = np.load(tmp_path / "out.npz")
    assert (int(got["before"]), int(got["inside"]), int(got["after"])) == (1, threads, 1)
    assert got["pinned"].tobytes() == (v @ x).tobytes()
    with blas_threads(1):
        assert blas_thread_count() == 1
    assert blas_thread_count() == threads


# ---------------------------------------------------------------- p = 2d, stale parts, options

def test_2d_refuses_a_rank_split_and_runs_its_map_tasks_under_executor_options(pool, tmp_path):
    want = in_process(pool, "none", "2d", tmp_path / "one" / "n.parquet")
    with pytest.raises(CurateError, match="--p 2d cannot be split into ranks"):
        run(pool, "none", "2d", tmp_path / "split" / "n.parquet", rank=0, world_size=2)
    for options in ({"workers": 2}, {"tasks": 5}):  # 5 tables: the default spans
        out = tmp_path / "-".join(options) / "n.parquet"
        result = run(pool, "none", "2d", out, **options)
        assert result.normsim_2d_tasks["tasks"] == 5 and not parts_root(out).exists()
        assert out.read_bytes() == want


def test_a_changed_target_never_reuses_old_scores(pool, tmp_path):
    out = tmp_path / "n.parquet"
    first = target_file(tmp_path, 100, seed=1)
    for rank in range(2):  # a rank split keeps its parts (another rank may still be reducing from them)
        old = run(pool, first, "inf", out, tasks=2, rank=rank, world_size=2).normsim_tasks["parts_dir"]
    second = target_file(tmp_path, 100, seed=2)
    result = run(pool, second, "inf", out, tasks=2)
    assert result.normsim_tasks["ran"] == 2 and result.normsim_tasks["parts_dir"] != old
    assert out.read_bytes() == in_process(pool, second, "inf", tmp_path / "one" / "n.parquet")
    assert list(parts_root(out).iterdir()) == [Path(old)]  # the single driver deleted only its own parts


def test_a_marked_task_whose_output_is_gone_is_a_clear_error(pool, tmp_path):
    target = target_file(tmp_path, 100)
    out = tmp_path / "n.parquet"
    run(pool, target, "inf", out, rank=0, world_size=2, tasks=4)
    next(parts_root(out).glob("normsim_inf-*/t00002.npy")).unlink()
    with pytest.raises(CurateError, match=r"t00002.npy: map output of a task marked done is missing"):
        run(pool, target, "inf", out, rank=1, world_size=2, tasks=4)


def test_option_errors(pool, tmp_path):
    target = target_file(tmp_path, 100)
    for options, message in [({"workers": 0}, "--workers"), ({"tasks": 0}, "--tasks"), ({"retries": -1}, "--retries"),
                             ({"executor": "slurm"}, "--executor 'slurm'"),
                             ({"rank": 3, "world_size": 2}, "--rank 3 --world-size 2"),
                             ({"world_size": 2}, "--world-size 2 without --rank")]:
        with pytest.raises(CurateError, match=message):
            run(pool, target, "inf", tmp_path / "n.parquet", **options)
    with pytest.raises(CurateError, match="needs a target"):
        run(pool, None, "inf", tmp_path / "n.parquet", rank=0, world_size=2)
    assert not (tmp_path / "n.parquet").exists()


# ---------------------------------------------------------------- command line

def test_cli_ranks_print_who_writes_the_table(pool, tmp_path, monkeypatch, capsys):
    target = target_file(tmp_path, 100)
    out = tmp_path / "n.parquet"
    common = ["normsim", str(pool), "--target", target, "--p", "inf", "--out", str(out),
              "--device", "cpu", "--world-size", "2", "--tasks", "3"]
    for rank in ("0", "1"):
        assert run_cli(monkeypatch, *common, "--rank", rank) in (0, None)
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "rank 0 of 2 done" in err and "1 of 3 tasks still missing" in err and "rerun without --rank" in err
    assert "260 rows" in err and "3 map tasks" in err
    assert pq.read_table(out).num_rows == 260


# ---------------------------------------------------------------- recipe

def test_recipe_runs_normsim_with_the_run_executor_settings(pool, tmp_path):
    from curate.recipe import load_recipe, plan

    def normsim_steps(target: str, p: str) -> dict:
        (tmp_path / "r.toml").write_text(f'[run]\ndir = "{tmp_path}"\nworkers = 2\ndevice = "cpu"\n'
                                         f'[normsim]\ntarget = "{target}"\np = ["{p}"]\n')
        return {step.name: step for step in plan(load_recipe(tmp_path / "r.toml"))}

    target = target_file(tmp_path, 100)
    result = normsim_steps(target, "2")["normsim:2"].run()
    assert result["normsim_tasks"]["ran"] == 5  # 5 tables, 2 worker processes
    assert Path(result["out"]).read_bytes() == in_process(pool, target, "2", tmp_path / "one" / "n.parquet")
    result = normsim_steps("none", "2d")["normsim:2d"].run()
    assert result["normsim_2d_tasks"]["workers"] == 2 and result["normsim_tasks"] is None
    assert Path(result["out"]).read_bytes() == in_process(pool, "none", "2d", tmp_path / "one2d" / "n.parquet")
