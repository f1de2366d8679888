"""The distributed `curate filter` (radix select in map tasks): the key and cut math against plain numpy
and Python oracles, then end to end against the in-memory filter (same uids.npy bytes, kept.parquet
rows and values, stats), in process, with 2 worker processes and on a local Ray; and its clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.errors import CurateError
from curate.metrics import topk
from curate.stages.filter import tasks as filter_tasks

from conftest import run_cli, run_filter
from filter_tables import assert_same_outputs, write_split

SPECIAL32 = np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 1.1754942e-38, -3.4028235e38, 3.4028235e38, 1.0,
                      -1.0], np.float32)


def random_values(rng, n, dtype):
    """Heavy ties (a few levels), specials (±0, ±inf, subnormals, extremes) and plain random values."""
    levels = rng.choice(np.array([-2.5, -0.0, 0.0, 0.25, 0.5, 0.75], dtype), n)
    specials = rng.choice(SPECIAL32.astype(dtype), n)
    plain = rng.standard_normal(n).astype(dtype)
    which = rng.integers(0, 3, n)
    return np.where(which == 0, levels, np.where(which == 1, specials, plain)).astype(dtype)


# ---------------------------------------------------------------- keys

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_order_keys_sort_as_the_floats_and_invert(dtype):
    rng = np.random.default_rng(0)
    values = random_values(rng, 300, dtype)
    keys = topk.order_keys(values)
    assert keys.dtype == (np.uint32 if dtype == np.float32 else np.uint64)
    a, b = values[:, None], values[None, :]
    ka, kb = keys[:, None], keys[None, :]
    assert np.array_equal(ka < kb, a < b) and np.array_equal(ka == kb, a == b)  # -0.0 == +0.0: one key
    back = np.array([topk.key_value(int(k), dtype) for k in keys], dtype)
    assert np.array_equal(back.view(keys.dtype), (values + dtype(0)).view(keys.dtype))  # bits, -0.0 as +0.0
    assert topk.key_bits(dtype) == 8 * np.dtype(dtype).itemsize


def test_histogram_prefix_and_bucket_of_rank_match_loops():
    rng = np.random.default_rng(1)
    keys = topk.order_keys(random_values(rng, 500, np.float32))
    hist = topk.digit_histogram(keys, 0)
    loop = np.zeros(topk.DIGITS, np.int64)
    for k in keys:
        loop[int(k) >> 16] += 1
    assert np.array_equal(hist, loop)
    parts = [topk.sparse_histogram(topk.digit_histogram(keys[i::3], 0)) for i in range(3)]  # three tasks' answers
    assert all(len(digits) == np.count_nonzero(counts) for digits, counts in parts)
    assert np.array_equal(topk.sum_histograms(parts), loop)
    prefix = int(keys[7]) >> 16
    inside = topk.in_prefix(keys, prefix, 16)
    assert np.array_equal(inside, np.array([int(k) >> 16 == prefix for k in keys]))
    low = topk.digit_histogram(keys[inside], 16)
    assert low.sum() == inside.sum() and low[int(keys[7]) & 0xFFFF] >= 1
    ordered = sorted((int(k) for k in keys), reverse=True)
    for need in (1, 2, 17, 250, 499, 500):
        digit, above = topk.bucket_of_rank(hist, need)
        assert digit == ordered[need - 1] >> 16  # the bucket of the need-th largest key
        assert above == sum(1 for k in keys if int(k) >> 16 > digit)
    with pytest.raises(ValueError):
        topk.bucket_of_rank(hist, 501)


def test_exact_cut_matches_a_sort_by_score_then_uid():
    rng = np.random.default_rng(2)
    n = 200
    values = random_values(rng, n, np.float64)
    high = rng.integers(0, 3, n).astype(np.uint64)  # shared high halves: the low half decides
    low = rng.permutation(n).astype(np.uint64)
    keys = topk.order_keys(values)
    ranked = sorted(range(n), key=lambda r: (-float(values[r]), int(high[r]), int(low[r])))
    for need in (1, 5, 60, 133, n):
        cut, uid_high, uid_low, dropped = topk.exact_cut(keys, high, low, need)
        last = ranked[need - 1]
        assert (cut, uid_high, uid_low) == (int(keys[last]), int(high[last]), int(low[last]))
        at_cut = [r for r in range(n) if values[r] == values[last]]
        assert dropped == len([r for r in at_cut if r not in ranked[:need]])
        # (cut, uid cut) describes exactly the chosen rows
        kept = (keys > keys.dtype.type(cut)) | ((keys == keys.dtype.type(cut))
                                                & topk.uid_at_most(high, low, uid_high, uid_low))
        assert sorted(np.flatnonzero(kept).tolist()) == sorted(ranked[:need])


# ---------------------------------------------------------------- end to end against the in-memory filter

def make_pool(tmp_path: Path, seed: int, sizes=(37, 0, 50, 41, 22)):
    """Two row-aligned tables over files of `sizes` rows: a (float32 with NaN, float64, int64 with nulls)
    and b (float32 and float16 with heavy ties)."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    uids = [rng.bytes(16).hex() for _ in range(n)]
    f32 = random_values(rng, n, np.float32)
    f32[rng.random(n) < 0.1] = np.nan
    ints = rng.integers(-3, 4, n)
    a = write_split(tmp_path / "a", uids, list(sizes), {
        "s32": pa.array(f32), "s64": pa.array(random_values(rng, n, np.float64)),
        "count": pa.array(ints, pa.int64(), mask=rng.random(n) < 0.05)})
    b = write_split(tmp_path / "b", uids, list(sizes), {"tie": pa.array(rng.integers(0, 4, n).astype(np.float32) / 4),
                                                        "half": pa.array(rng.integers(-9, 9, n).astype(np.float16) / 7)})
    return a, b


CASES = [  # keeps, mins, maxs, mode
    (["tie:0.4"], [], [], "sequential"),
    (["s32:0.5", "tie:0.2"], ["s64:-1"], [], "sequential"),
    (["s64:0.6", "count:0.3", "s32:0.1"], [], ["tie:0.75"], "sequential"),
    (["s32:0.5", "tie:0.5", "count:0.4"], ["count:-2"], [], "independent"),
    ([], ["s32:0"], ["tie:0.5"], "sequential"),
    ([], [], ["tie:-1"], "independent"),  # nothing passes the threshold: an empty subset
    (["half:0.5", "s32:0.2"], [], [], "sequential"),
]


@pytest.mark.parametrize("collect_rows", [3, None])  # 3: histogram rounds down to single keys; None: collect at once
@pytest.mark.parametrize("keeps,mins,maxs,mode", CASES)
def test_distributed_equals_in_memory(tmp_path, monkeypatch, keeps, mins, maxs, mode, collect_rows):
    if collect_rows:
        monkeypatch.setattr(filter_tasks, "DEFAULT_COLLECT_ROWS", collect_rows)
    a, b = make_pool(tmp_path, seed=len(keeps) + len(mins))
    options = dict(keep=keeps, min=mins, max=maxs, mode=mode)
    run_filter([a, b], tmp_path / "memory", **options)
    result = run_filter([a, b], tmp_path / "dist", tasks=3, **options)
    assert_same_outputs(tmp_path / "memory", tmp_path / "dist")
    assert not (tmp_path / "dist.parts").exists()  # the parts are removed after the reduce
    again = run_filter([a, b], tmp_path / "dist", tasks=2, **options)  # a rerun: same files
    assert again.kept == result.kept
    assert_same_outputs(tmp_path / "memory", tmp_path / "dist")


def test_a_rerun_reuses_the_final_parts_of_an_interrupted_run(tmp_path, monkeypatch):
    a, b = make_pool(tmp_path, seed=6)
    options = dict(keep=["s32:0.4"], max=["tie:0.5"], tasks=3)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(filter_tasks, "_write_kept", killed)  # the final map finished, the reduce did not
    with pytest.raises(KeyboardInterrupt):
        run_filter([a, b], tmp_path / "dist", **options)
    assert (tmp_path / "dist.parts").exists() and not (tmp_path / "dist" / "stats.json").exists()
    monkeypatch.undo()
    run_filter([a, b], tmp_path / "dist", **options)
    assert json.loads((tmp_path / "dist" / "stats.json").read_text())["distributed"]["ran"] == 0
    options.pop("tasks")
    run_filter([a, b], tmp_path / "memory", **options)
    assert_same_outputs(tmp_path / "memory", tmp_path / "dist")


def test_two_worker_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(filter_tasks, "DEFAULT_COLLECT_ROWS", 10)
    a, b = make_pool(tmp_path, seed=7)
    options = dict(keep=["s32:0.5", "tie:0.3"], min=["count:-3"])
    run_filter([a, b], tmp_path / "memory", **options)
    run_filter([a, b], tmp_path / "dist", workers=2, **options)
    assert_same_outputs(tmp_path / "memory", tmp_path / "dist")


def test_local_ray(tmp_path, ray_session):
    a, b = make_pool(tmp_path, seed=8)
    options = dict(keep=["tie:0.5", "s64:0.2"], mode="independent")
    run_filter([a, b], tmp_path / "memory", **options)
    run_filter([a, b], tmp_path / "dist", executor="ray", tasks=4, **options)
    assert_same_outputs(tmp_path / "memory", tmp_path / "dist")


def test_a_keep_larger_than_the_candidates_is_the_in_memory_error(tmp_path):
    a, b = make_pool(tmp_path, seed=9)
    errors = []
    for extra in ({}, {"tasks": 2}):
        with pytest.raises(CurateError) as exc:
            run_filter([a, b], tmp_path / "o", keep=["tie:0.3", "s32:0.4"], **extra)
        errors.append(str(exc.value))
    assert errors[0] == errors[1] and "step 2" in errors[0]


# ---------------------------------------------------------------- errors through the CLI

def cli_error(monkeypatch, capsys, *args) -> str:
    assert run_cli(monkeypatch, "filter", *args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    return " ".join(err.split())


def test_misaligned_tables_are_refused(tmp_path, monkeypatch, capsys):
    a, _ = make_pool(tmp_path, seed=10)
    table = pq.read_table(a / "part-00002.parquet")
    other = tmp_path / "other"
    for f in sorted(a.glob("*.parquet")):  # same files, rows of one file shuffled
        t = pq.read_table(f)
        other.mkdir(exist_ok=True)
        pq.write_table(pa.table({"uid": t.column("uid"), "z": t.column("s32")}), other / f.name)
    pq.write_table(pa.table({"uid": table.column("uid").take(list(range(49, -1, -1))),
                             "z": table.column("s32")}), other / "part-00002.parquet")
    err = cli_error(monkeypatch, capsys, a, other, "--keep", "z:0.3", "--out", tmp_path / "o", "--tasks", "2")
    assert "part-00002.parquet: row 0 of row group 0 has uid" in err and "row-aligned" in err and "in-memory filter" in err
    assert run_cli(monkeypatch, "filter", a, other, "--keep", "z:0.3", "--out", tmp_path / "o") == 0  # joins on uid
    capsys.readouterr()
    merged = tmp_path / "merged"
    merged.mkdir()
    pq.write_table(pq.read_table(other), merged / "all.parquet")  # one file where the pool has five
    err = cli_error(monkeypatch, capsys, a, merged, "--keep", "z:0.3", "--out", tmp_path / "o", "--workers", "2")
    assert "1 files with row groups of [150] rows" in err and "5 files" in err


def test_duplicate_uids_are_refused(tmp_path, monkeypatch, capsys):
    uids = [f"{i:032x}" for i in range(20)]
    scores = pa.array(np.arange(20, dtype=np.float32))
    one_file = write_split(tmp_path / "one", uids[:19] + uids[3:4], [20], {"m": scores})
    err = cli_error(monkeypatch, capsys, one_file, "--keep", "m:0.5", "--out", tmp_path / "o", "--tasks", "1")
    assert f"part-00000.parquet: uid {uids[3]} appears more than once" in err
    values = np.arange(20, dtype=np.float32)
    values[9] = 100  # row 9 repeats row 19's uid in the other file; both are in the top 10
    two_files = write_split(tmp_path / "two", uids[:9] + uids[19:] + uids[10:], [10, 10], {"m": pa.array(values)})
    err = cli_error(monkeypatch, capsys, two_files, "--keep", "m:0.5", "--out", tmp_path / "o", "--tasks", "2")
    assert f"uid {uids[19]} appears more than once (1 duplicate kept rows)" in err
    assert not (tmp_path / "o" / "stats.json").exists()


def test_rank_and_inline_normsim_are_refused(tmp_path, monkeypatch, capsys):
    a, _ = make_pool(tmp_path, seed=11)
    err = cli_error(monkeypatch, capsys, a, "--keep", "s32:0.3", "--out", tmp_path / "o", "--rank", "0",
                    "--world-size", "2")
    assert "--rank/--world-size cannot split the filter" in err and "--executor ray" in err
    err = cli_error(monkeypatch, capsys, a, "--keep", "s32:0.3", "--out", tmp_path / "o", "--workers", "2",
                    "--normsim", "inf", "--target", "imagenet-text")
    assert "run `curate normsim` first and pass its table" in err


def test_one_file_of_many_row_groups_splits_into_tasks(tmp_path, monkeypatch, capsys):
    """`curate score`/`normsim` write one file with a row group per embedding table: tasks are row groups."""
    a, b = make_pool(tmp_path, seed=12)
    single = {}
    for name, source in (("a1", a), ("b1", b)):
        single[name] = tmp_path / name
        single[name].mkdir()
        pq.write_table(pq.read_table(source), single[name] / "all.parquet", row_group_size=20)  # 150 rows: 8 groups
    options = dict(keep=["s32:0.5", "tie:0.3"], min=["count:-3"])
    run_filter([single["a1"], single["b1"]], tmp_path / "memory", **options)
    result = run_filter([single["a1"], single["b1"]], tmp_path / "dist", tasks=4, **options)
    assert_same_outputs(tmp_path / "memory", tmp_path / "dist")
    assert json.loads((tmp_path / "dist" / "stats.json").read_text())["distributed"]["tasks"] == 4
    assert result.kept > 0
    other = tmp_path / "b2"
    other.mkdir()
    pq.write_table(pq.read_table(b), other / "all.parquet", row_group_size=30)  # same rows, other row groups
    err = cli_error(monkeypatch, capsys, single["a1"], other, "--keep", "s32:0.3", "--out", tmp_path / "o",
                    "--tasks", "2")
    assert "row groups of [30, 30, 30, 30, 30] rows" in err and "row-aligned" in err
