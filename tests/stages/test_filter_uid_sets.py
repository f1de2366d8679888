"""curate filter with drop tables (dedup, decontaminate) and uid lists (--include-uids, --union, --exclude-uids):
both filters against a set-algebra oracle written from the rule in curate/stages/filter/uid_sets.py."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.io.uids import DATACOMP_DTYPE, find_pairs, read_uid_npy, uids_to_pairs, write_uid_npy

from conftest import one_line_error, run_curate, run_filter
from filter_tables import assert_same_outputs, write_split

SIZES = [30, 0, 45, 25]


def make_world(tmp_path, seed):
    """A pool of row-aligned tables: scores (s), a dedup table and a contamination table, plus the uids."""
    rng = np.random.default_rng(seed)
    n = sum(SIZES)
    uids = [rng.bytes(16).hex() for _ in range(n)]
    score = rng.integers(0, 20, n).astype(np.float32)  # ties: the uid tie-break matters
    keep = (rng.random(n) > 0.3).astype(np.int8)
    contaminated = (rng.random(n) < 0.15).astype(np.int8)
    scores = write_split(tmp_path / "scores", uids, SIZES, {"s": pa.array(score)})
    dedup = write_split(tmp_path / "dedup", uids, SIZES, {
        "cluster": pa.array(rng.integers(0, 4, n).astype(np.int32)), "similarity": pa.array(rng.random(n, np.float32)),
        "semdedup_keep": pa.array(keep)})
    contam = write_split(tmp_path / "contam", uids, SIZES, {
        "similarity": pa.array(rng.random(n, np.float32)), "contaminated": pa.array(contaminated)})
    return uids, score, keep.astype(bool), contaminated.astype(bool), scores, dedup, contam


def oracle(uids, score, allowed, fraction, include, union, exclude):
    """The rule in words: top ceil(F*N) by score (ties: smaller uid) among allowed rows; then ∩ each include,
    ∪ (each union ∩ allowed), − each exclude; as Python sets of uid strings."""
    count = -(-int(fraction * 100) * len(uids) // 100)
    ranked = sorted((u for u, ok in zip(uids, allowed) if ok), key=lambda u: (-score[uids.index(u)], u))
    selected = set(ranked[:count])
    pool_allowed = {u for u, ok in zip(uids, allowed) if ok}
    for listed in include:
        selected &= set(listed)
    for listed in union:
        selected |= set(listed) & pool_allowed
    for listed in exclude:
        selected -= set(listed)
    return selected


def foreign(rng, k):
    return [rng.bytes(16).hex() for _ in range(k)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drops_and_uid_lists_match_the_set_algebra_oracle_in_memory_and_in_tasks(tmp_path, seed):
    uids, score, keep, contaminated, scores, dedup, contam = make_world(tmp_path, seed)
    rng = np.random.default_rng(100 + seed)
    pick = lambda k: list(rng.choice(uids, k, replace=False))  # noqa: E731
    include = [pick(70) + foreign(rng, 5)]
    union = [pick(12) + foreign(rng, 3), pick(8)]
    exclude = [pick(10) + foreign(rng, 2)]
    files = {}
    for name, lists in (("include", include), ("union", union), ("exclude", exclude)):
        files[name] = []
        for number, listed in enumerate(lists):
            path = tmp_path / f"{name}{number}.npy"
            write_uid_npy(listed, path)
            files[name].append(str(path))
    options = dict(keep=["s:0.3"], drop_duplicates=str(dedup), drop_contaminated=str(contam),
                   include_uids=files["include"], union=files["union"], exclude_uids=files["exclude"])
    memory = run_filter([scores], tmp_path / "memory", **options)
    tasks = run_filter([scores], tmp_path / "tasks", tasks=3, **options)
    assert_same_outputs(tmp_path / "memory", tmp_path / "tasks")

    want = oracle(uids, score, keep & ~contaminated, 0.3, include, union, exclude)
    assert set(read_uid_npy(tmp_path / "memory" / "uids.npy")) == want
    assert memory.kept == tasks.kept == len(want)
    steps = json.loads((tmp_path / "memory" / "stats.json").read_text())["steps"]
    assert [s["step"] for s in steps] == ["drop_duplicates", "drop_contaminated", "keep", "include_uids", "union",
                                          "union", "exclude_uids"]
    assert steps[0]["removed"] == int((~keep).sum())
    assert steps[1]["removed"] == int((keep & contaminated).sum())
    assert steps[2]["kept"] == -(-3 * len(uids) // 10)
    assert [s["not_in_pool"] for s in steps[3:]] == [5, 3, 0, 2]
    assert [s["listed"] for s in steps[3:]] == [75, 15, 8, 12]
    for before, after in zip(steps[3:], steps[4:]):
        assert after["ranked"] == before["kept"]  # each list step starts from what the one before left
    assert steps[-1]["kept"] == len(want)
    allowed = {u for u, k, c in zip(uids, keep, contaminated) if k and not c}
    before_union = oracle(uids, score, keep & ~contaminated, 0.3, include, [], [])
    # listed pool rows a union leaves out because a drop step removed them (a dropped row is never selected)
    assert steps[4]["refused_dropped"] == len(set(union[0]) & set(uids) - allowed - before_union)
    assert steps[4]["added"] == len(set(union[0]) & allowed - before_union)


def test_a_hand_checkable_combination(tmp_path):
    # pool a..f with scores 6..1; keep the top half (a, b, c); a is a semantic duplicate, so b, c, d are kept
    uids = [f"{c:0>32}" for c in "abcdef"]
    write_split(tmp_path / "scores", uids, [6], {"s": pa.array(np.arange(6, 0, -1, dtype=np.float32))})
    write_split(tmp_path / "dedup", uids, [6], {"semdedup_keep": pa.array(np.array([0, 1, 1, 1, 1, 1], np.int8))})
    write_uid_npy([uids[1], uids[2], uids[3], uids[4]], tmp_path / "i.npy")   # ∩ {b, c, d, e} -> b, c, d
    write_uid_npy([uids[0], uids[5], "f" * 32], tmp_path / "u.npy")          # ∪ {a, f} but a is dropped -> + f
    write_uid_npy([uids[2]], tmp_path / "x.npy")                             # − {c}
    result = run_filter([tmp_path / "scores"], tmp_path / "out", keep=["s:0.5"],
                        drop_duplicates=str(tmp_path / "dedup"), include_uids=[str(tmp_path / "i.npy")],
                        union=[str(tmp_path / "u.npy")], exclude_uids=[str(tmp_path / "x.npy")])
    assert read_uid_npy(tmp_path / "out" / "uids.npy") == [uids[1], uids[3], uids[5]]
    union = next(s for s in result.steps if s.step == "union")
    assert (union.ranked, union.kept, union.added, union.refused_dropped, union.not_in_pool) == (3, 4, 1, 1, 1)
    kept = pq.read_table(tmp_path / "out" / "kept.parquet")
    assert kept.column("uid").to_pylist() == [uids[1], uids[3], uids[5]]  # pool order


def test_lists_alone_and_list_formats(tmp_path):
    uids, *_, scores, dedup, _ = make_world(tmp_path, 5)
    # a DataComp file unsorted and with a repeat, a `curate filter` --out directory and a Parquet table
    pairs = uids_to_pairs(uids[:10] + uids[:3])[::-1]
    np.save(tmp_path / "raw.npy", pairs)
    run_filter([scores], tmp_path / "first", include_uids=[str(tmp_path / "raw.npy")])
    assert sorted(read_uid_npy(tmp_path / "first" / "uids.npy")) == sorted(uids[:10])
    pq.write_table(pa.table({"uid": uids[5:20]}), tmp_path / "t.parquet")
    run_filter([scores], tmp_path / "second", include_uids=[str(tmp_path / "first")],
               union=[str(tmp_path / "t.parquet")], tasks=2)
    assert sorted(read_uid_npy(tmp_path / "second" / "uids.npy")) == sorted(uids[:20])


def test_bad_drop_tables_and_lists_are_one_line_errors(tmp_path, monkeypatch, capsys):
    uids, *_, scores, dedup, contam = make_world(tmp_path, 3)
    code, text = run_curate(monkeypatch, capsys, "filter", scores, "--out", tmp_path / "o", "--keep", "s:0.5",
                            "--drop-duplicates", contam)
    assert "no numeric `semdedup_keep` column" in one_line_error(code, text) and "curate dedup" in text
    code, text = run_curate(monkeypatch, capsys, "filter", scores, "--out", tmp_path / "o", "--keep", "s:0.5",
                            "--union", tmp_path / "missing.npy")
    assert "missing.npy: no such uid list" in one_line_error(code, text)
    np.save(tmp_path / "wrong.npy", np.arange(4))
    code, text = run_curate(monkeypatch, capsys, "filter", scores, "--out", tmp_path / "o", "--keep", "s:0.5",
                            "--exclude-uids", tmp_path / "wrong.npy")
    assert "wrong.npy: uid file has dtype int64" in one_line_error(code, text)


def test_the_cli_reports_listed_uids_that_are_not_in_the_pool(tmp_path, monkeypatch, capsys):
    uids, *_, scores, _, _ = make_world(tmp_path, 4)
    write_uid_npy(uids[:4] + ["0" * 32, "1" * 32], tmp_path / "dfn.npy")
    code, text = run_curate(monkeypatch, capsys, "filter", scores, "--out", tmp_path / "o", "--keep", "s:0.1",
                            "--union", tmp_path / "dfn.npy")
    assert code == 0, text
    assert "--union" in text and "2 of its 6 uids are not in the pool" in text


def test_find_pairs_with_shared_high_halves_and_misses():
    high = np.array([1, 1, 1, 2, 5, 5], np.uint64)
    low = np.array([3, 7, 9, 0, 1, 2], np.uint64)
    queries_high = np.array([1, 1, 1, 2, 5, 4, 9, 0], np.uint64)
    queries_low = np.array([7, 8, 3, 0, 2, 0, 0, 3], np.uint64)
    assert find_pairs(high, low, queries_high, queries_low).tolist() == [1, -1, 0, 3, 5, -1, -1, -1]
    assert find_pairs(high[:0], low[:0], queries_high, queries_low).tolist() == [-1] * 8
    pairs = np.zeros(0, DATACOMP_DTYPE)
    assert find_pairs(pairs["f0"], pairs["f1"], high, low).tolist() == [-1] * 6
