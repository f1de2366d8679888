"""Shared benchmark helpers: interleaved best-of-N timing, machine description, peak RSS in a subprocess."""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Comparison:
    """Times (seconds) of a stage and of its limit, measured alternately on the same data."""

    stage: list[float] = field(default_factory=list)
    limit: list[float] = field(default_factory=list)
    stage_cpu: list[float] = field(default_factory=list)  # process + reaped children, user + system
    limit_cpu: list[float] = field(default_factory=list)

    @property
    def best_stage(self) -> float:
        return min(self.stage)

    @property
    def best_limit(self) -> float:
        return min(self.limit)

    @property
    def time_ratio(self) -> float:
        """stage time / limit time (best of each): 1.0 means the stage is as fast as the bare operation."""
        return self.best_stage / self.best_limit

    def as_dict(self) -> dict:
        return {"stage_s": self.stage, "limit_s": self.limit, "best_stage_s": self.best_stage,
                "best_limit_s": self.best_limit, "time_ratio": self.time_ratio,
                "stage_cpu_s": self.stage_cpu, "limit_cpu_s": self.limit_cpu,
                "cpu_ratio": min(self.stage_cpu) / min(self.limit_cpu)}


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (DataLoader workers...)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def compare(stage: Callable[[], object], limit: Callable[[], object], repeats: int,
            log: Callable[[str], None] = print, name: str = "") -> Comparison:
    """Run limit and stage alternately `repeats` times each (limit first, then stage, ...), keeping
    every wall time. Alternating spreads the load of other processes over both; the best of each is used.
    One untimed run of each comes first: first calls pay one-off costs (page faults of fresh large arrays,
    thread pools, lazy imports) that made, e.g., the numpy NormSim_2 limit 0.95 s once and 0.51 s after."""
    result = Comparison()
    for kind, fn in (("limit", limit), ("stage", stage)):
        gc.collect()
        start = time.perf_counter()
        fn()
        log(f"  {name} {kind} warm-up (not counted): {time.perf_counter() - start:.2f} s wall")
    for r in range(repeats):
        for kind, fn, times, cpu in (("limit", limit, result.limit, result.limit_cpu),
                                     ("stage", stage, result.stage, result.stage_cpu)):
            gc.collect()
            cpu_start, start = cpu_seconds(), time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
            cpu.append(cpu_seconds() - cpu_start)
            log(f"  {name} {kind} run {r + 1}/{repeats}: {times[-1]:.2f} s wall, {cpu[-1]:.2f} s CPU")
    return result


def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _mem_total_gib() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info() -> dict:
    import faiss
    import numpy
    import open_clip
    import pyarrow
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _lscpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(_mem_total_gib(), 1),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "faiss": faiss.__version__,
        "numpy": numpy.__version__,
        "pyarrow": pyarrow.__version__,
        "open_clip": open_clip.__version__,
        "load_average_start": load_average(),
    }


# ---------------------------------------------------------------- peak memory of a stage, in a fresh process

PEAK_RSS_PREAMBLE = """
import json, sys, time
sys.path.insert(0, {bench!r})

def _status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return None

def _reset_peak():
    # VmHWM := current RSS (Linux >= 4.0), so the peak below is the stage's, not the imports'
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
"""


def peak_rss(setup: str, body: str, timeout: float = 3600) -> dict:
    """Run `setup` (imports, warm-up) then `body` in a fresh Python; return {before, peak, growth, seconds}.

    `before` is RSS after `setup`; `peak` is VmHWM after `body`, with the high-water mark reset after setup
    (when the kernel allows; otherwise the peak includes setup, which only overstates).
    """
    code = PEAK_RSS_PREAMBLE.format(bench=str(REPO / "bench")) + setup + """
_reset = _reset_peak()
_before = _status("VmRSS:")
_start = time.perf_counter()
""" + body + """
_seconds = time.perf_counter() - _start
print("PEAK_RSS " + json.dumps({"before": _before, "peak": _status("VmHWM:"), "seconds": _seconds, "reset": _reset}))
"""
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=str(REPO), env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-RSS subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEAK_RSS ")][-1]
    stats = json.loads(line[len("PEAK_RSS "):])
    stats["growth"] = stats["peak"] - stats["before"]
    return stats


def gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def mib(x: float) -> str:
    return f"{x / 2**20:.0f} MiB"


def run_score(emb, out, progress=None, **values):
    """`curate.stages.score.entry.run` with its options as keywords (split between ScoreConfig and RunOptions)."""
    from curate.config import configure
    from curate.stages.score import ScoreConfig
    from curate.stages.score.entry import run

    return run(emb, out, *configure(ScoreConfig, **values), progress=progress)


def run_normsim(emb, out, progress=None, **values):
    """`curate.stages.normsim.entry.run` with its options as keywords (split between NormsimConfig and RunOptions)."""
    from curate.config import configure
    from curate.stages.normsim import NormsimConfig
    from curate.stages.normsim.entry import run

    return run(emb, out, *configure(NormsimConfig, **values), progress=progress)
