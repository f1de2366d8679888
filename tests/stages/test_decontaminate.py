"""`curate decontaminate`: the nearest evaluation image of every pool row equals a brute-force numpy search,
planted copies are all flagged, ranks and map tasks give the one-task bytes."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import make_embedding_dir, one_line_error, run_curate
from embedding_dirs import write_embedding_dir
from curate.config import RunOptions
from curate.io.tables import EmbeddingPool
from curate.stages.decontaminate import DecontaminateConfig
from curate.stages.decontaminate.entry import run as decontaminate


@pytest.fixture
def world(tmp_path):
    """A pool of 60 rows and an evaluation set of 20 rows, 5 of which are planted in the pool (same vectors)."""
    pool = make_embedding_dir(tmp_path / "pool", [25, 35], dim=8, seed=1)
    x = EmbeddingPool(pool).matrix("image_embedding").astype(np.float32)
    rng = np.random.default_rng(2)
    evals = rng.standard_normal((20, 8)).astype(np.float32)
    planted = np.array([3, 17, 30, 41, 59])
    evals[[0, 5, 9, 12, 19]] = x[planted]
    evals /= np.linalg.norm(evals, axis=1, keepdims=True)
    np.save(tmp_path / "eval.npy", evals)
    return pool, tmp_path / "eval.npy", planted


@pytest.mark.parametrize("threshold, flagged", [(0.95, 1), (0.97, 0)])
def test_the_hand_example_of_the_formulas(tmp_path, threshold, flagged):
    # docs/formulas.md: x = (1, 0) against (0.6, 0.8) and (0.96, 0.28): nearest the second, cosine 0.96
    pool = write_embedding_dir(tmp_path / "pool", np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))
    np.save(tmp_path / "eval.npy", np.array([[0.6, 0.8], [0.96, 0.28]], np.float32))
    decontaminate(pool, [tmp_path / "eval.npy"], tmp_path / "c.parquet", DecontaminateConfig(threshold=threshold))
    table = pq.read_table(tmp_path / "c.parquet").to_pylist()
    assert table[0]["nearest_uid"] == "eval.npy#1" and table[0]["similarity"] == pytest.approx(0.96, abs=1e-6)
    assert table[0]["contaminated"] == flagged


def test_nearest_matches_brute_force_and_planted_copies_are_flagged(world, tmp_path):
    pool, evals_path, planted = world
    result = decontaminate(pool, [evals_path], tmp_path / "c.parquet", DecontaminateConfig(threshold=0.999))
    table = pq.read_table(tmp_path / "c.parquet").to_pydict()
    x = EmbeddingPool(pool).matrix("image_embedding").astype(np.float64)
    evals = np.load(evals_path).astype(np.float64)
    evals /= np.linalg.norm(evals, axis=1, keepdims=True)
    sims = x @ evals.T
    np.testing.assert_allclose(table["similarity"], sims.max(axis=1), atol=1e-5)
    assert table["nearest_uid"] == [f"eval.npy#{i}" for i in sims.argmax(axis=1)]
    assert np.flatnonzero(table["contaminated"]).tolist() == planted.tolist()
    assert result.contaminated == 5 and sum(c for _, _, c in result.histogram) == 60


def test_ranks_and_map_tasks_give_the_one_task_bytes(world, tmp_path):
    pool, evals_path, _ = world
    decontaminate(pool, [evals_path], tmp_path / "one.parquet", opts=RunOptions(tasks=1))
    for rank in range(3):
        result = decontaminate(pool, [evals_path], tmp_path / "ranks.parquet",
                               opts=RunOptions(tasks=4, rank=rank, world_size=3))
    assert result.out is not None  # the last rank to finish reduces
    assert (tmp_path / "ranks.parquet").read_bytes() == (tmp_path / "one.parquet").read_bytes()
    decontaminate(pool, [evals_path], tmp_path / "w.parquet", opts=RunOptions(workers=2, tasks=3))
    assert (tmp_path / "w.parquet").read_bytes() == (tmp_path / "one.parquet").read_bytes()


def test_an_embedding_directory_set_names_its_uids_and_ivf_finds_the_copies(world, tmp_path):
    from curate.io.tables import build_embedding_table, read_meta, write_table_atomic

    pool, _, _ = world
    source = EmbeddingPool(pool)
    first = source.column("uid")[:10].tolist()
    x = source.matrix("image_embedding")[:10]
    other = tmp_path / "other"
    write_table_atomic(build_embedding_table(first, first, ["c"] * 10, x, x), other / "0.parquet",
                       meta={"teacher": read_meta(source.files[0])["teacher"]})  # the pool's first 10 rows
    decontaminate(pool, [other], tmp_path / "c.parquet", DecontaminateConfig(threshold=0.999, index="ivf", nlist=2,
                                                                             nprobe=2))
    table = pq.read_table(tmp_path / "c.parquet").to_pydict()
    assert table["nearest_uid"][:10] == first and sum(table["contaminated"]) == 10


def test_cli_errors(world, tmp_path, monkeypatch, capsys):
    pool, evals_path, _ = world
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.ones((3, 5), np.float32))
    code, text = run_curate(monkeypatch, capsys, "decontaminate", pool, "--against", wrong, "--out", tmp_path / "c.p")
    assert "dimension 5" in one_line_error(code, text)
    code, text = run_curate(monkeypatch, capsys, "decontaminate", pool, "--against", evals_path,
                            "--out", tmp_path / "c.parquet", "--threshold", "1.5")
    assert "--threshold 1.5" in one_line_error(code, text)
    code, text = run_curate(monkeypatch, capsys, "decontaminate", pool, "--against", evals_path,
                            "--out", tmp_path / "c.parquet", "--threshold", "0.999")
    assert code == 0 and "5 of 60 pool samples" in text, text
