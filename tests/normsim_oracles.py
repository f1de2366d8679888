"""NormSim's oracles, plain loops written from the equations for the tests of curate.metrics.normsim and
`curate normsim` (bench/normsim_2d_overlap.py uses the 2-D one too): NormSim_p, the splitmix64 subsample draws,
the reference's NormSim_2-D (VAS-D) loop; and a one-table embedding pool of chosen image rows."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from curate.io.tables import TeacherInfo, build_embedding_table, write_table_atomic


def reference_normsim(v: np.ndarray, target: np.ndarray, p: float) -> list[float]:
    out = []
    for row in v.astype(np.float64):
        dots = [abs(sum(row[d] * x[d] for d in range(len(row)))) for x in target.astype(np.float64)]
        out.append(max(dots) if p == float("inf") else sum(a ** p for a in dots) ** (1.0 / p))
    return out


SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
MASK64 = 2**64 - 1


def splitmix64(z: int) -> int:
    """The splitmix64 output function, on Python ints (Steele, Lea & Flood 2014; Vigna's splitmix64.c)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def in_subsample(row: int, seed: int, iteration: int, fraction: float) -> bool:
    """Row `row` is in iteration t's subsample: output `row` of a splitmix64 generator seeded with output t of
    one seeded with `seed`, below ⌊fraction·2^64⌋ (the documented rule that replaces np.random.choice)."""
    stream = splitmix64((seed + (iteration + 1) * SPLITMIX_GAMMA) & MASK64)
    draw = splitmix64((stream + (row + 1) * SPLITMIX_GAMMA) & MASK64)
    return draw < math.floor(Fraction(repr(fraction)) * 2**64)


def reference_vas_d(v: np.ndarray, num_iters: int, fraction_vas: float, downsample_ratio: float, seed: int,
                    candidates: np.ndarray | None = None) -> list[list[int]]:
    """A plain transcription of the reference's loop (ypwang61/negCLIPLoss_NormSim, baselines/vas2.py:
    load_uids_with_vas_d_filter with cal_target_variance and cal_vass_iter); returns S_0, ..., S_T as sorted
    pool indices. Where it differs from the reference it says so: the subsample (np.random.choice there,
    unseeded), the final size (int(F·N) there), ties (torch.topk's order there) and the floor at the final
    size (the reference undershoots it when (T−1)·chunk > |S_0| − F·N)."""
    x = v.astype(np.float64)
    n = len(x)

    def cal_target_variance(uids) -> np.ndarray:  # S = Σ f fᵀ / k over the random subsample
        emb_ds = x[[u for u in uids if in_subsample(int(u), seed, iteration, downsample_ratio)]]
        return emb_ds.T @ emb_ds / len(emb_ds) if len(emb_ds) else np.zeros((x.shape[1],) * 2)

    iteration = 0
    target_variance = cal_target_variance(range(n))  # load_all_data: before the CLIPScore filter
    target_size = math.ceil(Fraction(repr(fraction_vas)) * n)
    uids = np.arange(n) if candidates is None else np.flatnonzero(candidates)  # filter_by_score(css, fraction)
    chunk_size = math.ceil((len(uids) - target_size) / num_iters)
    subsets = [sorted(uids.tolist())]
    for i in range(num_iters):
        total_size = len(uids)
        vass = [float(x[u] @ target_variance @ x[u]) for u in uids]  # f_i^T S f_i
        topk = target_size if i == num_iters - 1 else max(total_size - chunk_size, target_size)
        order = sorted(range(total_size), key=lambda j: (-vass[j], uids[j]))[:topk]
        uids = uids[order]
        subsets.append(sorted(uids.tolist()))
        iteration = i + 1
        target_variance = cal_target_variance(uids)
    return subsets


def subsets_of_column(column: np.ndarray, iterations: int) -> list[list[int]]:
    """S_0, ..., S_T read back from a normsim_2d column: S_i holds the rows of level i+1 and up."""
    levels = np.floor(column).astype(int)
    return [np.flatnonzero(levels >= i + 1).tolist() for i in range(iterations + 1)]


def write_pool(path, image: np.ndarray, logit_scale: float = 100.0, name: str = "t.parquet"):
    n, d = image.shape
    table = build_embedding_table([f"{i:032x}" for i in range(n)], [str(i) for i in range(n)], ["c"] * n,
                                  image, image)
    write_table_atomic(table, path / name, meta={"teacher": TeacherInfo("m", "none", d, logit_scale).to_dict(),
                                                  "shard": "t.tar"})
    return path
