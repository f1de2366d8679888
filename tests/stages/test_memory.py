"""Streaming memory bound: score (negclip) and normsim never hold the pool in RAM.

A 400k × 128 pool (fp16 image + text: ~205 MB as stored, twice that as float32) is scored in a fresh
process; peak RSS growth (VmHWM after a reset, minus RSS before the call) must stay a small fraction of
the pool (less than one of its two fp16 columns). One-off costs (allocator arenas, BLAS and torch thread
buffers, imports) are paid by a warm-up on a one-table pool first. The 10 M × 512 measurement is in bench/ (`make bench`), not here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import make_embedding_dir

ROWS_PER_FILE, FILES, DIM = 50_000, 8, 128

SCRIPT = textwrap.dedent("""
    import json, sys
    from curate.config import configure
    from curate.stages.normsim import NormsimConfig
    from curate.stages.normsim import entry as normsim
    from curate.stages.score import ScoreConfig
    from curate.stages.score import entry as score

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    def reset_peak():  # VmHWM := current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    small, big, target, work = sys.argv[1:5]
    runs = {
        "score": lambda pool, tag: score.run(pool, f"{work}/{tag}-s.parquet", *configure(
            ScoreConfig, k=1, batch_size=1024, seed=0, device="cpu", cache_dir=f"{work}/{tag}-cache")),
        "normsim_inf": lambda pool, tag: normsim.run(pool, f"{work}/{tag}-inf.parquet", *configure(
            NormsimConfig, target=target, p="inf", device="cpu")),
        "normsim_2": lambda pool, tag: normsim.run(pool, f"{work}/{tag}-2.parquet", *configure(
            NormsimConfig, target=target, p="2", device="cpu")),
        # reads the fp16 cache that score built, instead of the tables
        "normsim_inf_cached": lambda pool, tag: normsim.run(pool, f"{work}/{tag}-infc.parquet", *configure(
            NormsimConfig, target=target, p="inf", device="cpu", cache_dir=f"{work}/{tag}-cache")),
    }
    for name, run in runs.items():
        run(small, "small")
    stats = {}
    for name, run in runs.items():
        reset_peak()
        before = status("VmRSS:")
        run(big, "big")
        stats[name] = {"before": before, "peak": status("VmHWM:")}
    print(json.dumps(stats))
""")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    tmp = tmp_path_factory.mktemp("memory")
    small = make_embedding_dir(tmp / "small", [2_000], dim=DIM, seed=1)
    big = make_embedding_dir(tmp / "big", [ROWS_PER_FILE] * FILES, dim=DIM, seed=0)
    rng = np.random.default_rng(2)
    target = rng.standard_normal((100, DIM)).astype(np.float32)
    np.save(tmp / "target.npy", target / np.linalg.norm(target, axis=1, keepdims=True))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(small), str(big), str(tmp / "target.npy"), str(tmp)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("stage", ["score", "normsim_inf", "normsim_2", "normsim_inf_cached"])
def test_peak_rss_growth_is_a_small_fraction_of_the_pool(measured, stage):
    _, stats = measured
    pool_fp16_bytes = ROWS_PER_FILE * FILES * DIM * 2 * 2  # image + text as stored (~205 MB)
    growth = stats[stage]["peak"] - stats[stage]["before"]
    # Streaming keeps O(N) score columns (a few MB here) plus fixed buffers (Arrow's pool and its read-ahead
    # thread, three float32 blocks, one logit tile: 20-55 MB measured, independent of N); holding the pool
    # would take >= 102 MB for one fp16 column alone.
    assert growth < pool_fp16_bytes / 2, (stage, growth, pool_fp16_bytes, stats)


def test_normsim_from_the_cache_equals_streaming_the_tables(measured):
    tmp, _ = measured
    streamed = pq.read_table(tmp / "big-inf.parquet")
    cached = pq.read_table(tmp / "big-infc.parquet")
    assert streamed.column("uid").equals(cached.column("uid"))
    np.testing.assert_array_equal(streamed.column("normsim_inf").to_numpy(), cached.column("normsim_inf").to_numpy())
    assert streamed.num_rows == ROWS_PER_FILE * FILES


@pytest.mark.parametrize("bad, message", [(np.inf, "is not finite"), (-np.inf, "is not finite"),
                                          (np.nan, "is not finite"), (0.0, "is all zeros")])
def test_streamed_cache_reads_reject_non_finite_and_zero_rows(tmp_path, bad, message):
    """PoolRows checks every read (fp16 magnitude bits): a bad row anywhere in a gather names its uid."""
    from curate.errors import CurateError
    from curate.io.tables import EmbeddingPool
    from curate.stages.common import PoolRows

    emb = make_embedding_dir(tmp_path / "emb", [5, 4], dim=8, seed=3)
    pool = EmbeddingPool(emb)
    rows = PoolRows(pool, "text_embedding", tmp_path / "cache")
    good = rows[np.arange(9)]
    assert good.dtype == np.float16 and good.shape == (9, 8)
    # rebuild the cache with row 6 (second table, row 1) broken, as a damaged table would give it
    cache = pool.cache_file("text_embedding", tmp_path / "cache")
    broken = np.load(cache)
    broken[6] = 0.0 if bad == 0.0 else broken[6]
    broken[6, 3] = bad
    np.save(cache, broken)
    rows = PoolRows(pool, "text_embedding", tmp_path / "cache")
    np.testing.assert_array_equal(rows[[0, 2, 8]], good[[0, 2, 8]])
    uid = pq.read_table(emb / "shard-00001.parquet", columns=["uid"]).column("uid")[1].as_py()
    with pytest.raises(CurateError, match=rf"shard-00001.parquet: text_embedding of row 1 \(uid {uid}\) {message}"):
        rows[[2, 6, 7]]
    with pytest.raises(CurateError, match=message):
        rows[4:8]
