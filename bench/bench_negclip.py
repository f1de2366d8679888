"""negCLIPLoss: `curate score --metric negclip` vs the same matmuls + LSE in bare torch on in-memory arrays.

Limit (what the stage cannot beat): the pool's image and text embeddings already in RAM as float32 torch
tensors; for each batch of the same K partitions (`partition_batches`, the stage's own scheme, so the
work is identical), gather the rows, one full b×b float32 matmul of the scaled logits, `torch.logsumexp`
over rows and over columns, and an index_add of the per-sample terms; plus s_ii. No files, no tiling.
Stage: `score(...)` end to end (reads the Parquet tables, clipscore pass, fp16 `.npy` cache reads,
tiled LSE, writes the score table), with the cache already built (a first "cold" run that builds it
is timed separately).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from common import compare
from pool import load_pool_arrays, make_pool


def bare_negclip(image: torch.Tensor, text: torch.Tensor, logit_scale: float, k: int, batch_size: int,
                 seed: int) -> np.ndarray:
    from curate.metrics.negclip import partition_batches

    n = len(image)
    sums = torch.zeros(n, dtype=torch.float64, device=image.device)
    for partition in range(k):
        for batch in partition_batches(n, batch_size, seed, partition):
            members = torch.from_numpy(batch.members).to(image.device)
            logits = (image.index_select(0, members) * logit_scale) @ text.index_select(0, members).t()
            terms = (torch.logsumexp(logits, dim=1) + torch.logsumexp(logits, dim=0)).double()
            own = torch.from_numpy(batch.own).to(image.device)
            sums.index_add_(0, members[own], terms[own])
    s_ii = (image * text).sum(dim=1, dtype=torch.float64)
    return (s_ii - sums / (2 * k * logit_scale)).float().cpu().numpy()


def gather_rate(pool_dir: Path, cache: Path, batch_size: int, batches: int = 8) -> dict:
    """Rows per second that `PoolRows` gathers (sorted random batch members, both columns) from the
    page-cached fp16 caches: the I/O side of negclip at scale."""
    from curate.io.tables import EmbeddingPool
    from curate.metrics.negclip import partition_batches
    from curate.stages.common import PoolRows

    pool = EmbeddingPool(pool_dir)
    image, text = PoolRows(pool, "image_embedding", cache), PoolRows(pool, "text_embedding", cache)
    members = [b.members for _, b in zip(range(batches), partition_batches(pool.n_rows, batch_size, 7, 0))]
    start = time.perf_counter()
    for m in members:
        image[m], text[m]
    seconds = time.perf_counter() - start
    rows = sum(len(m) for m in members)
    image.close(), text.close()
    return {"rows_per_s": rows / seconds, "mb_per_s": rows * 2 * pool.dim * 2 / seconds / 1e6}


def run(work: Path, n_rows: int, dim: int, k: int, batch_size: int, repeats: int, device: str = "cpu",
        log=print) -> dict:
    from common import run_score

    started = time.perf_counter()
    pool_dir = make_pool(work / f"pool-{n_rows}x{dim}", n_rows, dim, rows_per_file=50_000)
    log(f"  negclip pool ready ({time.perf_counter() - started:.1f} s)")
    arrays = load_pool_arrays(pool_dir)
    image = torch.from_numpy(arrays["image_embedding"]).to(device)
    text = torch.from_numpy(arrays["text_embedding"]).to(device)
    del arrays
    out, cache = work / "negclip-scores.parquet", work / "negclip-cache"
    shutil.rmtree(cache, ignore_errors=True)
    logit_scale = 100.0

    cold_start = time.perf_counter()
    run_score(pool_dir, out, metrics="negclip", k=k, batch_size=batch_size, seed=0, device=device, cache_dir=cache)
    cold = time.perf_counter() - cold_start
    log(f"  negclip cold run (builds the fp16 cache): {cold:.2f} s")

    result: dict = {}

    def limit():
        result["limit_scores"] = bare_negclip(image, text, logit_scale, k, batch_size, 0)

    def stage():
        run_score(pool_dir, out, metrics="negclip", k=k, batch_size=batch_size, seed=0, device=device, cache_dir=cache)

    comparison = compare(stage, limit, repeats, log, "negclip")
    import pyarrow.parquet as pq

    stage_scores = pq.read_table(out, columns=["negclip"]).column("negclip").to_numpy()
    max_diff = float(np.abs(stage_scores - result["limit_scores"]).max())
    if device == "cuda":
        torch.cuda.synchronize()
    gather = gather_rate(pool_dir, cache, batch_size)
    flops = 2.0 * n_rows * k * min(batch_size, n_rows) * dim  # one b×b×d matmul per batch: 2·b·d per sample
    return {"n_rows": n_rows, "dim": dim, "k": k, "batch_size": batch_size, "device": device, "cold_s": cold,
            "gather": gather,
            "max_abs_diff": max_diff, "flops": flops, **comparison.as_dict(),
            "stage_gflops": flops / comparison.best_stage / 1e9, "limit_gflops": flops / comparison.best_limit / 1e9}
