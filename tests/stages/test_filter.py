"""`curate filter`: exact top fractions, tie and NaN rules, both modes, the join's errors, DataComp's uid file."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curate.errors import CurateError
from curate.io.uids import read_uid_npy, uid_halves
from curate.stages.filter.common import Bound, KeepStep, parse_keep
from curate.stages.filter.local import select

from conftest import make_embedding_dir, run_cli, run_filter


def random_uids(rng, n):
    return [rng.bytes(16).hex() for _ in range(n)]


def write_scores(path, uids, **metrics):
    pq.write_table(pa.table({"uid": pa.array(uids, pa.string()),
                             **{k: pa.array(np.asarray(v, np.float32)) for k, v in metrics.items()}}), path)
    return path


def kept_uids(out):
    return pq.read_table(Path(out) / "kept.parquet").column("uid").to_pylist()


# ---------------------------------------------------------------- an independent, plain-Python oracle

def oracle(uids, metrics, keeps, bounds=(), mode="sequential"):
    """The documented rule, written the slow obvious way: sort by (-score, uid), take ceil(F*N)."""
    n = len(uids)
    rows = list(range(n))
    for metric, kind, value in bounds:
        rows = [r for r in rows if not math.isnan(metrics[metric][r])
                and (metrics[metric][r] >= value if kind == "min" else metrics[metric][r] <= value)]
    after_bounds = rows
    chosen_sets = []
    for metric, fraction in keeps:
        count = math.ceil(Decimal(fraction) * n)
        pool = rows if mode == "sequential" else after_bounds
        ranked = sorted((r for r in pool if not math.isnan(metrics[metric][r])),
                        key=lambda r: (-float(metrics[metric][r]), uids[r]))
        assert count <= len(ranked)
        chosen = sorted(ranked[:count])
        if mode == "sequential":
            rows = chosen
        else:
            chosen_sets.append(set(chosen))
    if mode == "independent" and chosen_sets:
        rows = sorted(set.intersection(*chosen_sets))
    return rows


def run_select(uids, metrics, keeps, bounds=(), mode="sequential"):
    high, low = uid_halves(pa.array(uids), "test")
    rows, stats = select(metrics, high, low, [parse_keep(f"{m}:{f}") for m, f in keeps],
                         [Bound(m, v, k) for m, k, v in bounds], mode)
    return rows.tolist(), stats


# ---------------------------------------------------------------- counts, ties, order

def test_fraction_keeps_ceil_of_the_pool_read_as_the_written_decimal():
    rng = np.random.default_rng(0)
    uids = random_uids(rng, 10)
    scores = {"m": rng.random(10)}
    assert len(run_select(uids, scores, [("m", "0.25")])[0]) == 3  # ceil(2.5)
    assert len(run_select(uids, scores, [("m", "0.7")])[0]) == 7
    many = random_uids(rng, 100)
    assert len(run_select(many, {"m": rng.random(100)}, [("m", "0.07")])[0]) == 7  # 0.07 * 100 is 7.000000000000001 in floats
    assert len(run_select(uids, scores, [("m", "0.01")])[0]) == 1  # ceil(0.1): never zero
    assert len(run_select(uids, scores, [("m", "1")])[0]) == 10
    # the kept rows are the top scores
    assert run_select(uids, scores, [("m", "0.3")])[0] == sorted(np.argsort(-scores["m"])[:3].tolist())


def test_ties_at_the_cut_are_broken_by_uid_ascending():
    uids = [f"{i:032x}" for i in (5, 3, 9, 1, 7, 2)]
    scores = {"m": np.array([1.0, 0.5, 0.5, 0.5, 0.5, 0.2], np.float32)}
    rows, stats = run_select(uids, scores, [("m", "0.5")])  # keep 3: row 0, then 2 of the 4 tied at 0.5
    assert rows == [0, 1, 3]  # tied uids ...3 and ...1 beat ...9 and ...7
    assert stats[0].threshold == 0.5 and stats[0].ties_dropped_by_uid == 2


def test_nan_is_never_kept_and_counted():
    uids = [f"{i:032x}" for i in range(6)]
    scores = {"m": np.array([np.nan, 0.1, np.nan, 0.9, 0.5, 0.3])}
    rows, stats = run_select(uids, scores, [("m", "0.5")])
    assert rows == [3, 4, 5] and stats[0].nan == 2
    with pytest.raises(CurateError, match=r"ceil\(0.8 x 6\) = 5 rows.*only 4 rows with a score.*2 NaN"):
        run_select(uids, scores, [("m", "0.8")])


def test_sequential_ranks_what_is_left_and_independent_intersects():
    uids = [f"{i:032x}" for i in range(10)]
    a = np.arange(10, dtype=np.float64)  # best rows by a: 9, 8, 7, 6, 5
    b = np.array([9, 8, 7, 0, 0, 0, 0, 1, 2, 3], np.float64)  # best rows by b: 0, 1, 2, then 9, 8
    seq, seq_stats = run_select(uids, {"a": a, "b": b}, [("a", "0.5"), ("b", "0.2")])
    assert seq == [8, 9]  # top 5 by a, then of those the 2 (= 0.2 x 10) best by b
    assert [s.ranked for s in seq_stats] == [10, 5] and [s.kept for s in seq_stats] == [5, 2]
    ind, _ = run_select(uids, {"a": a, "b": b}, [("a", "0.5"), ("b", "0.2")], mode="independent")
    assert ind == []  # b's own top 2 of the pool (rows 0, 1) are not in a's top half
    ind, _ = run_select(uids, {"a": a, "b": b}, [("a", "0.5"), ("b", "0.6")], mode="independent")
    assert ind == [7, 8, 9]  # b's top 6 are rows 0, 1, 2, 9, 8, 7


def test_thresholds_apply_first_and_nan_never_passes():
    uids = [f"{i:032x}" for i in range(8)]
    m = np.array([0.9, 0.8, 0.7, 0.6, 0.5, np.nan, 0.3, 0.2])
    rows, stats = run_select(uids, {"m": m, "c": m[::-1].copy()}, [("m", "0.25")],
                             bounds=[("m", "max", 0.75), ("c", "min", 0.25)])
    assert [s.step for s in stats] == ["max", "min", "keep"]
    # --max m:0.75 drops rows 0, 1 and the NaN row 5; --min c:0.25 drops row 2 (c is NaN there);
    # the keep ranks rows 3, 4, 6, 7 and keeps ceil(0.25 x 8) = 2 of them
    assert rows == [3, 4]
    assert (stats[0].removed, stats[0].nan, stats[1].removed, stats[1].nan) == (3, 1, 1, 1)


def test_a_later_keep_larger_than_what_is_left_is_a_clear_error():
    rng = np.random.default_rng(1)
    uids = random_uids(rng, 20)
    with pytest.raises(CurateError, match=r"step 2.*only 6 rows.*must not exceed the one before"):
        run_select(uids, {"a": rng.random(20), "b": rng.random(20)}, [("a", "0.3"), ("b", "0.5")])


@pytest.mark.parametrize("mode", ["sequential", "independent"])
def test_select_matches_plain_python_oracle_with_ties_nan_and_thresholds(mode):
    rng = np.random.default_rng(2)
    for trial in range(20):
        n = int(rng.integers(1, 60))
        uids = random_uids(rng, n)
        metrics = {name: np.round(rng.random(n), 1) for name in ("a", "b", "c")}  # rounding makes many ties
        metrics["a"][rng.random(n) < 0.1] = np.nan
        bounds = [("c", "min", 0.2)] if trial % 2 else []
        keeps = [("a", "0.6"), ("b", "0.3")] if mode == "sequential" else [("a", "0.6"), ("b", "0.5")]
        try:
            expected = oracle(uids, metrics, keeps, bounds, mode)
        except AssertionError:  # the oracle's "not enough rows" case: select must refuse it too
            with pytest.raises(CurateError):
                run_select(uids, metrics, keeps, bounds, mode)
            continue
        assert run_select(uids, metrics, keeps, bounds, mode)[0] == expected


# ---------------------------------------------------------------- property tests

fractions = st.decimals(min_value=Decimal("0.0001"), max_value=Decimal(1), places=4)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), fraction=fractions, seed=st.integers(0, 2**16), ties=st.booleans())
def test_property_filter_size_is_exact_for_any_fraction(n, fraction, seed, ties):
    rng = np.random.default_rng(seed)
    uids = random_uids(rng, n)
    scores = rng.integers(0, 3, n).astype(np.float64) if ties else rng.random(n)
    rows, _ = run_select(uids, {"m": scores}, [("m", str(fraction))])
    assert len(rows) == math.ceil(fraction * n) == len(set(rows))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 200), fraction=fractions, seed=st.integers(0, 2**16), threshold=st.floats(0, 0.5))
def test_property_one_sequential_step_equals_independent(n, fraction, seed, threshold):
    rng = np.random.default_rng(seed)
    uids = random_uids(rng, n)
    metrics = {"m": np.round(rng.random(n), 2), "t": rng.random(n)}
    bounds = [("t", "min", threshold)]
    try:
        sequential, _ = run_select(uids, metrics, [("m", str(fraction))], bounds, "sequential")
    except CurateError:
        with pytest.raises(CurateError):
            run_select(uids, metrics, [("m", str(fraction))], bounds, "independent")
        return
    assert sequential == run_select(uids, metrics, [("m", str(fraction))], bounds, "independent")[0]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2**128 - 1), min_size=1, max_size=40))
def test_property_uid_halves_match_datacomp_split(values):
    uids = [f"{v:032x}" for v in values]
    high, low = uid_halves(pa.array(uids), "test")
    assert [(int(h), int(lo)) for h, lo in zip(high, low)] == [(int(u[:16], 16), int(u[16:32], 16)) for u in uids]


# ---------------------------------------------------------------- the stage: files, join, outputs

def test_filter_writes_datacomp_uids_kept_table_and_stats(tmp_path):
    rng = np.random.default_rng(3)
    n = 40
    uids = random_uids(rng, n)
    negclip, clipscore, normsim = rng.random(n), rng.random(n), rng.random(n)
    a = write_scores(tmp_path / "scores.parquet", uids, negclip=negclip, clipscore=clipscore)
    perm = rng.permutation(n)  # the second table lists the same uids in another order
    b = write_scores(tmp_path / "ns.parquet", [uids[i] for i in perm], normsim_inf=normsim[perm])
    out = tmp_path / "subset"
    result = run_filter([a, b], out, keep=["negclip:0.3", "normsim_inf:0.2"])
    f32 = {"negclip": negclip.astype(np.float32), "normsim_inf": normsim.astype(np.float32)}
    expected_rows = oracle(uids, f32, [("negclip", "0.3"), ("normsim_inf", "0.2")])
    assert result.pool == n and result.kept == 8 == len(expected_rows)
    # kept.parquet: uid + every metric, pool order, values joined by uid
    kept = pq.read_table(out / "kept.parquet")
    assert kept.column_names == ["uid", "negclip", "clipscore", "normsim_inf"]
    assert kept.column("uid").to_pylist() == [uids[r] for r in expected_rows]
    np.testing.assert_array_equal(kept.column("normsim_inf").to_numpy(), f32["normsim_inf"][expected_rows])
    # uids.npy: DataComp's conversion, done by hand: (int(uid[:16], 16), int(uid[16:32], 16)), sorted
    arr = np.load(out / "uids.npy")
    plain = sorted((int(u[:16], 16), int(u[16:32], 16)) for u in kept.column("uid").to_pylist())
    assert arr.dtype == np.dtype("u8,u8") and [tuple(map(int, r)) for r in arr.tolist()] == plain
    assert sorted(read_uid_npy(out / "uids.npy")) == sorted(kept.column("uid").to_pylist())
    stats = json.loads((out / "stats.json").read_text())
    assert stats["pool"] == n and stats["kept"] == 8 and stats["mode"] == "sequential"
    assert [(s["metric"], s["kept"], s["removed"]) for s in stats["steps"]] == [("negclip", 12, 28), ("normsim_inf", 8, 4)]
    assert stats["steps"][0]["threshold"] == pytest.approx(float(np.sort(f32["negclip"])[-12]))
    assert stats["metrics"]["normsim_inf"]["table"] == str(b)
    # a rerun writes the same bytes
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    run_filter([a, b], out, keep=["negclip:0.3", "normsim_inf:0.2"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_a_directory_of_tables_is_one_table(tmp_path):
    rng = np.random.default_rng(4)
    uids, scores = random_uids(rng, 30), rng.random(30)
    (tmp_path / "parts").mkdir()
    write_scores(tmp_path / "parts" / "0001.parquet", uids[:10], m=scores[:10])
    write_scores(tmp_path / "parts" / "0002.parquet", uids[10:], m=scores[10:])
    write_scores(tmp_path / "whole.parquet", uids, m=scores)
    run_filter([tmp_path / "parts"], tmp_path / "a", keep=["m:0.5"])
    run_filter([tmp_path / "whole.parquet"], tmp_path / "b", keep=["m:0.5"])
    assert kept_uids(tmp_path / "a") == kept_uids(tmp_path / "b")


def test_inline_normsim_is_joined_by_uid(tmp_path, monkeypatch):
    import curate.stages.normsim.local as normsim_module

    emb = make_embedding_dir(tmp_path / "emb", [7, 5], dim=8, seed=5)
    from curate.io.tables import EmbeddingPool

    pool_uids = EmbeddingPool(emb).column("uid").tolist()
    rng = np.random.default_rng(5)
    order = rng.permutation(len(pool_uids))
    negclip = rng.random(len(pool_uids))
    table = write_scores(tmp_path / "s.parquet", [pool_uids[i] for i in order], negclip=negclip)
    calls = []

    def fake_normsim(pool, cfg, info=None):  # stands in for curate.stages.normsim.local.normsim_scores
        calls.append((cfg.target, cfg.p))
        return np.arange(pool.n_rows, dtype=np.float32)  # pool order

    monkeypatch.setattr(normsim_module, "normsim_scores", fake_normsim)
    out = tmp_path / "sub"
    run_filter([table], out, keep=["normsim_inf:0.25"], normsim="inf", target="T", emb=emb)
    assert calls == [("T", "inf")]
    assert sorted(kept_uids(out)) == sorted(pool_uids[-3:])  # the 3 highest fake scores are the last pool rows
    with pytest.raises(CurateError, match="--emb"):
        run_filter([table], out, keep=["negclip:0.5"], normsim="inf", target="T")


def test_inline_normsim_end_to_end_with_the_embedding_dir_recorded_by_score(tmp_path):
    """Real NormSim_inf inline, --emb taken from the score table's `source`, checked against a plain loop."""
    from curate.io.tables import EmbeddingPool, vectors_to_numpy, write_table_atomic

    emb = make_embedding_dir(tmp_path / "emb", [6, 6], dim=8, seed=6)
    target = make_embedding_dir(tmp_path / "target", [4], dim=8, seed=7)
    pool = EmbeddingPool(emb)
    uids = pool.column("uid").tolist()
    scores = pa.table({"uid": pa.array(uids), "negclip": pa.array(np.linspace(0, 1, 12, dtype=np.float32))})
    write_table_atomic(scores, tmp_path / "scores.parquet", meta={"stage": "score", "source": str(emb)})
    out = tmp_path / "sub"
    run_filter([tmp_path / "scores.parquet"], out, keep=["negclip:0.5", "normsim_inf:0.25"], normsim="inf",
                target=str(target))
    v = vectors_to_numpy(pq.read_table(emb / "shard-00000.parquet").column("image_embedding"))
    v = np.concatenate([v, vectors_to_numpy(pq.read_table(emb / "shard-00001.parquet").column("image_embedding"))])
    x = vectors_to_numpy(pq.read_table(target / "shard-00000.parquet").column("image_embedding"))
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    plain = [max(abs(float(np.dot(v[i], x[j]))) for j in range(len(x))) for i in range(len(v))]
    top_half = range(6, 12)  # negclip rises with the row: the top half is rows 6..11
    expected = sorted(sorted(top_half, key=lambda r: -plain[r])[:3])
    kept = pq.read_table(out / "kept.parquet")
    assert kept.column("uid").to_pylist() == [uids[r] for r in expected]
    np.testing.assert_allclose(kept.column("normsim_inf").to_numpy(), [plain[r] for r in expected], atol=2e-3)


# ---------------------------------------------------------------- bad inputs

def test_unknown_metric_lists_the_available_ones(tmp_path):
    t = write_scores(tmp_path / "s.parquet", [f"{i:032x}" for i in range(4)], negclip=[1, 2, 3, 4], clipscore=[1, 1, 1, 1])
    with pytest.raises(CurateError, match=r"unknown metric 'normsim_inf'.*clipscore, negclip"):
        run_filter([t], tmp_path / "o", keep=["normsim_inf:0.2"])


def test_duplicate_uids_name_the_file_and_an_example(tmp_path):
    uids = [f"{i:032x}" for i in range(5)] + [f"{3:032x}"]
    t = write_scores(tmp_path / "dup.parquet", uids, m=range(6))
    with pytest.raises(CurateError, match=rf"dup.parquet: uid {3:032x} appears more than once"):
        run_filter([t], tmp_path / "o", keep=["m:0.5"])
    good = write_scores(tmp_path / "good.parquet", uids[:5] + [f"{9:032x}"], n=range(6))
    with pytest.raises(CurateError, match="dup.parquet.*more than once"):  # a duplicate in a joined table too
        run_filter([good, t], tmp_path / "o", keep=["n:0.5"])


def test_tables_with_different_uids_say_which_and_how_many(tmp_path):
    uids = [f"{i:032x}" for i in range(6)]
    a = write_scores(tmp_path / "a.parquet", uids, m=range(6))
    b = write_scores(tmp_path / "b.parquet", uids[:4] + [f"{7:032x}"], n=range(5))
    with pytest.raises(CurateError, match=r"b.parquet: its uids differ.*2 pool uids are missing.*1 of its 5 uids"):
        run_filter([a, b], tmp_path / "o", keep=["m:0.5"])


def test_same_metric_in_two_tables_is_an_error(tmp_path):
    uids = [f"{i:032x}" for i in range(4)]
    a = write_scores(tmp_path / "a.parquet", uids, m=range(4))
    b = write_scores(tmp_path / "b.parquet", uids, m=range(4))
    # files with the same columns are read as the parts of one table (a shell glob); the same uids in both
    with pytest.raises(CurateError, match="appears more than once .* give each metric once"):
        run_filter([a, b], tmp_path / "o", keep=["m:0.5"])


@pytest.mark.parametrize("uid_column, message", [
    (pa.array(np.arange(4, dtype=np.int64)), "column `uid` has type int64"),
    (pa.array(["abc", "def", "0" * 32, "1" * 32]), "uid 'abc' is not 32 lowercase hex"),
    (pa.array(["G" * 32, "0" * 32, "1" * 32, "2" * 32]), "is not 32 lowercase hex"),
    (pa.array([None, "0" * 32, "1" * 32, "2" * 32], pa.string()), "1 rows have no uid"),
])
def test_bad_uid_columns_are_clear_errors(tmp_path, uid_column, message):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"uid": uid_column, "m": pa.array(np.arange(4.0))}), path)
    with pytest.raises(CurateError, match=f"bad.parquet: .*{message}"):
        run_filter([path], tmp_path / "o", keep=["m:0.5"])


def test_no_uid_column_and_not_parquet_are_clear_errors(tmp_path):
    pq.write_table(pa.table({"id": ["x"], "m": [1.0]}), tmp_path / "nouid.parquet")
    with pytest.raises(CurateError, match="nouid.parquet: no `uid` column"):
        run_filter([tmp_path / "nouid.parquet"], tmp_path / "o", keep=["m:0.5"])
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(CurateError, match="junk.parquet: not a readable Parquet"):
        run_filter([tmp_path / "junk.parquet"], tmp_path / "o", keep=["m:0.5"])


@pytest.mark.parametrize("spec, message", [
    ("m:0", r"fraction must be in \(0, 1\]"), ("m:1.5", r"fraction must be in \(0, 1\]"),
    ("m:-0.1", r"fraction must be in \(0, 1\]"), ("m:abc", "is not a number"), ("m:nan", "is not a number"),
    ("m", "expected METRIC:VALUE"),
])
def test_bad_fractions_are_clear_errors(spec, message):
    with pytest.raises(CurateError, match=message):
        parse_keep(spec)


def test_empty_pool_and_empty_selection_are_errors(tmp_path):
    t = write_scores(tmp_path / "empty.parquet", [], m=[])
    with pytest.raises(CurateError, match="empty.parquet: the score table has no rows"):
        run_filter([t], tmp_path / "o", keep=["m:0.5"])
    with pytest.raises(CurateError, match="nothing to select"):
        run_filter([t], tmp_path / "o")


def test_keep_step_count_is_exact_fraction_arithmetic():
    assert KeepStep("m", Fraction(7, 100)).count(100) == 7
    assert KeepStep("m", Fraction(3, 10)).count(100_000_001) == 30_000_001  # ceil(30000000.3)


# ---------------------------------------------------------------- CLI

def test_cli_filter_and_its_one_line_error(tmp_path, monkeypatch, capsys):
    t = write_scores(tmp_path / "s.parquet", [f"{i:032x}" for i in range(10)], negclip=np.arange(10.0))
    assert run_cli(monkeypatch, "filter", t, "--keep", "negclip:0.3", "--out", tmp_path / "o") == 0
    assert kept_uids(tmp_path / "o") == [f"{i:032x}" for i in (7, 8, 9)]
    assert "kept 3 of 10" in capsys.readouterr().err
    assert run_cli(monkeypatch, "filter", t, "--keep", "negclip:0", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
