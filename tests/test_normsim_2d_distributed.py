"""NormSim_2-D as rounds of map tasks (curate/stages/normsim_2d.py): one code path for every mode, so the
in-process run, worker processes, Ray and any --tasks giving the same spans write the same bytes; the
scores match the plain-loop reference; the selection between rounds is `top_fraction_mask`'s exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import make_embedding_dir
from curate.errors import CurateError
from curate.io.tables import EmbeddingPool
from curate.metrics import topk
from curate.metrics.normsim import keep_count, top_fraction_mask
from curate.run.mapreduce import parts_root
from curate.stages import normsim_2d as stage2d
from curate.stages.normsim import normsim
from test_executors import ray_session  # noqa: F401 - the fixture, shared with that module
from test_normsim import reference_normsim_2d, write_pool


pytestmark = pytest.mark.usefixtures("no_slurm")


def run(pool, out, **options) -> dict:
    return normsim(pool, "none", "2d", out, cache_dir=Path(out).parent / "cache", **options)


def column(out) -> np.ndarray:
    return pq.read_table(out).column("normsim_2d").to_numpy()


def pool_matrix(pool) -> np.ndarray:
    return np.concatenate([c["image_embedding"] for _, c in EmbeddingPool(pool).iter_chunks()])


# ---------------------------------------------------------------- the selection between rounds

def fake_rounds(scores: np.ndarray, bounds: list[int], count: int, collect_rows: int):
    """`select_cut` over in-memory spans, answered as the tasks answer; returns (cut, queries asked)."""
    keys = topk.order_keys(scores)
    spans = list(zip(bounds[:-1], bounds[1:]))
    asked = []

    def ask(indices, query):
        asked.append(query[0])
        return [stage2d.answer_query(keys[spans[i][0]:spans[i][1]], spans[i][0], query) for i in indices]

    first = [stage2d.score_histogram(scores[a:b]) for a, b in spans]
    return stage2d.select_cut(first, count, collect_rows, ask), asked


@pytest.mark.parametrize("collect_rows", [0, 1, 7, 1 << 20])
@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.5, 0.77, 1.0])
def test_radix_cut_keeps_what_top_fraction_mask_keeps(collect_rows, fraction):
    rng = np.random.default_rng(int(fraction * 100) + collect_rows)
    n = 500
    # heavy ties (a few values, many repeats) and values that share the high 16 bits of their keys
    scores = rng.choice(np.float32([0.0, 0.25, 0.5, 0.5000001, 0.7, 1.0]), n).astype(np.float32)
    scores[::7] = rng.random(len(scores[::7]), dtype=np.float32)
    bounds = [0, 1, 90, 90, 300, 301, n]  # an empty span and one-row spans
    (cut_key, cut_row), asked = fake_rounds(scores, bounds, keep_count(n, fraction), collect_rows)
    kept = stage2d.kept_rows(topk.order_keys(scores), np.arange(n), cut_key, cut_row)
    np.testing.assert_array_equal(kept, top_fraction_mask(scores, fraction))
    if collect_rows == 0:  # the bucket is never collected: histograms down to one key, then its tied row
        assert asked == ["hist", "nth"]
    if collect_rows == 1 << 20:
        assert asked == ["collect"]


def test_radix_cut_all_rows_tied():
    scores = np.full(300, 0.5, np.float32)
    for count in (1, 150, 300):
        (cut_key, cut_row), asked = fake_rounds(scores, [0, 100, 200, 300], count, 1)
        assert cut_row == count - 1 and asked == ["hist", "nth"]  # lower pool index first


# ---------------------------------------------------------------- the stage against the plain loop

@pytest.mark.parametrize("tasks, iterations, final_fraction", [(None, 4, 0.3), (1, 3, 0.5), (2, 2, 0.7),
                                                               (3, 1, 0.3), (7, 5, 0.2)])
def test_stage_matches_the_loop_reference(tmp_path, tasks, iterations, final_fraction):
    pool = make_embedding_dir(tmp_path / "emb", [11, 9, 15, 6], dim=6, seed=6)
    out = tmp_path / "n.parquet"
    result = run(pool, out, tasks=tasks, iterations=iterations, final_fraction=final_fraction)
    want = reference_normsim_2d(pool_matrix(pool), iterations, final_fraction)
    np.testing.assert_allclose(column(out), want, rtol=1e-5, atol=1e-5)
    info = result["normsim_2d_tasks"]
    assert info["tasks"] == min(tasks or 32, 4) and len(info["kept_rows"]) == iterations
    assert info["kept_rows"][-1] == keep_count(41, final_fraction) or iterations == 1
    assert not parts_root(out).exists()  # the parts are deleted once the table is written


def test_duplicate_rows_with_a_tiny_collect_cap(tmp_path, monkeypatch):
    """Many exactly tied scores: the cut is found by histogram rounds and the tied row's index."""
    rng = np.random.default_rng(4)
    distinct = rng.standard_normal((3, 5)).astype(np.float32)
    distinct /= np.linalg.norm(distinct, axis=1, keepdims=True)
    pool = tmp_path / "emb"
    for number, count in enumerate([13, 8, 17]):
        write_pool(pool, distinct[rng.integers(0, 3, count)], name=f"t{number}.parquet")
    v = pool_matrix(pool)  # the fp16 values the stage reads
    calls = []
    select_cut = stage2d.select_cut

    def spy(answers, count, collect_rows, ask):
        def logged(indices, query):
            calls.append(query[0])
            return ask(indices, query)
        return select_cut(answers, count, collect_rows, logged)

    monkeypatch.setattr(stage2d, "select_cut", spy)
    monkeypatch.setattr(stage2d, "DEFAULT_COLLECT_ROWS", 1)
    out = tmp_path / "n.parquet"
    run(pool, out, iterations=4, final_fraction=0.3)
    assert "nth" in calls and "collect" not in calls
    np.testing.assert_allclose(column(out), reference_normsim_2d(v, 4, 0.3), rtol=1e-5, atol=1e-5)
    again = tmp_path / "workers" / "n.parquet"
    run(pool, again, workers=2, iterations=4, final_fraction=0.3)  # the cap is the driver's: patched here too
    assert again.read_bytes() == out.read_bytes()


# ---------------------------------------------------------------- one code path, the same bytes

@pytest.fixture
def pool(tmp_path) -> Path:
    return make_embedding_dir(tmp_path / "emb", [60, 45, 70, 30, 55], dim=32, seed=2)


def test_in_process_workers_and_tasks_giving_the_same_spans_write_the_same_bytes(pool, tmp_path):
    want = tmp_path / "one" / "n.parquet"
    run(pool, want)
    for name, options in [("workers", {"workers": 2}), ("tasks", {"tasks": 5}), ("more", {"tasks": 9}),
                          ("both", {"workers": 2, "tasks": 40})]:
        out = tmp_path / name / "n.parquet"
        result = run(pool, out, **options)
        assert out.read_bytes() == want.read_bytes(), name
        assert result["normsim_2d_tasks"]["tasks"] == 5 and not parts_root(out).exists()


def test_a_rerun_is_idempotent_and_ranks_are_refused(pool, tmp_path, monkeypatch):
    out = tmp_path / "n.parquet"
    run(pool, out)
    first = out.read_bytes()
    stale = parts_root(out) / "normsim_2d-0123456789abcdef"  # a killed run's leftovers do not matter
    stale.mkdir(parents=True)
    run(pool, out)
    assert out.read_bytes() == first and [p.name for p in parts_root(out).iterdir()] == [stale.name]
    for options in ({"rank": 0, "world_size": 2}, {"world_size": 2}):
        with pytest.raises(CurateError, match="--p 2d cannot be split into ranks.*one driver submits them all"):
            run(pool, tmp_path / "split" / "n.parquet", **options)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    with pytest.raises(CurateError, match="outside a Slurm array"):
        run(pool, tmp_path / "split" / "n.parquet")
    assert not (tmp_path / "split").exists()


def test_a_part_gone_mid_run_is_a_clear_error_and_leaves_no_parts(pool, tmp_path, monkeypatch):
    real = stage2d._score_task

    def lose_a_part(task):
        result = real(task)
        if task.round == 1 and task.name == "t00002":
            stage2d.score_file(task.parts_dir, task.round, task.name).unlink()
        return result

    monkeypatch.setattr(stage2d, "_score_task", lose_a_part)
    out = tmp_path / "n.parquet"
    with pytest.raises(CurateError, match=r"r1-t00002.npy: a part of this normsim --p 2d run is missing"):
        run(pool, out)
    assert not out.exists() and not parts_root(out).exists()


def test_ray_gives_the_in_process_bytes(tmp_path, ray_session):  # noqa: F811 - the fixture
    # products big enough for OpenBLAS to use its threads: Ray's workers start with one and would round
    # differently unless the tasks pin the driver's count
    pool = make_embedding_dir(tmp_path / "emb", [700, 500, 600], dim=256, seed=3)
    want = tmp_path / "one" / "n.parquet"
    run(pool, want, iterations=3)
    out = tmp_path / "ray" / "n.parquet"
    result = run(pool, out, iterations=3, executor="ray")
    assert result["normsim_2d_tasks"]["executor"] == "ray" and result["normsim_2d_tasks"]["tasks"] == 3
    assert out.read_bytes() == want.read_bytes()


def test_normsim_scores_for_the_inline_filter_runs_the_same_rounds(pool, tmp_path):
    from curate.stages.normsim import normsim_scores

    out = tmp_path / "n.parquet"
    run(pool, out)
    cache = tmp_path / "inline-cache"
    scores = normsim_scores(EmbeddingPool(pool), None, "2d", memmap_dir=cache)
    assert scores.dtype == np.float32 and scores.tobytes() == column(out).tobytes()
    assert [p.name for p in cache.iterdir()] == [next(cache.glob("image_embedding-*.npy")).name]  # no round files
