"""NormSim_∞ and NormSim_2: `curate normsim` vs the bare operation on in-memory arrays.

Limits (what the stage cannot beat), with the pool's image embeddings already in RAM as float32:
* normsim_inf: FAISS `IndexFlatIP` over the target X (M rows), top-1 search of every pool row (k=1).
  This is max_x <v, x>; the stage computes max_x |<v, x>| (the paper's definition), from the same single
  V Xᵀ product, so the work is the same.
* normsim_2: C = XᵀX (float64), then sqrt(einsum(V C, V)) in numpy: the D×D second-moment route.
Stage: `normsim(...)` end to end: reads the pool in blocks, fp16 -> float32, finiteness checks, the same
math, writes the score table. Twice: streaming the Parquet tables, and with the fp16 `.npy` image cache
that `curate score` leaves behind for negclip (the paper's recipe runs negclip first).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from common import compare
from pool import load_pool_arrays, make_pool, random_unit_rows


def faiss_flat_top1(v: np.ndarray, target: np.ndarray) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatIP(target.shape[1])
    index.add(target)
    distances, _ = index.search(v, 1)
    return distances[:, 0]


def numpy_second_moment_route(v: np.ndarray, target: np.ndarray) -> np.ndarray:
    x = target.astype(np.float64)
    moment = (x.T @ x).astype(np.float32)
    return np.sqrt(np.einsum("nd,nd->n", v @ moment, v))


def run(work: Path, n_rows: int, dim: int, target_rows: int, repeats: int, log=print) -> dict:
    from common import run_normsim

    import pyarrow.parquet as pq

    started = time.perf_counter()
    pool_dir = make_pool(work / f"pool-{n_rows}x{dim}", n_rows, dim, rows_per_file=50_000)
    log(f"  normsim pool ready ({time.perf_counter() - started:.1f} s)")
    target = random_unit_rows(np.random.default_rng(12345), target_rows, dim, np.float32)
    target_path = work / f"target-{target_rows}x{dim}.npy"
    np.save(target_path, target)
    v = load_pool_arrays(pool_dir, ["image_embedding"])["image_embedding"]
    cache = work / "normsim-cache"
    results = {}
    # cold: the stage builds the pool's fp16 cache from the Parquet lists first (once per pool version)
    cold_out = work / "normsim-cold.parquet"
    started, cpu_started = time.perf_counter(), time.process_time()
    run_normsim(pool_dir, cold_out, target=str(target_path), p="inf", device="cpu", cache_dir=cache)
    results["cold"] = {"wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu_started,
                       "n_rows": n_rows}
    log(f"  normsim cold (builds the fp16 cache from Parquet, then scores inf): {results['cold']['wall_s']:.2f} s")
    variants = [("inf", faiss_flat_top1, cache), ("2", numpy_second_moment_route, cache)]
    for p, limit_fn, cache_dir in variants:
        out = work / f"normsim-{p}.parquet"
        held: dict = {}
        name = f"normsim_{p}"

        def limit():
            held["scores"] = limit_fn(v, target)

        def stage():
            run_normsim(pool_dir, out, target=str(target_path), p=p, device="cpu", cache_dir=cache_dir)

        comparison = compare(stage, limit, repeats, log, name)
        stage_scores = pq.read_table(out, columns=[f"normsim_{p}"]).column(0).to_numpy()
        if p == "2":
            agreement = float(np.abs(stage_scores - held["scores"]).max())
        else:  # the stage takes |.|: it must equal max(faiss top-1 over X, over -X); check on the limit's half
            agreement = float(np.maximum(0.0, held["scores"] - stage_scores).max())
        results[name] = {"n_rows": n_rows, "dim": dim, "target_rows": target_rows, "source":
                         "fp16 .npy cache" if cache_dir else "Parquet tables", "check": agreement,
                         **comparison.as_dict()}
    return results


def decode_costs(work: Path, n_rows: int, dim: int, repeats: int, log=print) -> dict:
    """CPU µs per row to decode one table's image column, in 1024-row batches: the fixed_size_list<float16>
    column `curate embed` writes (numbers in every tool), against the fixed_size_binary bytes an earlier version
    wrote (same values, same plain encoding); and the fp16 `.npy` cache the stages read instead."""
    import pyarrow as pa

    from curate.io.tables import column_to_numpy, numpy_to_vectors, open_table, write_table_atomic

    values = random_unit_rows(np.random.default_rng(7), n_rows, dim)
    binary = pa.FixedSizeBinaryArray.from_buffers(pa.binary(2 * dim), n_rows,
                                                  [None, pa.py_buffer(np.ascontiguousarray(values, "<f2"))])
    files = {"binary": binary, "list": numpy_to_vectors(values)}
    out = {}
    for name, column in files.items():
        path = work / f"decode-{name}-{n_rows}x{dim}.parquet"
        write_table_atomic(pa.table({"image_embedding": column}), path)
        best = float("inf")
        for _ in range(repeats):
            started = time.process_time()
            for batch in open_table(path).iter_batches(batch_size=1024, use_threads=False):
                column_to_numpy(batch.column(0), np.float16)
            best = min(best, time.process_time() - started)
        out[name] = {"us_per_row": best / n_rows * 1e6, "bytes": path.stat().st_size}
        path.unlink()
    cache = work / f"decode-cache-{n_rows}x{dim}.npy"
    np.save(cache, values)
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        with open(cache, "rb") as f:
            np.lib.format.read_magic(f)
            np.lib.format.read_array_header_1_0(f)
            buffer = np.empty((1024, dim), np.float16)
            while f.readinto(buffer):
                pass
        best = min(best, time.process_time() - started)
    out["cache"] = {"us_per_row": best / n_rows * 1e6, "bytes": cache.stat().st_size}
    cache.unlink()
    log(f"  decode µs/row: list {out['list']['us_per_row']:.2f}, binary {out['binary']['us_per_row']:.2f}, "
        f"fp16 cache {out['cache']['us_per_row']:.2f}")
    return {"n_rows": n_rows, "dim": dim, **out}
