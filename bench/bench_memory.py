"""Peak memory of the pool-wide stages at pool scale: score (negclip), normsim, filter, each in a fresh process.

For each pool size N (d = 512, fp16, 50k-row tables), in order:
  score      `score.run(pool, out, ScoreConfig(k=1, batch_size=B))`, cold: it also builds the fp16 `.npy`
             caches (this is the pass that writes N·D·2·2 bytes).
  normsim_inf `normsim.run(pool, out, NormsimConfig(target=1000×512, p="inf"))`, streamed from the Parquet
             tables (no cache given).
  normsim_2  `normsim.run(pool, out, NormsimConfig(target, p="2"))` with the score's cache directory: reads
             the fp16 cache.
  filter     `filter.entry.run([score table, normsim_inf table], out, FilterConfig(keep=[negclip:0.3, normsim_inf:0.2]))`.
Peak = VmHWM of the process (Linux), whole process: interpreter, torch, numpy, pyarrow included. "Above
imports" subtracts the RSS measured right before the stage call. RSS counts resident pages only: the
`.npy` caches are read with positional reads (no memory map), and the pages the kernel keeps in its page
cache are not the process's RSS.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from common import peak_rss
from pool import make_pool, random_unit_rows

SETUP = """
import numpy as np, torch
from curate.config import configure
from curate.stages.score import ScoreConfig
from curate.stages.score import entry as score
from curate.stages.normsim import NormsimConfig
from curate.stages.normsim import entry as normsim
from curate.stages.filter import FilterConfig
from curate.stages.filter.entry import run as filter_run
import pyarrow, faiss
"""


def stage_bodies(pool: Path, target: Path, work: Path, batch_size: int) -> dict[str, str]:
    cache, scores, ns_inf, ns_2 = work / "cache", work / "scores.parquet", work / "ns_inf.parquet", work / "ns_2.parquet"
    return {
        "score": f"score.run({str(pool)!r}, {str(scores)!r}, *configure(ScoreConfig, k=1, "
                 f"batch_size={batch_size}, seed=0, device='cpu', cache_dir={str(cache)!r}))",
        "normsim_inf": f"normsim.run({str(pool)!r}, {str(ns_inf)!r}, NormsimConfig(target={str(target)!r}, "
                       f"p='inf', device='cpu'))",
        "normsim_2": f"normsim.run({str(pool)!r}, {str(ns_2)!r}, NormsimConfig(target={str(target)!r}, p='2', "
                     f"device='cpu', cache_dir={str(cache)!r}))",
        "filter": f"filter_run([{str(scores)!r}, {str(ns_inf)!r}], {str(work / 'subset')!r}, "
                  f"*configure(FilterConfig, keep=['negclip:0.3', 'normsim_inf:0.2']))",
    }


def run(work: Path, sizes: list[int], dim: int, batch_size: int, big_batch: int, big_batch_rows: int,
        log=print) -> dict:
    target = work / f"target-1000x{dim}.npy"
    np.save(target, random_unit_rows(np.random.default_rng(12345), 1000, dim, np.float32))
    results: dict = {"sizes": {}, "dim": dim, "batch_size": batch_size}
    for n in sizes:
        started = time.perf_counter()
        pool = make_pool(work / f"pool-{n}x{dim}", n, dim, rows_per_file=50_000)
        log(f"  memory: pool {n:,} x {dim} ready ({time.perf_counter() - started:.1f} s)")
        scratch = work / f"memory-{n}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        pool_bytes = sum(f.stat().st_size for f in pool.glob("*.parquet"))
        per_stage = {}
        for name, body in stage_bodies(pool, target, scratch, batch_size).items():
            stats = peak_rss(SETUP, body)
            per_stage[name] = stats
            log(f"  memory: N={n:,} {name}: peak {stats['peak'] / 2**20:.0f} MiB "
                f"(+{stats['growth'] / 2**20:.0f} MiB above imports), {stats['seconds']:.1f} s")
        results["sizes"][n] = {"pool_parquet_bytes": pool_bytes, "embedding_bytes": n * dim * 2 * 2,
                               "stages": per_stage}
        shutil.rmtree(scratch, ignore_errors=True)
    # The O(B²) side: the default batch size on a pool just large enough for it.
    pool = make_pool(work / f"pool-{big_batch_rows}x{dim}", big_batch_rows, dim, rows_per_file=50_000)
    scratch = work / "memory-big-batch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    stats = peak_rss(SETUP, stage_bodies(pool, target, scratch, big_batch)["score"])
    log(f"  memory: N={big_batch_rows:,} score B={big_batch}: peak {stats['peak'] / 2**20:.0f} MiB, {stats['seconds']:.1f} s")
    results["big_batch"] = {"n_rows": big_batch_rows, "batch_size": big_batch, "score": stats}
    shutil.rmtree(scratch, ignore_errors=True)
    return results


def make_score_tables(path: Path, n_rows: int, rows_per_file: int = 1_000_000, seed: int = 0) -> tuple[Path, Path]:
    """Two score directories (negclip; normsim_inf) over the same random uids, as `curate score` and
    `curate normsim` write them for a pool of `n_rows` (no embeddings needed: filter reads only these)."""
    import json

    import pyarrow as pa

    from curate.io.tables import write_table_atomic
    from pool import random_uids

    stamp = path / "tables.json"
    params = {"n_rows": n_rows, "rows_per_file": rows_per_file, "seed": seed}
    scores, normsims = path / "scores", path / "normsim"
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return scores, normsims
    shutil.rmtree(path, ignore_errors=True)
    scores.mkdir(parents=True)
    normsims.mkdir(parents=True)
    for index, start in enumerate(range(0, n_rows, rows_per_file)):
        rng = np.random.default_rng([seed, index])
        n = min(rows_per_file, n_rows - start)
        uids = random_uids(rng, n)
        write_table_atomic(pa.table({"uid": uids, "negclip": rng.standard_normal(n, dtype=np.float32)}),
                           scores / f"part-{index:05d}.parquet", meta={"stage": "score"})
        write_table_atomic(pa.table({"uid": uids, "normsim_inf": rng.random(n, dtype=np.float32)}),
                           normsims / f"part-{index:05d}.parquet", meta={"stage": "normsim"})
    stamp.write_text(json.dumps(params))
    return scores, normsims


def filter_direct(work: Path, n_rows: int, log=print) -> dict:
    """Peak RSS of `curate filter` (negclip 0.3 then normsim_inf 0.2 over two tables) at `n_rows` rows."""
    started = time.perf_counter()
    scores, normsims = make_score_tables(work / f"score-tables-{n_rows}", n_rows)
    log(f"  memory: score tables {n_rows:,} rows ready ({time.perf_counter() - started:.1f} s)")
    out = work / f"filter-direct-{n_rows}"
    shutil.rmtree(out, ignore_errors=True)
    call = (f"filter_run([{str(scores)!r}, {str(normsims)!r}], {str(out)!r}, "
            f"*configure(FilterConfig, keep=['negclip:0.3', 'normsim_inf:0.2']")
    stats = peak_rss(SETUP, call + "))")
    shutil.rmtree(out, ignore_errors=True)
    log(f"  memory: filter at N={n_rows:,}: peak {stats['peak'] / 2**20:.0f} MiB, {stats['seconds']:.1f} s")
    # the same selection as map tasks over the 1M-row files, run in this one process (--tasks 10)
    tasks = peak_rss(SETUP, call + ", tasks=10))")
    shutil.rmtree(out, ignore_errors=True)
    log(f"  memory: filter as map tasks at N={n_rows:,}: peak {tasks['peak'] / 2**20:.0f} MiB, "
        f"{tasks['seconds']:.1f} s")
    return {"n_rows": n_rows, **stats, "map_tasks": tasks}


def extrapolate(results: dict, stage: str, rows: int) -> tuple[float, float]:
    """(bytes per row, projected peak at `rows`) from a line through the two largest measured sizes."""
    sizes = sorted(results["sizes"])
    if len(sizes) < 2:
        return float("nan"), float("nan")
    a, b = sizes[-2], sizes[-1]
    pa_, pb = results["sizes"][a]["stages"][stage]["peak"], results["sizes"][b]["stages"][stage]["peak"]
    slope = (pb - pa_) / (b - a)
    return slope, pb + slope * (rows - b)


def main(argv=None) -> int:
    """`bench/bench_memory.py --rows 10000000 --out bench/out/memory-10M.json`: the memory section alone at
    sizes too slow for `make bench` (10 M × 512: ~40 GB of disk, ~35 min here); merge it into results.md
    with `bench/run_all.py --from-json bench/out/results.json --merge-memory bench/out/memory-10M.json`."""
    import argparse
    import datetime
    import json

    from common import REPO

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--rows", default="10000000", help="comma list of pool sizes")
    parser.add_argument("--work", default=str(REPO / "bench" / "out"))
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "memory-10M.json"))
    parser.add_argument("--keep-pool", action="store_true", help="keep the generated pools (large)")
    args = parser.parse_args(argv)
    sizes = [int(float(x)) for x in args.rows.split(",")]
    work = Path(args.work)
    result = run(work, sizes, 512, 1024, 32768, 32768)
    result["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    if not args.keep_pool:
        for n in sizes:
            shutil.rmtree(work / f"pool-{n}x512", ignore_errors=True)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
