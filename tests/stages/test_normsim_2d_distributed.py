"""NormSim_2-D as rounds of map tasks (curate/stages/normsim/rounds.py): one code path for every mode, so the
in-process run, worker processes, Ray and any --tasks giving the same spans write the same bytes; every
iteration's subset is the one the plain transcription of the reference loop selects; the cut of each
iteration is `top_count_mask`'s exactly; `curate filter --keep normsim_2d:F` keeps the reference's subset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import make_embedding_dir, run_filter, run_normsim
from curate.errors import CurateError
from curate.io.tables import EmbeddingPool
from curate.io.uids import read_uid_npy, write_uid_npy
from curate.metrics import topk
from curate.metrics.normsim import keep_count, nested_sizes, normsim_2d, top_count_mask, top_fraction_mask
from curate.run.mapreduce import parts_root
from curate.config import RunOptions
from curate.stages.normsim import Normsim2dSchedule, NormsimConfig
from curate.stages.normsim import rounds as stage2d
from normsim_oracles import reference_vas_d, subsets_of_column, write_pool


pytestmark = pytest.mark.usefixtures("no_slurm")


def run(pool, out, **options):
    return run_normsim(pool, out, target="none", p="2d", cache_dir=Path(out).parent / "cache", **options)


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

    first = [stage2d.score_histogram(keys[a:b]) for a, b in spans]
    return stage2d.select_cut(first, count, collect_rows, ask), asked


@pytest.mark.parametrize("collect_rows", [0, 1, 7, 1 << 20])
@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.5, 0.77, 1.0])
def test_radix_cut_keeps_what_top_count_mask_keeps(collect_rows, fraction):
    rng = np.random.default_rng(int(fraction * 100) + collect_rows)
    n = 500
    # heavy ties (a few values, many repeats) and values that share the high 16 bits of their keys
    scores = rng.choice(np.float32([0.0, 0.25, 0.5, 0.5000001, 0.7, 1.0]), n).astype(np.float32)
    scores[::7] = rng.random(len(scores[::7]), dtype=np.float32)
    bounds = [0, 1, 90, 90, 300, 301, n]  # an empty span and one-row spans
    (cut_key, cut_row), asked = fake_rounds(scores, bounds, keep_count(n, fraction), collect_rows)
    kept = stage2d.kept_rows(topk.order_keys(scores), np.arange(n), cut_key, cut_row)
    np.testing.assert_array_equal(kept, top_count_mask(scores, keep_count(n, fraction)))
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


def test_rows_outside_the_subset_never_pass_a_cut():
    """Each iteration ranks S_i only: the other rows' keys are -inf, below every score, so a cut of |S_{i+1}|
    <= |S_i| rows never reaches them, even where their last scores are the highest."""
    scores = np.float32([0.9, 0.1, 0.8, 0.2, 0.7, 0.3])
    levels = np.int16([1, 5, 0, 5, 5, 5])  # T = 4: level 5 is S_i
    keys = stage2d.selection_keys(levels, scores, 5)
    (cut_key, cut_row), _ = fake_keys_rounds(keys, [0, 3, 6], 2, 1 << 20)
    kept = stage2d.kept_rows(keys, np.arange(6), cut_key, cut_row) & (levels == 5)
    assert np.flatnonzero(kept).tolist() == [4, 5]


def fake_keys_rounds(keys: np.ndarray, bounds: list[int], count: int, collect_rows: int):
    spans = list(zip(bounds[:-1], bounds[1:]))

    def ask(indices, query):
        return [stage2d.answer_query(keys[spans[i][0]:spans[i][1]], spans[i][0], query) for i in indices]

    first = [stage2d.score_histogram(keys[a:b]) for a, b in spans]
    return stage2d.select_cut(first, count, collect_rows, ask), None


# ---------------------------------------------------------------- the stage against the reference loop

@pytest.mark.parametrize("tasks, iterations, final_fraction, subsample, seed",
                         [(None, 10, 0.3, 0.1, 0), (1, 3, 0.5, 0.3, 1), (2, 2, 0.7, 0.5, 2), (3, 1, 0.3, 0.1, 3),
                          (7, 100, 0.2, 0.1, 4)])
def test_stage_selects_what_the_reference_loop_selects(tmp_path, tasks, iterations, final_fraction, subsample, seed):
    pool = make_embedding_dir(tmp_path / "emb", [110, 90, 150, 60], dim=6, seed=6)
    out = tmp_path / "n.parquet"
    result = run(pool, out, tasks=tasks, iterations=iterations, final_fraction=final_fraction, subsample=subsample,
                 seed=seed)
    v = pool_matrix(pool)
    got = column(out)
    assert subsets_of_column(got, iterations) == reference_vas_d(v, iterations, final_fraction, subsample, seed)
    np.testing.assert_allclose(got, normsim_2d(v, iterations, final_fraction, subsample, seed), rtol=1e-6, atol=1e-6)
    info = result.normsim_2d_tasks
    assert info["tasks"] == min(tasks or 32, 4) and info["kept_rows"] == nested_sizes(410, 410, final_fraction,
                                                                                      iterations)
    assert not parts_root(out).exists()  # the parts are deleted once the table is written


def test_blocks_smaller_than_the_tables_and_cut_short_at_their_ends(tmp_path):
    """Blocks of 7 rows over tables of 20, 13 and 9 rows: the last block of each table is short, and only
    the rows of S_i (or of the subsample) in each block are scored (or summed)."""
    pool = EmbeddingPool(make_embedding_dir(tmp_path / "emb", [20, 13, 9], dim=5, seed=8))
    pool.matrix("image_embedding", tmp_path / "cache")
    for tasks in (1, 2):
        parts, info = stage2d.normsim_2d_parts(pool, pool.files, tmp_path / "cache", tmp_path / f"parts{tasks}",
                                               Normsim2dSchedule(6, 0.3, 0.5, 1), RunOptions(tasks=tasks), block_rows=7)
        got = parts.to_array()
        assert subsets_of_column(got, 6) == reference_vas_d(pool_matrix(pool.files), 6, 0.3, 0.5, 1)
        np.testing.assert_allclose(got, normsim_2d(pool_matrix(pool.files), 6, 0.3, 0.5, 1), atol=1e-6)


def test_filter_keeps_the_reference_subset_after_a_clipscore_prefilter(tmp_path):
    """The reference's recipe: CLIPScore's top 50 %, then NormSim_2-D down to 20 % of the pool. `curate filter`
    by the normsim_2d column keeps exactly the subset the transcription of the reference loop selects."""
    from conftest import run_score

    pool = make_embedding_dir(tmp_path / "emb", [300, 250, 450], dim=8, seed=9)
    scores = tmp_path / "scores.parquet"
    run_score(pool, scores, metrics="clipscore", device="cpu")
    run_filter([scores], tmp_path / "pre", keep=["clipscore:0.5"])
    out = tmp_path / "ns.parquet"
    result = run(pool, out, iterations=40, final_fraction=0.2, prefilter=tmp_path / "pre", seed=11)
    uids = pq.read_table(out).column("uid").to_pylist()
    candidates = np.isin(uids, read_uid_npy(tmp_path / "pre" / "uids.npy"))
    want = reference_vas_d(pool_matrix(pool), 40, 0.2, 0.1, 11, candidates)
    assert subsets_of_column(column(out), 40) == want
    assert result.params["prefilter_uids"] == 500 and result.params["kept_rows"][0] == 500
    want_uids = sorted(uids[i] for i in want[-1])
    run_filter([scores, out], tmp_path / "final", keep=["normsim_2d:0.2"])
    assert sorted(read_uid_npy(tmp_path / "final" / "uids.npy")) == want_uids
    run_filter([scores, out], tmp_path / "chained", keep=["clipscore:0.5", "normsim_2d:0.2"])  # sequential
    assert sorted(read_uid_npy(tmp_path / "chained" / "uids.npy")) == want_uids
    # an unsorted uid file with repeats and uids from elsewhere gives the same table
    extra = read_uid_npy(tmp_path / "pre" / "uids.npy") + ["f" * 32, "0" * 32]
    write_uid_npy(extra, tmp_path / "shuffled.npy")
    pairs = np.load(tmp_path / "shuffled.npy")
    np.save(tmp_path / "shuffled.npy", np.concatenate([pairs[::-1], pairs[:3]]))  # 505 entries, 502 uids
    again = tmp_path / "again" / "ns.parquet"
    result = run(pool, again, iterations=40, final_fraction=0.2, prefilter=tmp_path / "shuffled.npy", seed=11)
    assert again.read_bytes() != out.read_bytes()  # the metadata names another file and count ...
    assert column(again).tobytes() == column(out).tobytes() and result.params["prefilter_uids"] == 502


def test_prefilter_errors(tmp_path):
    pool = make_embedding_dir(tmp_path / "emb", [30, 20], dim=4, seed=1)
    write_uid_npy(["a" * 32, "b" * 32], tmp_path / "strangers.npy")
    with pytest.raises(CurateError, match=r"none of its 2 uids is in the pool"):
        run(pool, tmp_path / "a" / "n.parquet", prefilter=tmp_path / "strangers.npy")
    uids = pq.read_table(sorted(Path(pool).glob("*.parquet"))[0]).column("uid").to_pylist()
    write_uid_npy(uids[:10], tmp_path / "small.npy")
    with pytest.raises(CurateError, match=r"keeps 10 rows, fewer than the final fraction's 15 .*lower "
                                          r"--final-fraction"):
        run(pool, tmp_path / "b" / "n.parquet", prefilter=tmp_path / "small.npy", final_fraction=0.3)
    np.save(tmp_path / "wrong.npy", np.arange(5))
    with pytest.raises(CurateError, match=r"wrong\.npy: uid file has dtype int64"):
        run(pool, tmp_path / "c" / "n.parquet", prefilter=tmp_path / "wrong.npy")
    for where in "abc":
        assert not (tmp_path / where / "n.parquet").exists() and not parts_root(tmp_path / where / "n.parquet"
                                                                                ).exists()


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
    run(pool, out, iterations=4, final_fraction=0.3, subsample=0.5)
    assert "nth" in calls and "collect" not in calls
    assert subsets_of_column(column(out), 4) == reference_vas_d(v, 4, 0.3, 0.5, 0)
    again = tmp_path / "workers" / "n.parquet"
    run(pool, again, workers=2, iterations=4, final_fraction=0.3, subsample=0.5)  # the cap is the driver's
    assert again.read_bytes() == out.read_bytes()


# ---------------------------------------------------------------- one code path, the same bytes

@pytest.fixture
def pool(tmp_path) -> Path:
    return make_embedding_dir(tmp_path / "emb", [60, 45, 70, 30, 55], dim=32, seed=2)


def test_in_process_workers_and_tasks_giving_the_same_spans_write_the_same_bytes(pool, tmp_path):
    schedule = {"iterations": 12, "subsample": 0.3, "seed": 5}
    want = tmp_path / "one" / "n.parquet"
    run(pool, want, **schedule)
    for name, options in [("workers", {"workers": 2}), ("tasks", {"tasks": 5}), ("more", {"tasks": 9}),
                          ("both", {"workers": 2, "tasks": 40})]:
        out = tmp_path / name / "n.parquet"
        result = run(pool, out, **schedule, **options)
        assert out.read_bytes() == want.read_bytes(), name
        assert result.normsim_2d_tasks["tasks"] == 5 and not parts_root(out).exists()


def test_a_rerun_is_idempotent_and_ranks_are_refused(pool, tmp_path, monkeypatch):
    out = tmp_path / "n.parquet"
    run(pool, out, iterations=5)
    first = out.read_bytes()
    stale = parts_root(out) / "normsim_2d-0123456789abcdef"  # a killed run's leftovers do not matter
    stale.mkdir(parents=True)
    run(pool, out, iterations=5)
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
        if task.iteration == 1 and task.name == "t00002":
            stage2d.score_file(task.parts_dir, task.iteration, task.name).unlink()
        return result

    monkeypatch.setattr(stage2d, "_score_task", lose_a_part)
    out = tmp_path / "n.parquet"
    with pytest.raises(CurateError, match=r"s1-t00002.npy: a part of this normsim --p 2d run is missing"):
        run(pool, out, iterations=5)
    assert not out.exists() and not parts_root(out).exists()


def test_ray_gives_the_in_process_bytes(tmp_path, ray_session):
    # products big enough for OpenBLAS to use its threads: Ray's workers start with one and would round
    # differently unless the tasks pin the driver's count
    pool = make_embedding_dir(tmp_path / "emb", [700, 500, 600], dim=256, seed=3)
    want = tmp_path / "one" / "n.parquet"
    run(pool, want, iterations=3)
    out = tmp_path / "ray" / "n.parquet"
    result = run(pool, out, iterations=3, executor="ray")
    assert result.normsim_2d_tasks["executor"] == "ray" and result.normsim_2d_tasks["tasks"] == 3
    assert out.read_bytes() == want.read_bytes()


def test_normsim_scores_for_the_inline_filter_runs_the_same_rounds(pool, tmp_path):
    from curate.stages.normsim.local import normsim_scores

    out = tmp_path / "n.parquet"
    run(pool, out)
    cache = tmp_path / "inline-cache"
    scores = normsim_scores(EmbeddingPool(pool), NormsimConfig(p="2d"), memmap_dir=cache)
    assert scores.dtype == np.float32 and scores.tobytes() == column(out).tobytes()
    assert [p.name for p in cache.iterdir()] == [next(cache.glob("image_embedding-*.npy")).name]  # no round files
