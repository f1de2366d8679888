"""CLIPScore and negCLIPLoss: metric vs plain-loop references, hand cases, numerics, the stage and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_embedding_dir, run_score
from curate.errors import CurateError
from curate.io.tables import EmbeddingPool, read_meta
from curate.metrics.clipscore import clipscore
from curate.metrics.negclip import batch_lse, negclip, partition_batches


# ---------------------------------------------------------------- independent references (plain loops)

def reference_partition(n: int, batch_size: int, seed: int, k: int) -> list[tuple[list[int], list[int]]]:
    """The scheme as the negclip module docstring states it, rebuilt from the text: [(members, own)]."""
    b = min(batch_size, n)
    rng = np.random.default_rng([seed, k])
    perm = [int(x) for x in rng.permutation(n)]
    full = n // b
    batches = [(perm[m * b:(m + 1) * b], perm[m * b:(m + 1) * b]) for m in range(full)]
    if n % b:
        own = perm[full * b:]
        rest = perm[:full * b]
        fill = [rest[int(j)] for j in rng.choice(len(rest), b - len(own), replace=False)]
        batches.append((own + fill, own))
    return batches


def lse(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(x - top) for x in values))


def reference_negclip(image: np.ndarray, text: np.ndarray, logit_scale: float, k: int, batch_size: int,
                      seed: int) -> list[float]:
    n = len(image)
    v = image.astype(np.float64)
    t = text.astype(np.float64)
    tau = 1.0 / logit_scale

    def s(i, j):
        return float(sum(v[i, d] * t[j, d] for d in range(v.shape[1])))

    total = [0.0] * n
    for partition in range(k):
        for members, own in reference_partition(n, batch_size, seed, partition):
            for i in own:
                total[i] += lse([s(i, j) / tau for j in members]) + lse([s(j, i) / tau for j in members])
    return [s(i, i) - tau / (2 * k) * total[i] for i in range(n)]


def random_unit(n: int, d: int, rng) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------- metric vs reference

def test_clipscore_matches_loop():
    rng = np.random.default_rng(1)
    v, t = random_unit(9, 5, rng), random_unit(9, 5, rng)
    expected = [sum(float(v[i, d]) * float(t[i, d]) for d in range(5)) for i in range(9)]
    np.testing.assert_allclose(clipscore(v, t), expected, atol=1e-6)
    assert clipscore(v, t).dtype == np.float32


@pytest.mark.parametrize("n, batch_size, k, seed", [
    (23, 5, 3, 0),    # ragged last batch (23 = 4*5 + 3), K > 1
    (20, 5, 2, 7),    # N a multiple of B
    (7, 32, 2, 0),    # B > N: one batch of the whole pool
    (11, 1, 1, 3),    # B = 1: every LSE is the sample's own logit, negclip = 0
    (13, 12, 4, 5),   # one full batch + ragged batch of 1 filled with 11 others
])
def test_negclip_matches_loop(n, batch_size, k, seed):
    rng = np.random.default_rng(seed + 100)
    v, t = random_unit(n, 6, rng), random_unit(n, 6, rng)
    got = negclip(v, t, logit_scale=20.0, k=k, batch_size=batch_size, seed=seed)
    want = reference_negclip(v, t, 20.0, k, batch_size, seed)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    if batch_size == 1:
        np.testing.assert_allclose(got, 0.0, atol=1e-5)


@pytest.mark.parametrize("n, batch_size", [(23, 5), (13, 12), (9, 9), (5, 40)])
def test_partition_matches_documented_scheme(n, batch_size):
    for k in range(3):
        got = list(partition_batches(n, batch_size, 4, k))
        want = reference_partition(n, batch_size, 4, k)
        assert len(got) == len(want) == math.ceil(n / min(batch_size, n))
        owners = []
        for batch, (members, own) in zip(got, want):
            assert sorted(batch.members.tolist()) == sorted(members)
            assert len(set(members)) == len(members) == min(batch_size, n)  # same size, distinct
            assert sorted(batch.members[batch.own].tolist()) == sorted(own)
            owners += batch.members[batch.own].tolist()
            assert list(batch.members) == sorted(batch.members)
        assert sorted(owners) == list(range(n))  # every sample owns exactly one term per partition


def test_negclip_hand_case_3x3():
    """v = t = rows of I3 with entry (0,1) set to 1, row 0 renormalised: v0 = (1,1,0)/√2, v1 = e2, v2 = e3.

    S = V Vᵀ = [[1, 1/√2, 0], [1/√2, 1, 0], [0, 0, 1]] (symmetric, so row LSE = column LSE).
    logit_scale 1 (τ = 1), K = 1, B = 3: one batch, negclip_i = s_ii - LSE_j(s_ij).
      i = 0, 1: 1 - ln(e + e^{1/√2} + 1) = 1 - ln(5.746397) = -0.748573
      i = 2:    1 - ln(1 + 1 + e)        = 1 - ln(4.718282) = -0.551445
    """
    v = np.eye(3, dtype=np.float32)
    v[0, 1] = 1.0
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    got = negclip(v, v.copy(), logit_scale=1.0, k=1, batch_size=3, seed=0)
    np.testing.assert_allclose(got, [-0.748573, -0.748573, -0.551445], atol=2e-6)
    np.testing.assert_allclose(got[0], 1 - math.log(math.e + math.exp(1 / math.sqrt(2)) + 1), atol=1e-6)
    np.testing.assert_allclose(clipscore(v, v), [1.0, 1.0, 1.0], atol=1e-6)
    # With the teacher's logit_scale 100 the normalisation is dominated by the own logit:
    got100 = negclip(v, v.copy(), logit_scale=100.0, k=1, batch_size=3, seed=0)
    tau = 0.01
    want0 = 1 - tau * (100 + math.log(1 + math.exp(100 / math.sqrt(2) - 100) + math.exp(-100)))
    np.testing.assert_allclose(got100[0], want0, atol=1e-6)


def test_stable_lse_logit_scale_100_near_one_fp16():
    """Similarities ≈ 0.99 give logits ≈ 99 and exp(99) = 1e43 overflows float32; fp16 inputs too."""
    rng = np.random.default_rng(3)
    base = random_unit(1, 32, rng)
    v = base + 0.02 * rng.standard_normal((40, 32)).astype(np.float32)
    t = base + 0.02 * rng.standard_normal((40, 32)).astype(np.float32)
    v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)
    t = (t / np.linalg.norm(t, axis=1, keepdims=True)).astype(np.float16)
    s = v.astype(np.float32) @ t.astype(np.float32).T
    with np.errstate(over="ignore"):
        assert s.min() > 0.95 and not np.isfinite(np.exp(s * 100.0)).all()  # the naive route overflows
    got = negclip(v, t, logit_scale=100.0, k=2, batch_size=16, seed=1)
    assert np.isfinite(got).all()
    want = reference_negclip(v.astype(np.float32), t.astype(np.float32), 100.0, 2, 16, 1)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_batch_lse_tiles_agree():
    rng = np.random.default_rng(4)
    v = torch.from_numpy(random_unit(37, 8, rng))
    t = torch.from_numpy(random_unit(37, 8, rng))
    row_full, col_full = batch_lse(v, t, 50.0, tile_elements=37 * 37)
    row_tiled, col_tiled = batch_lse(v, t, 50.0, tile_elements=5)  # one row per tile
    logits = (v.double() @ t.double().T) * 50.0
    torch.testing.assert_close(row_full.double(), torch.logsumexp(logits, 1), atol=2e-5, rtol=0)
    torch.testing.assert_close(col_full.double(), torch.logsumexp(logits, 0), atol=2e-5, rtol=0)
    torch.testing.assert_close(row_tiled, row_full, atol=1e-5, rtol=0)
    torch.testing.assert_close(col_tiled, col_full, atol=1e-5, rtol=0)


def test_negclip_deterministic_in_seed():
    rng = np.random.default_rng(5)
    v, t = random_unit(50, 8, rng), random_unit(50, 8, rng)
    a = negclip(v, t, 100.0, k=3, batch_size=8, seed=11)
    b = negclip(v, t, 100.0, k=3, batch_size=8, seed=11)
    c = negclip(v, t, 100.0, k=3, batch_size=8, seed=12)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), d=st.integers(2, 6), batch_size=st.integers(1, 15), k=st.integers(1, 3),
       logit_scale=st.floats(1.0, 100.0), seed=st.integers(0, 2**32 - 1))
def test_negclip_never_positive(n, d, batch_size, k, logit_scale, seed):
    """Every batch holds the sample, so each LSE >= s_ii/τ and negclip <= 0 (up to float32 rounding)."""
    rng = np.random.default_rng(seed)
    v, t = random_unit(n, d, rng), random_unit(n, d, rng)
    assert (negclip(v, t, logit_scale, k=k, batch_size=batch_size, seed=seed % 1000) <= 1e-5).all()


# ---------------------------------------------------------------- the stage

def _pool_arrays(emb: Path):
    pool = EmbeddingPool(emb)
    chunks = [c for _, c in pool.iter_chunks()]
    return (np.concatenate([c["uid"] for c in chunks]), np.concatenate([c["image_embedding"] for c in chunks]),
            np.concatenate([c["text_embedding"] for c in chunks]))


def test_score_stage_multiple_files_matches_reference(tmp_path):
    emb = make_embedding_dir(tmp_path / "emb", [9, 14, 6], dim=8, seed=2, logit_scale=30.0)
    result = run_score(emb, tmp_path / "s.parquet", metrics="clipscore,negclip", k=2, batch_size=7, seed=3, device="cpu")
    assert result.rows == 29
    table = pq.read_table(tmp_path / "s.parquet")
    assert table.column_names == ["uid", "clipscore", "negclip"]
    assert str(table.schema.field("negclip").type) == "float" == str(table.schema.field("clipscore").type)
    uids, v, t = _pool_arrays(emb)
    assert table.column("uid").to_pylist() == list(uids)
    want = reference_negclip(v, t, 30.0, 2, 7, 3)  # the whole pool is partitioned, not each file
    np.testing.assert_allclose(table.column("negclip").to_numpy(), want, atol=2e-5)
    np.testing.assert_allclose(table.column("clipscore").to_numpy(), np.einsum("nd,nd->n", v, t), atol=1e-6)
    meta = read_meta(tmp_path / "s.parquet")
    assert meta["teacher"]["logit_scale"] == 30.0
    assert meta["params"]["k"] == 2 and meta["params"]["batch_size"] == 7 and meta["params"]["seed"] == 3
    # Rerun: identical bytes; B > N: one batch of all N.
    run_score(emb, tmp_path / "s2.parquet", metrics="clipscore,negclip", k=2, batch_size=7, seed=3, device="cpu")
    assert (tmp_path / "s.parquet").read_bytes() == (tmp_path / "s2.parquet").read_bytes()
    big = run_score(emb, tmp_path / "big.parquet", metrics=["negclip"], k=1, batch_size=10_000, seed=0, device="cpu")
    assert big.params["effective_batch_size"] == 29
    np.testing.assert_allclose(pq.read_table(tmp_path / "big.parquet").column("negclip").to_numpy(),
                               reference_negclip(v, t, 30.0, 1, 29, 0), atol=2e-5)


def test_score_stage_errors(tmp_path):
    emb = make_embedding_dir(tmp_path / "emb", [5], dim=4, seed=0)
    out = tmp_path / "s.parquet"
    for kwargs, message in [({"k": 0}, "--k"), ({"batch_size": 0}, "--batch-size"),
                            ({"metrics": "clipscore,foo"}, "unknown metric foo")]:
        with pytest.raises(CurateError, match=message):
            run_score(emb, out, device="cpu", **{"metrics": "negclip", **kwargs})
    make_embedding_dir(tmp_path / "mixed", [3], dim=4, seed=1, logit_scale=100.0)
    make_embedding_dir(tmp_path / "other", [3], dim=4, seed=2, logit_scale=50.0)
    (tmp_path / "other" / "shard-00000.parquet").rename(tmp_path / "mixed" / "shard-00001.parquet")
    with pytest.raises(CurateError, match="different teachers"):
        run_score(tmp_path / "mixed", out, device="cpu")
    from curate.io.tables import TeacherInfo, embedding_schema, write_table_atomic

    write_table_atomic(embedding_schema(4).empty_table(), tmp_path / "empty" / "e.parquet",
                       meta={"teacher": TeacherInfo("m", "none", 4, 100.0).to_dict(), "shard": "e.tar"})
    with pytest.raises(CurateError, match="the pool has no rows"):
        run_score(tmp_path / "empty", out, device="cpu")
    assert not out.exists()


def test_score_rejects_non_finite_embedding(tmp_path):
    from curate.io.tables import TeacherInfo, build_embedding_table, write_table_atomic

    v = np.eye(3, 4, dtype=np.float32)
    v[1, 2] = np.nan
    table = build_embedding_table(["a" * 32, "b" * 32, "c" * 32], ["0", "1", "2"], ["x"] * 3, v, np.eye(3, 4))
    write_table_atomic(table, tmp_path / "emb" / "t.parquet",
                       meta={"teacher": TeacherInfo("m", "none", 4, 100.0).to_dict(), "shard": "t.tar"})
    with pytest.raises(CurateError, match=r"t.parquet: image_embedding of row 1 \(uid b{32}\) is not finite"):
        run_score(tmp_path / "emb", tmp_path / "s.parquet", device="cpu")


def test_cli_score_and_error(tmp_path, monkeypatch, capsys):
    from curate import cli

    emb = make_embedding_dir(tmp_path / "emb", [6, 4], dim=4, seed=0)
    monkeypatch.setattr(sys, "argv", ["curate", "score", str(emb), "--metric", "clipscore,negclip", "--k", "2",
                                      "--batch-size", "4", "--out", str(tmp_path / "s.parquet"), "--device", "cpu"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code in (0, None)
    assert "10 rows" in capsys.readouterr().err
    assert pq.read_table(tmp_path / "s.parquet").num_rows == 10
    monkeypatch.setattr(sys, "argv", ["curate", "score", str(emb), "--metric", "nope", "--out", str(tmp_path / "x.parquet")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown metric nope" in err and "Traceback" not in err


# ---------------------------------------------------------------- memory

MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch

    torch.set_num_threads(1)  # this test is about memory; one thread keeps it quick on a loaded 2-core box

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    from curate.stages.score import ScoreConfig
    from curate.stages.score import entry as score

    small, big, out, cache = sys.argv[1:5]
    config = ScoreConfig(k=1, batch_size=256, seed=0, device="cpu", cache_dir=cache)
    # Warm-up on a one-table pool: one-off costs (allocator pools, thread stacks) are not the pool's.
    score.run(small, out, config)
    try:  # reset the peak (VmHWM) to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = status("VmRSS:")
    result = score.run(big, out, config)
    print(json.dumps({"before": before, "peak": status("VmHWM:"), "seconds": result.seconds}))
""")


def test_score_streams_pool_peak_rss(tmp_path):
    """100k x 128 pool: peak RSS growth of `score` stays far below the pool's size.

    Rows are read per batch (O(B·D + B²)); what does grow is O(N) columns (~2.4 MB here) and per-table
    reading buffers, kept small with 2k-row tables. The warm-up pool holds one such table, so one-off costs
    (allocator pools, thread stacks) are in the baseline.
    """
    n_rows, dim = 100_000, 128
    small = make_embedding_dir(tmp_path / "small", [2_000], dim=dim, seed=1)
    emb = make_embedding_dir(tmp_path / "emb", [2_000] * 50, dim=dim, seed=0)
    for column in ("image_embedding", "text_embedding"):  # the one-off cache build is not what this measures
        EmbeddingPool(emb).matrix(column, tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(small), str(emb), str(tmp_path / "s.parquet"),
                           str(tmp_path / "cache")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    pool_bytes = n_rows * dim * 2 * 2  # the pool as stored: fp16 image + text (twice that as float32)
    growth = stats["peak"] - stats["before"]
    assert growth < pool_bytes / 2, (growth, pool_bytes, stats)
    assert pq.read_table(tmp_path / "s.parquet").num_rows == n_rows


def test_usable_rows_fp16_bit_trick_matches_isfinite_and_nonzero():
    from curate.stages.common import usable_rows

    rng = np.random.default_rng(11)
    rows = rng.standard_normal((400, 9)).astype(np.float16)
    specials = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 6e-8, -6e-8, 65504.0], dtype=np.float16)
    mask = rng.random(rows.shape) < 0.05
    rows[mask] = rng.choice(specials, int(mask.sum()))
    rows[::37] = 0.0
    rows[5::41] = -0.0
    rows[7, :] = 6e-8  # subnormal, not zero
    want = [all(np.isfinite(float(x)) for x in row) and any(float(x) != 0.0 for x in row) for row in rows]
    assert usable_rows(rows).tolist() == want
    assert usable_rows(rows.astype(np.float32)).tolist() == want
    assert 0 < sum(want) < len(want)
