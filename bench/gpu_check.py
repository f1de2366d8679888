"""One short GPU check for a session that has a device: do the CUDA paths agree with the CPU, and how fast are they?

    .venv/bin/python bench/gpu_check.py [--rows 200000] [--work /tmp/gpu-check] [--device cuda]

No CUDA: prints so and exits 0 (`--device cpu` runs both sides on the CPU, a smoke test of this script).
Checks, on a random fp16 pool (bench/pool.py) and a 1000-row target:
- negCLIPLoss (`curate score`, K = 2, b = 4096) on the device vs the CPU: max |difference| (float32 LSE
  terms summed in float64; must stay ~1e-6), and both wall times;
- NormSim_inf exact on the device vs the CPU (same bar), NormSim_2 (numpy on both: a sanity line);
- the table bytes of two device runs (determinism on the device);
then runs `bench/run_all.py --device DEVICE --only embed,negclip` for the embed and negclip ratios on the
device. Exit status 1 when an agreement check fails.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pool import make_pool, random_unit_rows

TOLERANCE = 1e-5


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def column(path: Path, name: str) -> np.ndarray:
    return pq.read_table(path, columns=[name]).column(name).to_numpy()


def main() -> int:
    import torch

    from common import run_normsim, run_score

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu-check"))
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (use --device cpu to smoke-test this script)")
        return 0
    print(f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}; torch {torch.__version__}")
    work = args.work
    pool = make_pool(work / f"pool-{args.rows}", args.rows, 512, rows_per_file=50_000)
    target = work / "target.npy"
    np.save(target, random_unit_rows(np.random.default_rng(1), 1000, 512, np.float32))
    cache = work / "cache"
    failures = []

    def agree(name: str, cpu: np.ndarray, dev: np.ndarray) -> None:
        worst = float(np.max(np.abs(cpu.astype(np.float64) - dev.astype(np.float64))))
        ok = worst <= TOLERANCE
        failures.extend([] if ok else [name])
        print(f"{name}: max |cpu - {args.device}| = {worst:.2e} ({'ok' if ok else 'FAILED'}, bar {TOLERANCE:g})")

    runs = {}
    for device in ("cpu", args.device, args.device):
        out = work / f"score-{device}-{len(runs)}.parquet"
        seconds = timed(lambda: run_score(pool, out, metrics="clipscore,negclip", k=2, batch_size=4096, seed=0, device=device, cache_dir=cache))
        runs[out] = seconds
        print(f"score on {device}: {seconds:.2f} s")
    (cpu_out, dev_out, dev_again) = list(runs)
    agree("negclip", column(cpu_out, "negclip"), column(dev_out, "negclip"))
    same = dev_out.read_bytes() == dev_again.read_bytes()
    failures.extend([] if same else ["negclip determinism"])
    print(f"negclip: two {args.device} runs give {'identical' if same else 'DIFFERENT'} tables")

    for p in ("inf", "2"):
        outs = {}
        for device in ("cpu", args.device):
            outs[device] = work / f"normsim-{p}-{device}.parquet"
            seconds = timed(lambda: run_normsim(pool, outs[device], target=str(target), p=p, device=device,
                                                cache_dir=cache))
            print(f"normsim_{p} on {device}: {seconds:.2f} s")
        agree(f"normsim_{p}", column(outs["cpu"], f"normsim_{p}"), column(outs[args.device], f"normsim_{p}"))

    bench = subprocess.run([sys.executable, str(Path(__file__).with_name("run_all.py")), "--device", args.device,
                            "--only", "embed,negclip", "--work", str(work / "bench"), "--out",
                            str(work / "results.md")])
    if bench.returncode:
        failures.append("run_all")
    else:
        summary = (work / "results.md").read_text()
        print(summary[summary.index("## Summary"):summary.index("## embed")])
    print("gpu_check:", "all checks passed" if not failures else f"FAILED: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
