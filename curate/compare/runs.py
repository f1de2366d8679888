"""Training and evaluating `curate compare`'s students: one run per (method, seed), finished runs reused, `jobs` at
a time in spawned processes, and the training curves."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from curate.io.atomic import write_text_atomic
from curate.compare import METHOD_LABELS, ROWS
from curate.stages.train_student import EVAL_JSON, TRAIN_JSON, StudentConfig
from curate.stages.train_student.evaluation import evaluate_model, summary_numbers
from curate.stages.train_student.training import save_student, train_on_pairs


def content_key(obj) -> str:
    """12 hex digits of the sha256 of `obj` as sorted JSON: what a run's inputs are, in its record."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class RunSpec:
    run_dir: str
    method: str
    seed: int
    uids: list[str]
    student: StudentConfig
    eval_key: str
    context: dict

    def key(self) -> str:
        subset_hash = hashlib.sha256("\n".join(sorted(self.uids)).encode()).hexdigest()[:16]
        return content_key({"student": asdict(self.student), "subset": subset_hash, "eval": self.eval_key, **self.context})


def finished_run(spec: RunSpec) -> dict | None:
    """The record of a finished run with the same inputs (reruns reuse it), else None."""
    try:
        record = json.loads((Path(spec.run_dir) / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("run_key") == spec.key() else None


def run_one(spec: RunSpec, pairs, eval_data) -> dict:
    """Train and evaluate one student; returns (and writes) its run.json record."""
    from curate.run.threads import torch_threads

    run_dir = Path(spec.run_dir)
    started, cpu_started = time.perf_counter(), time.process_time()
    with torch_threads(spec.student.threads):
        subset = pairs.select(spec.uids)
        trained = train_on_pairs(subset, spec.student)
        # no per-run curve.png: curves.png draws every run's curve (from the records) in one figure
        saved = save_student(trained, run_dir, {"method": spec.method, "pairs": len(subset.uids),
                                                "truth_counts": subset.truth_counts()}, plot=False)
        result = evaluate_model(trained.model, trained.heads_state, eval_data, spec.student.device)
    write_text_atomic(run_dir / EVAL_JSON, json.dumps(result, indent=2, sort_keys=True) + "\n")
    # The budget tabulated is the one the training JSON logged (read back), not the configuration.
    logged = json.loads((run_dir / TRAIN_JSON).read_text())["budget"]
    record = {"method": spec.method, "seed": spec.seed, "run_key": spec.key(), "dir": str(run_dir), "budget": logged,
              **summary_numbers(result), "final_loss": saved["final_loss"], "train_seconds": saved["train_seconds"],
              "seconds": round(time.perf_counter() - started, 3),
              "cpu_seconds": round(time.process_time() - cpu_started, 3),
              "curve": [[h["step"], h["loss"]] for h in trained.history]}
    write_text_atomic(run_dir / "run.json", json.dumps(record, indent=2) + "\n")
    return record


# Worker-process state for parallel runs: the decoded tensors, loaded once per worker (memory-mapped).
WORKER_STATE: dict = {}


def init_worker(tensors_path: str) -> None:
    import torch

    from curate.stages.train_student.data import PairSet
    from curate.stages.train_student.evaluation import EvalData

    saved = torch.load(tensors_path, weights_only=True, mmap=True)
    WORKER_STATE["pairs"] = PairSet(**saved["pairs"])
    WORKER_STATE["eval"] = EvalData(**{k: (np.asarray(v) if k in ("heldout_labels", "target_labels") and v is not None
                                           else v) for k, v in saved["eval"].items()})


def run_in_worker(spec: RunSpec) -> dict:
    return run_one(spec, WORKER_STATE["pairs"], WORKER_STATE["eval"])


def run_all(specs: list[RunSpec], pairs, eval_data, jobs: int, scratch_dir: Path,
            log: Callable[[str], None]) -> list[dict]:
    """Every run, finished ones reused; `jobs` > 1 trains in that many spawned processes (the decoded tensors
    handed to them through a file in `scratch_dir`). Each run is seeded on its own and trains with a fixed number
    of threads, so results do not depend on `jobs`."""
    records: dict[int, dict] = {}
    todo = []
    for i, spec in enumerate(specs):
        record = finished_run(spec)
        if record is not None:
            log(f"{spec.method} seed {spec.seed}: reused ({spec.run_dir})")
            records[i] = record
        else:
            todo.append(i)

    def done(i: int, record: dict) -> None:
        records[i] = record
        log(f"{record['method']} seed {record['seed']}: zero-shot {record['zero_shot_top1']:.1f} %, "
            f"R@1 {record['retrieval_r1']:.1f} % ({record['seconds']:.0f} s)")

    if jobs <= 1 or len(todo) <= 1:
        for i in todo:
            done(i, run_one(specs[i], pairs, eval_data))
    else:
        import concurrent.futures as cf

        import torch
        import torch.multiprocessing as tmp

        tensors_path = scratch_dir / f"decoded-{os.getpid()}.pt"
        tensors_path.parent.mkdir(parents=True, exist_ok=True)
        eval_state = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict_shallow(eval_data).items()}
        torch.save({"pairs": asdict_shallow(pairs), "eval": eval_state}, tensors_path)
        try:
            with cf.ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=tmp.get_context("spawn"),
                                        initializer=init_worker, initargs=(str(tensors_path),)) as pool:
                futures = {pool.submit(run_in_worker, specs[i]): i for i in todo}
                for future in cf.as_completed(futures):
                    done(futures[future], future.result())
        finally:
            tensors_path.unlink(missing_ok=True)
    return [records[i] for i in range(len(specs))]


def asdict_shallow(obj) -> dict:
    """A dataclass's fields as a dict without deep-copying tensors (dataclasses.asdict copies)."""
    from dataclasses import fields

    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def plot_curves(runs: list[dict], path: Path) -> Path:
    """Training loss of every run, one colour per method (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from curate.io.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = {row: palette[i % len(palette)] for i, row in enumerate(ROWS)}
    styles = {row: ("-", "--")[i // len(palette) % 2] for i, row in enumerate(ROWS)}
    for method in ROWS:
        for i, run in enumerate(r for r in runs if r["method"] == method):
            steps, losses = zip(*run["curve"]) if run["curve"] else ((), ())
            ax.plot(steps, losses, color=colours[method], linestyle=styles[method], alpha=0.8,
                    label=METHOD_LABELS[method] if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("student training curves (same budget)")
    ax.legend(fontsize=6, ncols=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
