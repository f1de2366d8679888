"""`curate export`'s entry: the subset and the output directory checked (a rerun of the same export resumes, a
complete one is a no-op, another export's directory is refused), the manifest started, then the one-process
export (local.py) or, when the run options ask for map tasks, the two passes of map tasks (tasks.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from curate.config import RunOptions, check_config
from curate.errors import CurateError
from curate.io.atomic import file_sha256, sweep_stale_temps, write_text_atomic
from curate.io.shards import expand_shards
from curate.io.uids import load_subset, subset_file
from curate.run.mapreduce import check_task_options
from curate.stages.export import ExportConfig, ExportReport
from curate.stages.export.common import MANIFEST
from curate.stages.export.local import export_in_process
from curate.stages.export.tasks import export_in_tasks


def _check_out_dir(out: Path, config: dict) -> dict | None:
    """The manifest of an earlier run of this same export (None when there is none); else an error."""
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise CurateError(f"{manifest_path}: unreadable ({exc}); delete {out} and export again") from None
        if manifest.get("config") != config:
            raise CurateError(f"{out}: holds an export of other shards, another subset or shard size "
                              f"(see {MANIFEST}); choose a new --out or delete it")
        return manifest
    if any(out.glob("*.tar")):
        raise CurateError(f"{out}: already holds .tar files that `curate export` did not write; "
                          "choose an empty --out directory")
    return None


def run(shards, subset: str | Path, out: str | Path, cfg: ExportConfig = ExportConfig(),
        opts: RunOptions = RunOptions(), progress: Callable[[int], None] | None = None) -> ExportReport:
    """Write the subset's samples into OUT/NNNNN.tar (see curate/stages/export/__init__.py). With an executor
    other than local, workers > 1 or tasks: the same outputs from map tasks (a Slurm array runs one export
    per task: ranks do not split it). `progress(n)`: n more samples are in finished tars (once per output tar;
    as map tasks, once at the end)."""
    check_config(cfg)
    if opts.executor not in ("local", "ray"):
        raise CurateError(f"--executor {opts.executor!r}: choose local or ray")
    check_task_options(opts.workers, opts.tasks, opts.retries)
    uid_file = subset_file(subset)
    load_subset(uid_file, mmap=True)  # a bad file is an error now (only its header is read here)
    urls = expand_shards(shards)
    out = Path(out)
    # `format`: how samples are written (2: content uids go into the .json); tars of another format are not reused
    config = {"shards": urls, "subset_sha256": file_sha256(uid_file), "shard_size": cfg.shard_size, "format": 2}
    out.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(out)  # tars of an export killed earlier
    earlier = _check_out_dir(out, config)
    if earlier is not None and earlier.get("complete"):
        return ExportReport(**{**earlier["report"], "noop": True})
    if earlier is None:
        write_text_atomic(out / MANIFEST, json.dumps({"complete": False, "config": config}, indent=2) + "\n")
    if opts.executor != "local" or int(opts.workers) > 1 or opts.tasks is not None:
        report = export_in_tasks(urls, uid_file, out, config, cfg.shard_size, cfg.fast, opts)
        if progress:
            progress(report.written)
        return report
    return export_in_process(urls, uid_file, out, config, cfg.shard_size, cfg.fast, progress)
