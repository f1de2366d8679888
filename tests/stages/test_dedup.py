"""`curate dedup` (SemDeDup): with one cluster it is the plain rule over the whole pool in keep order; with many
it equals the plain rule applied cluster by cluster to the stage's own assignment; map tasks give the same bytes."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import one_line_error, run_curate, run_score
from curate.config import RunOptions
from curate.io.tables import EmbeddingPool
from curate.stages.dedup import DedupConfig
from curate.stages.dedup.entry import run as dedup
from semdedup_oracle import oracle


@pytest.fixture
def pool(tmp_path):
    """Three tables whose rows are near copies of 12 directions (groups of 1-6): duplicates by construction."""
    from curate.io.tables import TeacherInfo, build_embedding_table, write_table_atomic

    rng = np.random.default_rng(3)
    base = rng.standard_normal((12, 16))
    rows = np.concatenate([b + 0.15 * rng.standard_normal((k, 16)) for b, k in zip(base, rng.integers(1, 7, 12))])
    rows = rows[rng.permutation(len(rows))]
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    teacher = TeacherInfo("test", "none", 16, 100.0)
    out = tmp_path / "emb"
    for t, part in enumerate(np.array_split(np.arange(len(rows)), 3)):
        uids = [f"{i:032x}" for i in part]
        table = build_embedding_table(uids, [str(i) for i in part], ["c"] * len(part), rows[part], rows[part])
        write_table_atomic(table, out / f"{t:05d}.parquet", meta={"teacher": teacher.to_dict()})
    return out


def read(path):
    t = pq.read_table(path)
    return {name: t.column(name).to_pylist() for name in t.schema.names}


def test_one_cluster_is_the_plain_rule_over_the_pool(pool, tmp_path):
    x = EmbeddingPool(pool).matrix("image_embedding").astype(np.float32)
    result = dedup(pool, tmp_path / "d.parquet", DedupConfig(clusters=1, eps=[0.05, 0.2]))
    table = read(tmp_path / "d.parquet")
    assert result.clusters == 1 and set(table["cluster"]) == {0}
    centroid = x.mean(axis=0)
    centroid /= np.linalg.norm(centroid)
    order = np.argsort(x @ centroid, kind="stable")  # farthest from the centroid first: the paper's keep hard
    for position, eps in enumerate((0.05, 0.2)):
        keep, dup, _ = oracle(x[order], eps, "kept")
        want_keep = np.empty(len(x), dtype=bool)
        want_keep[order] = keep
        assert result.kept[format(eps, "g")] == int(want_keep.sum())
        if position == 0:
            assert table["semdedup_keep"] == want_keep.astype(int).tolist()
            want_dup = [None] * len(x)
            for j, d in zip(order, dup):
                if d >= 0:
                    want_dup[j] = table["uid"][order[d]]
            assert table["duplicate_of"] == want_dup
    assert 0 < result.kept["0.05"] < len(x) and result.kept["0.2"] <= result.kept["0.05"]


def test_many_clusters_apply_the_rule_cluster_by_cluster(pool, tmp_path):
    x = EmbeddingPool(pool).matrix("image_embedding").astype(np.float32)
    dedup(pool, tmp_path / "d.parquet", DedupConfig(clusters=5, eps=[0.1], against="all"))
    table = read(tmp_path / "d.parquet")
    cluster, centroid_sim = np.array(table["cluster"]), np.array(table["centroid_similarity"])
    keep = np.ones(len(x), dtype=bool)
    for c in np.unique(cluster):
        members = np.flatnonzero(cluster == c)
        members = members[np.argsort(centroid_sim[members], kind="stable")]
        keep[members] = oracle(x[members], 0.1, "all")[0]
    assert table["semdedup_keep"] == keep.astype(int).tolist()


def test_map_tasks_write_the_one_task_bytes(pool, tmp_path):
    cfg = DedupConfig(clusters=4, eps=[0.05, 0.1], keep_by="random", seed=7)
    dedup(pool, tmp_path / "one.parquet", cfg, RunOptions(tasks=1))
    for opts in (RunOptions(tasks=5), RunOptions(workers=2, tasks=3)):
        out = tmp_path / f"t{opts.tasks}w{opts.workers}.parquet"
        dedup(pool, out, cfg, opts)
        assert out.read_bytes() == (tmp_path / "one.parquet").read_bytes()
        assert not (tmp_path / f"{out.name}.parts").exists()


def test_keep_by_score_keeps_the_best_scored_member_of_a_group(pool, tmp_path):
    run_score(pool, tmp_path / "s.parquet", metrics=["clipscore"], device="cpu")
    scores = read(tmp_path / "s.parquet")
    dedup(pool, tmp_path / "d.parquet", DedupConfig(clusters=1, eps=[0.2], keep_by="score",
                                                    scores=tmp_path / "s.parquet", score_column="clipscore"))
    table = read(tmp_path / "d.parquet")
    by_uid = dict(zip(scores["uid"], scores["clipscore"]))
    for uid, duplicate in zip(table["uid"], table["duplicate_of"]):
        if duplicate is not None:  # a dropped member's kept partner was visited first: its score is not lower
            assert by_uid[duplicate] >= by_uid[uid]


def test_cli_prints_the_cluster_sizes_and_every_eps(pool, tmp_path, monkeypatch, capsys):
    code, text = run_curate(monkeypatch, capsys, "dedup", pool, "--out", tmp_path / "d.parquet", "--clusters", "3",
                            "--eps", "0.01,0.05", "--eps", "0.2")
    assert code == 0, text
    assert "in 3 clusters (sizes: median" in text
    for eps in ("0.01", "0.05", "0.2"):
        assert f"eps {eps}: keeps" in text
    code, text = run_curate(monkeypatch, capsys, "dedup", pool, "--out", tmp_path / "x.parquet", "--keep-by", "score")
    assert "--keep-by score needs --scores" in one_line_error(code, text)
    code, text = run_curate(monkeypatch, capsys, "dedup", pool, "--out", tmp_path / "x.parquet", "--eps", "0.1,x")
    assert "'x' is not a number" in one_line_error(code, text)
