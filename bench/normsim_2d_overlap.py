"""How much the NormSim_2-D schedules agree: top-30 % overlaps on a synthetic clustered pool.

Compares `curate normsim --p 2d` (the reference's nested schedule, defaults: 100 iterations, F = 0.3, 10 %
subsamples, seed 0) with the plain transcription of the reference loop in tests/normsim_oracles.py
(`reference_vas_d`, same seed), with itself under other seeds (the reference is unseeded, so this is its own
run-to-run spread), and with the geometric schedule curate ran before (4 rounds re-selecting from the whole
pool, kept fractions 0.3^(t/3); transcribed below as it was in commit 80c057a).

    PYTHONPATH=. python bench/normsim_2d_overlap.py [--rows 20000] [--dim 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from curate.io.tables import TeacherInfo, build_embedding_table, write_table_atomic  # noqa: E402
from curate.metrics.normsim import keep_count, top_fraction_mask  # noqa: E402
from common import run_normsim  # noqa: E402
from normsim_oracles import reference_vas_d  # noqa: E402


def clustered_pool(path: Path, n: int, dim: int, seed: int, rows_per_file: int = 5000) -> np.ndarray:
    """A pool like web data: 70 % in 30 clusters of Zipf-like sizes and spreads, 30 % isotropic noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((30, dim))
    sizes = rng.multinomial(int(0.7 * n), 1 / np.arange(1, 31) / (1 / np.arange(1, 31)).sum())
    spread = rng.uniform(0.3, 1.2, 30)
    parts = [centres[c] + spread[c] * rng.standard_normal((k, dim)) for c, k in enumerate(sizes)]
    parts.append(2.0 * rng.standard_normal((n - sum(sizes), dim)))
    x = np.concatenate(parts)[rng.permutation(n)].astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    teacher = TeacherInfo("bench-clusters", "none", dim, 100.0)
    path.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, n, rows_per_file)):
        rows = x[start:start + rows_per_file]
        uids = [f"{start + i:032x}" for i in range(len(rows))]
        table = build_embedding_table(uids, uids, ["c"] * len(rows), rows, rows)
        write_table_atomic(table, path / f"t{index:05d}.parquet", meta={"teacher": teacher.to_dict()})
    return x.astype(np.float16).astype(np.float32)  # the values the stage reads


def geometric_normsim_2d(v: np.ndarray, iterations: int = 4, final_fraction: float = 0.3) -> np.ndarray:
    """The removed schedule: round t scores every row against Σ x xᵀ over the top ⌈f_t·N⌉ of round t-1."""
    scores = None
    for t in range(iterations):
        kept = v if t == 0 else v[top_fraction_mask(scores, final_fraction ** (t / (iterations - 1)))]
        moment = kept.T.astype(np.float64) @ kept
        scores = np.sqrt(np.maximum(np.einsum("nd,de,ne->n", v, moment, v), 0)).astype(np.float32)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        v = clustered_pool(Path(tmp) / "emb", args.rows, args.dim, args.seed)
        top = {}
        for seed in (0, 1, 2):
            out = Path(tmp) / f"n{seed}.parquet"
            run_normsim(Path(tmp) / "emb", out, target="none", p="2d", cache_dir=Path(tmp) / "cache", seed=seed)
            top[f"curate seed {seed}"] = set(np.flatnonzero(top_fraction_mask(
                pq.read_table(out).column("normsim_2d").to_numpy(), 0.3)).tolist())
        top["transcription seed 0"] = set(reference_vas_d(v, 100, 0.3, 0.1, 0)[-1])
        top["geometric (old default)"] = set(np.flatnonzero(top_fraction_mask(geometric_normsim_2d(v), 0.3)).tolist())
    count = keep_count(args.rows, 0.3)
    print(f"pool: {args.rows} rows, dim {args.dim}; top 30 % = {count} rows")
    base = top["curate seed 0"]
    for name, chosen in top.items():
        print(f"  curate seed 0 vs {name:26s} {len(base & chosen) / count:7.2%}")
    print(f"  transcription vs geometric            "
          f"{len(top['transcription seed 0'] & top['geometric (old default)']) / count:7.2%}")


if __name__ == "__main__":
    main()
