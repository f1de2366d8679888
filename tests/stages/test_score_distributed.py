"""Distributed negCLIPLoss: map tasks over (partition, batch) spans + a reduce give the in-process table, byte for byte.

Ranks are simulated by calling `score` once per rank in this process; the local process pool and a real local
Ray (the module-scoped `ray_session` of tests/conftest.py) run the same tasks in other processes, whose
torch thread counts differ from this one's.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import SLURM_VARS, make_embedding_dir, run_cli
from curate.errors import CurateError
from curate.io.tables import EmbeddingPool
from curate.metrics.negclip import (batch_lse, negclip_lse_sum, reduce_span_terms, span_own_count, span_terms,
                                    task_spans)
from curate.run.markers import MARKER_DIR
from curate.run.mapreduce import parts_root
from curate.stages.score import entry as score_entry
from conftest import run_score
from curate.stages.score.common import NEGCLIP_STAGE

PARAMS = {"metrics": "clipscore,negclip", "k": 3, "batch_size": 7, "seed": 3, "device": "cpu"}


pytestmark = pytest.mark.usefixtures("no_slurm")


@pytest.fixture
def pool(tmp_path) -> Path:
    # 29 rows, b = 7: 4 full batches + a ragged one of 1 per partition, 15 (partition, batch) pairs
    return make_embedding_dir(tmp_path / "emb", [9, 14, 6], dim=8, seed=2, logit_scale=30.0)


def in_process(pool: Path, out: Path, **params) -> bytes:
    result = run_score(pool, out, **{**PARAMS, **params})
    assert result.negclip_tasks is None and not parts_root(out).exists()  # the default path makes no parts
    return out.read_bytes()


def task_files(out: Path) -> dict[str, int]:
    """{task name: mtime_ns} of the map outputs beside `out`."""
    return {p.stem: p.stat().st_mtime_ns for p in parts_root(out).glob("negclip-*/t*.npy")}


def marker_names(out: Path) -> set[str]:
    return {p.stem for p in parts_root(out).glob(f"negclip-*/{MARKER_DIR}/{NEGCLIP_STAGE}/*.done")}


# ---------------------------------------------------------------- ranks

def test_three_ranks_give_the_in_process_table_byte_for_byte(pool, tmp_path):
    want = in_process(pool, tmp_path / "one" / "s.parquet")
    out = tmp_path / "ranks" / "s.parquet"
    infos = []
    for rank in range(3):
        result = run_score(pool, out, rank=rank, world_size=3, **PARAMS)
        infos.append(result.negclip_tasks)
        assert (result.out is None) == (rank < 2)  # only the rank that completes the set reduces
        assert out.exists() == (rank == 2)
    assert [i["ran"] for i in infos] == [5, 5, 5] and [i["missing"] for i in infos] == [10, 5, 0]
    assert infos[2]["reduced"] and infos[2]["device"] == "cpu"
    assert out.read_bytes() == want
    # a second reducer (any rank rerun) writes the same bytes without recomputing a task
    before = task_files(out)
    again = run_score(pool, out, rank=0, world_size=3, **PARAMS)
    assert again.negclip_tasks["ran"] == 0 and task_files(out) == before
    assert out.read_bytes() == want


def test_a_killed_rank_is_finished_by_a_rerun_that_runs_only_its_tasks(pool, tmp_path, monkeypatch):
    want = in_process(pool, tmp_path / "one" / "s.parquet")
    out = tmp_path / "ranks" / "s.parquet"
    for rank in (0, 2):  # rank 1 "was killed" before it started
        assert run_score(pool, out, rank=rank, world_size=3, **PARAMS).out is None
    spans = task_spans(29, 7, 3, 32)
    everything = {f"t{i:05d}" for i in range(len(spans))}
    rank1 = {f"t{i:05d}" for i in range(1, len(spans), 3)}
    assert marker_names(out) == set(task_files(out)) == everything - rank1
    before = task_files(out)
    # the same command without --rank/--world-size: finds the started parts, runs what is missing, reduces
    # and, as the only driver, deletes the parts once the table is written (seen here just before)
    seen = {}
    remove = score_entry.remove_single_driver_parts
    monkeypatch.setattr(score_entry, "remove_single_driver_parts",
                        lambda *a: (seen.update(task_files(out)), remove(*a)))
    result = run_score(pool, out, **PARAMS)
    info = result.negclip_tasks
    assert result.out == str(out) and info["ran"] == len(rank1) and info["already_done"] == len(everything - rank1)
    assert {name for name in seen if seen[name] != before.get(name)} == rank1  # the others were not rewritten
    assert out.read_bytes() == want
    assert not parts_root(out).exists()


def test_slurm_array_variables_choose_the_rank(pool, tmp_path, monkeypatch):
    out = tmp_path / "s.parquet"
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    for task_id in ("1", "0"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task_id)
        result = run_score(pool, out, **PARAMS)
        assert result.negclip_tasks["rank"] == int(task_id) and result.negclip_tasks["world_size"] == 2
    assert result.out == str(out)
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)
    assert out.read_bytes() == in_process(pool, tmp_path / "one.parquet")


# ---------------------------------------------------------------- executors

def test_local_process_pool_matches_in_process(pool, tmp_path):
    want = in_process(pool, tmp_path / "one" / "s.parquet")
    out = tmp_path / "pool" / "s.parquet"
    result = run_score(pool, out, executor="local", workers=2, tasks=4, **PARAMS)
    assert result.negclip_tasks["tasks"] == 4 and result.negclip_tasks["ran"] == 4
    assert out.read_bytes() == want


def test_ray_matches_local(pool, tmp_path, ray_session):
    local = tmp_path / "local" / "s.parquet"
    run_score(pool, local, executor="local", tasks=5, **PARAMS)
    out = tmp_path / "ray" / "s.parquet"
    result = run_score(pool, out, executor="ray", tasks=5, **PARAMS)
    assert result.negclip_tasks["ran"] == 5
    assert out.read_bytes() == local.read_bytes() == in_process(pool, tmp_path / "one" / "s.parquet")


# ---------------------------------------------------------------- the reduce against independent code

def loop_negclip(image: np.ndarray, text: np.ndarray, logit_scale: float, k: int, batch_size: int,
                 seed: int) -> np.ndarray:
    """negCLIPLoss by plain loops in float64, partitions rebuilt from the scheme as the docs state it."""
    n = len(image)
    b = min(batch_size, n)
    v, t = image.astype(np.float64), text.astype(np.float64)
    total = np.zeros(n)
    for partition in range(k):
        rng = np.random.default_rng([seed, partition])
        perm = rng.permutation(n)
        full = n // b
        batches = [(list(perm[m * b:(m + 1) * b]), list(perm[m * b:(m + 1) * b])) for m in range(full)]
        if n % b:
            own = list(perm[full * b:])
            fill = [perm[:full * b][j] for j in rng.choice(full * b, b - len(own), replace=False)]
            batches.append((own + fill, own))
        for members, owners in batches:
            for i in owners:
                row = [logit_scale * float(v[i] @ t[j]) for j in members]
                col = [logit_scale * float(v[j] @ t[i]) for j in members]
                total[i] += np.logaddexp.reduce(row) + np.logaddexp.reduce(col)
    s_ii = np.einsum("nd,nd->n", v, t)
    return s_ii - total / (2 * k * logit_scale)


def test_distributed_negclip_matches_a_plain_loop(tmp_path):
    emb = make_embedding_dir(tmp_path / "emb", [5, 6], dim=4, seed=9, logit_scale=20.0)
    out = tmp_path / "s.parquet"
    for rank in range(2):
        result = run_score(emb, out, metrics="negclip", k=2, batch_size=4, seed=1, device="cpu", rank=rank, world_size=2, tasks=3)
    assert result.out == str(out)
    pool = EmbeddingPool(emb)
    want = loop_negclip(pool.matrix("image_embedding").astype(np.float32),
                        pool.matrix("text_embedding").astype(np.float32), 20.0, 2, 4, 1)
    np.testing.assert_allclose(pq.read_table(out).column("negclip").to_numpy(), want, atol=2e-5)


@pytest.mark.parametrize("n, batch_size, k, tasks", [
    (23, 5, 3, 1), (23, 5, 3, 4), (23, 5, 3, 100),  # one span; spans across partitions; one pair per span
    (20, 5, 2, 3),  # no ragged batch
    (13, 12, 4, 5),  # ragged batch of 1 filled with 11 others
])
def test_reduce_of_spans_is_bitwise_the_in_process_sum(n, batch_size, k, tasks):
    rng = np.random.default_rng(n + k)
    image = rng.standard_normal((n, 6)).astype(np.float16)
    text = rng.standard_normal((n, 6)).astype(np.float16)
    spans = task_spans(n, batch_size, k, tasks)
    assert spans[0][0] == 0 and spans[-1][1] == k * -(-n // min(batch_size, n))
    assert all(a < b == c for (a, b), (c, _) in zip(spans, spans[1:] + [(spans[-1][1], None)]))  # contiguous
    stored = []
    for start, stop in spans:
        terms = np.concatenate(list(span_terms(image, text, 25.0, batch_size, 0, start, stop)))
        assert terms.dtype == np.float32 and len(terms) == span_own_count(n, batch_size, start, stop)
        stored.append(terms)
    # every sample takes exactly one term per partition
    assert sum(map(len, stored)) == k * n
    got = reduce_span_terms(n, batch_size, 0, spans, array_opener(stored))
    assert got.tobytes() == negclip_lse_sum(image, text, 25.0, k, batch_size, 0).tobytes()


def array_opener(stored: list[np.ndarray]):
    """`open_span` over in-memory arrays: take(count) hands out the next `count` terms of span `index`."""
    def opener(index):
        position = [0]

        def take(count):
            chunk = stored[index][position[0]:position[0] + count]
            position[0] += len(chunk)
            return chunk
        return take
    return opener


def test_reduce_adds_in_partition_order():
    """Terms of mixed magnitudes make float64 addition order-sensitive: the reduce must add each sample's
    terms partition by partition, as the in-process loop does (checked against a plain loop)."""
    from curate.metrics.negclip import partition_batches

    n, batch_size, k = 23, 5, 6
    spans = task_spans(n, batch_size, k, 7)
    rng = np.random.default_rng(4)
    flat = (10.0 ** rng.uniform(-9, 9, k * n)).astype(np.float32)
    bounds = np.cumsum([span_own_count(n, batch_size, a, b) for a, b in spans])[:-1]
    got = reduce_span_terms(n, batch_size, 0, spans, array_opener(np.split(flat, bounds)))
    terms_of = [[] for _ in range(n)]  # each sample's terms, partition order
    position = 0
    for partition in range(k):
        for batch in partition_batches(n, batch_size, 0, partition):
            for i in batch.members[batch.own]:
                terms_of[i].append(float(flat[position]))
                position += 1
    assert position == len(flat)
    forward = np.array([sum(terms, 0.0) for terms in terms_of])
    backward = np.array([sum(reversed(terms), 0.0) for terms in terms_of])
    assert forward.tobytes() != backward.tobytes()  # so the comparison below can detect a wrong order
    assert got.tobytes() == forward.tobytes()


# ---------------------------------------------------------------- determinism across processes and threads

THREADS_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np, torch
    from curate.metrics.negclip import batch_lse
    torch.set_num_threads(1)
    data = np.load(sys.argv[1])
    row, col = batch_lse(torch.from_numpy(data["v"]), torch.from_numpy(data["t"]), 50.0, int(data["tile"]))
    np.save(sys.argv[2], (row + col).numpy())
""")


def test_batch_lse_is_bitwise_equal_in_a_one_thread_process_and_a_two_thread_one(tmp_path):
    rng = np.random.default_rng(0)
    cases = {"v": rng.standard_normal((2048, 96)).astype(np.float16),
             "t": rng.standard_normal((2048, 96)).astype(np.float16), "tile": 1 << 20}
    np.savez(tmp_path / "in.npz", **cases)
    proc = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(tmp_path / "in.npz"), str(tmp_path / "out.npy")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        row, col = batch_lse(torch.from_numpy(cases["v"]), torch.from_numpy(cases["t"]), 50.0, cases["tile"])
    finally:
        torch.set_num_threads(threads)
    assert np.load(tmp_path / "out.npy").tobytes() == (row + col).numpy().tobytes()


# ---------------------------------------------------------------- stale and damaged parts

def test_a_changed_pool_never_reuses_old_terms(tmp_path):
    emb = make_embedding_dir(tmp_path / "emb", [9, 14, 6], dim=8, seed=2, logit_scale=30.0)
    out = tmp_path / "s.parquet"
    for rank in range(2):  # a rank split keeps its parts (another rank may still be reducing from them)
        old = run_score(emb, out, tasks=4, rank=rank, world_size=2, **PARAMS).negclip_tasks["parts_dir"]
    make_embedding_dir(tmp_path / "emb", [9, 14, 6], dim=8, seed=5, logit_scale=30.0)  # re-embedded tables
    result = run_score(emb, out, tasks=4, **PARAMS)
    assert result.negclip_tasks["ran"] == 4 and result.negclip_tasks["parts_dir"] != old
    assert out.read_bytes() == in_process(emb, tmp_path / "one" / "s.parquet")
    assert list(parts_root(out).iterdir()) == [Path(old)]  # the single driver deleted only its own parts


def test_a_marked_task_whose_output_is_gone_is_a_clear_error(pool, tmp_path):
    out = tmp_path / "s.parquet"
    run_score(pool, out, rank=0, world_size=2, tasks=4, **PARAMS)
    victim = next(parts_root(out).glob("negclip-*/t00002.npy"))
    victim.unlink()
    with pytest.raises(CurateError, match=r"t00002.npy: map output of a task marked done is missing"):
        run_score(pool, out, rank=1, world_size=2, tasks=4, **PARAMS)


def test_option_errors(pool, tmp_path):
    for options, message in [({"workers": 0}, "--workers"), ({"tasks": 0}, "--tasks"), ({"retries": -1}, "--retries"),
                             ({"executor": "slurm"}, "--executor 'slurm'"),
                             ({"rank": 3, "world_size": 2}, "--rank 3 --world-size 2")]:
        with pytest.raises(CurateError, match=message):
            run_score(pool, tmp_path / "s.parquet", **options, **PARAMS)


# ---------------------------------------------------------------- command line

def test_cli_ranks_print_who_writes_the_table(pool, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s.parquet"
    common = ["score", str(pool), "--out", str(out), "--k", "2", "--batch-size", "7", "--device", "cpu",
              "--world-size", "2", "--tasks", "3"]
    for rank in ("0", "1"):
        assert run_cli(monkeypatch, *common, "--rank", rank) in (0, None)
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "rank 0 of 2 done" in err and "1 of 3 tasks still missing" in err and "rerun without --rank" in err
    assert "29 rows" in err and "3 map tasks" in err
    assert pq.read_table(out).num_rows == 29
