"""Export: `curate export` of a subset vs a raw copy of the same tar bytes.

Corpora: `curate synth` shards of 1000 samples, run twice: 640-pixel JPEGs (~36 KB per sample with its txt,
json and tar headers: DataComp's average, 450 TB / 12.8 B samples) and 224-pixel JPEGs (~12 KB per sample,
where the per-sample work weighs three times more). Subset: every uid of the corpus, so the export writes the same samples (and about the same bytes) that
it reads. Limit: the input tar files copied byte for byte with `shutil.copyfileobj` (read + write through
user space, 1 MiB buffers, no parsing) into another directory of the same file system. Throughput is input
bytes per second; the ratio is stage throughput / copy throughput. Also reported, for context: the same
copy done member by member with Python's `tarfile` (parse + re-write, no uid lookup), and the same export
with the fast path off (`fast=False`: every shard through `iter_shard`, as before the fast path existed).
"""

from __future__ import annotations

import shutil
import tarfile
import time
from pathlib import Path

import numpy as np

from common import compare


def make_corpus_once(path: Path, samples: int, shard_size: int, image_size: int) -> Path:
    from curate.stages.synth import SynthConfig
    from curate.stages.synth import entry as synth

    manifest = path / "manifest.json"
    if not manifest.exists() or '"complete": true' not in manifest.read_text():
        shutil.rmtree(path, ignore_errors=True)
        synth.run(path, SynthConfig(samples=samples, shard_size=shard_size, seed=0, corrupt=0.0, target_samples=0,
                                    image_size=image_size))
    return path


def all_uids(shards: list[str]) -> list[str]:
    from curate.io.shards import iter_shard, sample_uid

    uids = []
    for url in shards:
        for raw in iter_shard(url, lambda key, reason: None):
            uids.append(sample_uid(raw))
    return uids


def raw_copy(shards: list[str], out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for url in shards:
        with open(url, "rb") as src, open(out / Path(url).name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def tarfile_copy(shards: list[str], out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for url in shards:
        with tarfile.open(url, "r|") as src, tarfile.open(out / Path(url).name, "w", format=tarfile.GNU_FORMAT) as dst:
            for info in src:
                dst.addfile(info, src.extractfile(info))


def run(work: Path, samples: int, repeats: int, log=print, image_size: int = 640, context: bool = True,
        map_tasks: bool = False) -> dict:
    """`context`: also time the tarfile copy and the export without its fast path (slow: ~100 MB/s).
    `map_tasks`: also time the export as map tasks (`workers=2, tasks=4`: two worker processes, each input
    shard read twice) and check it writes the stage's tars."""
    from curate.io.shards import expand_shards
    from curate.io.uids import write_uid_npy
    from curate.config import configure
    from curate.stages.export import ExportConfig
    from curate.stages.export.entry import run as export

    started = time.perf_counter()
    name = f"export-corpus-{samples}" + ("" if image_size == 224 else f"-{image_size}px")
    corpus = make_corpus_once(work / name, samples, shard_size=1000, image_size=image_size)
    shards = expand_shards(str(corpus))
    total_bytes = sum(Path(s).stat().st_size for s in shards)
    write_uid_npy(all_uids(shards), work / "export-subset" / "uids.npy")
    log(f"  export corpus ready: {len(shards)} shards, {total_bytes / 1e6:.0f} MB ({time.perf_counter() - started:.1f} s)")
    written: dict = {}

    def stage():
        out = work / "export-out"
        shutil.rmtree(out, ignore_errors=True)
        report = export(str(corpus), work / "export-subset", out, *configure(ExportConfig, shard_size=1000))
        written["samples"] = report.written
        written["bytes"] = sum(p.stat().st_size for p in out.glob("*.tar"))

    comparison = compare(stage, lambda: raw_copy(shards, work / "export-copy"), repeats, log, "export")
    extra: dict = {}
    # what a curation does: keep ~30 % (random samples, so the kept runs are short), read and scan all of it
    uids = all_uids(shards)
    keep = np.random.default_rng(30).random(len(uids)) < 0.3
    write_uid_npy([uid for uid, k in zip(uids, keep) if k], work / "export-subset-30" / "uids.npy")
    subset_times = []
    for _ in range(repeats):
        shutil.rmtree(work / "export-out-30", ignore_errors=True)
        start = time.perf_counter()
        report = export(str(corpus), work / "export-subset-30", work / "export-out-30",
                        *configure(ExportConfig, shard_size=1000))
        subset_times.append(time.perf_counter() - start)
    log(f"  export of a 30 % subset: best {min(subset_times):.3f} s, {report.written} samples written")
    extra.update(subset30_s=subset_times, subset30_written=report.written,
                 subset30_mb_s=total_bytes / 1e6 / min(subset_times))
    if map_tasks:
        task_times = []
        for _ in range(repeats):
            shutil.rmtree(work / "export-out-tasks", ignore_errors=True)
            start = time.perf_counter()
            export(str(corpus), work / "export-subset", work / "export-out-tasks",
                   *configure(ExportConfig, shard_size=1000, workers=2, tasks=4))
            task_times.append(time.perf_counter() - start)
        same = all(a.read_bytes() == b.read_bytes() for a, b in zip(sorted((work / "export-out").glob("*.tar")),
                                                                     sorted((work / "export-out-tasks").glob("*.tar"))))
        log(f"  export as map tasks (2 workers, 4 tasks): best {min(task_times):.2f} s, same tars: {same}")
        extra.update(map_tasks_s=task_times, map_tasks_mb_s=total_bytes / 1e6 / min(task_times), map_tasks_same_tars=same)
    if context:
        tar_times = []
        for _ in range(repeats):
            start = time.perf_counter()
            tarfile_copy(shards, work / "export-tarcopy")
            tar_times.append(time.perf_counter() - start)
        shutil.rmtree(work / "export-out-iter-shard", ignore_errors=True)
        start = time.perf_counter()
        export(str(corpus), work / "export-subset", work / "export-out-iter-shard",
               *configure(ExportConfig, shard_size=1000, fast=False))
        iter_shard_s = time.perf_counter() - start
        fast_tars = sorted((work / "export-out").glob("*.tar"))
        slow_tars = sorted((work / "export-out-iter-shard").glob("*.tar"))
        same = [p.name for p in fast_tars] == [p.name for p in slow_tars] and all(
            a.read_bytes() == b.read_bytes() for a, b in zip(fast_tars, slow_tars))
        log(f"  export with iter_shard only: {iter_shard_s:.2f} s, same tars as the fast path: {same}")
        mb = total_bytes / 1e6
        extra |= {"tarfile_copy_s": tar_times, "tarfile_copy_mb_s": mb / min(tar_times),
                 "iter_shard_export_s": iter_shard_s, "iter_shard_export_mb_s": mb / iter_shard_s,
                 "iter_shard_same_tars": same}
    for d in ("export-out", "export-copy", "export-tarcopy", "export-out-iter-shard", "export-out-tasks",
              "export-out-30"):
        shutil.rmtree(work / d, ignore_errors=True)
    mb = total_bytes / 1e6
    return {"samples": samples, "image_size": image_size, "shards": len(shards), "input_bytes": total_bytes,
            "written_samples": written["samples"], "output_bytes": written["bytes"], **comparison.as_dict(),
            "stage_mb_s": mb / comparison.best_stage, "limit_mb_s": mb / comparison.best_limit,
            "throughput_ratio": comparison.best_limit / comparison.best_stage, **extra}
