"""`curate export` as map tasks: the same tars, records and manifest as the one-process export, resumable."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest

from curate.errors import CurateError
from curate.io.uids import write_uid_npy
from curate.io.uids import is_sorted_unique
from curate.stages.export import common as export_common
from curate.stages.export import tasks as export_tasks
from curate.stages.export.common import MANIFEST

from conftest import run_export
from shard_builders import dirty_variants, uid_of, write_random_corpus


def outputs(directory):
    """file name -> bytes, and the manifest without its out_dir."""
    files = {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
    manifest = json.loads(files.pop(MANIFEST))
    manifest["report"].pop("out_dir")
    return files, manifest


def dirty_corpus(root, seed):
    """write_random_corpus's shards (repeated uids, odd json, no-uid samples) plus three damaged or unusual
    shards the fast path leaves to iter_shard."""
    subset = write_random_corpus(root / "shards", seed, shards=5)
    variants = dirty_variants()
    for number, name in enumerate(random.Random(seed).sample(sorted(variants), 3)):
        (root / "shards" / f"9{number}.tar").write_bytes(bytes(variants[name]))
    write_uid_npy(subset + [uid_of(1), uid_of(2)], root / "uids.npy")


@pytest.mark.parametrize("seed", range(4))
def test_map_tasks_write_the_one_process_bytes(tmp_path, seed, monkeypatch):
    dirty_corpus(tmp_path, seed)
    for shard_size in (1, 3):
        one = run_export(str(tmp_path / "shards"), tmp_path / "uids.npy", tmp_path / f"one{shard_size}",
                            shard_size=shard_size)
        want = outputs(tmp_path / f"one{shard_size}")
        assert one.problems and "_errors/export.parquet" in want[0]  # the records are part of the comparison
        # map tasks read in other pieces (from one block up): shards span pieces, samples are carried over,
        # and iter_shard takes over at other places than in the one-process run
        monkeypatch.setattr(export_common, "PIECE_BYTES", (512, 1536, 4096, 1 << 20)[seed])
        monkeypatch.setattr(export_common, "CARRY_BYTES", 1024)
        for tasks in (1, 2, 5):
            out = tmp_path / f"tasks{tasks}-{shard_size}"
            report = run_export(str(tmp_path / "shards"), tmp_path / "uids.npy", out, shard_size=shard_size,
                                   tasks=tasks, fast=seed % 2 == 0)
            assert outputs(out) == want, (tasks, shard_size)
            assert report.written == one.written and report.shards == one.shards
            assert not (tmp_path / f"{out.name}.parts").exists()  # the parts are deleted
        monkeypatch.undo()


def test_find_tasks_map_a_sorted_snapshot_of_the_subset(tmp_path):
    """The tasks read the parts dir's sorted, deduplicated copy of the subset memory-mapped (no copy per
    process); the user's file here is unsorted with repeats, and the outputs are the one-process ones."""
    dirty_corpus(tmp_path, 2)
    pairs = np.load(tmp_path / "uids.npy")
    assert not is_sorted_unique(pairs)
    run_export(str(tmp_path / "shards"), tmp_path / "uids.npy", tmp_path / "one", shard_size=2)
    run_export(str(tmp_path / "shards"), tmp_path / "uids.npy", tmp_path / "tasks", shard_size=2, tasks=3)
    assert outputs(tmp_path / "tasks") == outputs(tmp_path / "one")
    (index,) = export_tasks._SUBSET.values()
    assert isinstance(index.high, np.memmap) and isinstance(index.low, np.memmap) and index.found is None
    snapshot = np.empty(len(index), dtype=pairs.dtype)
    snapshot["f0"], snapshot["f1"] = index.high, index.low
    assert np.array_equal(snapshot, np.unique(pairs))  # sorted by (high, low), each uid once


def test_worker_processes_and_a_rerun(tmp_path):
    dirty_corpus(tmp_path, 7)
    run_export(str(tmp_path / "shards"), tmp_path / "uids.npy", tmp_path / "one", shard_size=2)
    report = run_export(str(tmp_path / "shards"), tmp_path / "uids.npy", tmp_path / "two", shard_size=2,
                           workers=2, tasks=3)
    assert outputs(tmp_path / "two") == outputs(tmp_path / "one")
    again = run_export(str(tmp_path / "shards"), tmp_path / "uids.npy", tmp_path / "two", shard_size=2,
                          workers=2, tasks=3)
    assert again.noop and again.written == report.written


def test_local_ray(tmp_path, ray_session):
    dirty_corpus(tmp_path, 8)
    run_export(str(tmp_path / "shards"), tmp_path / "uids.npy", tmp_path / "one", shard_size=3)
    run_export(str(tmp_path / "shards"), tmp_path / "uids.npy", tmp_path / "ray", shard_size=3,
                  executor="ray", tasks=3)
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "one")


def test_a_killed_write_pass_resumes_without_rewriting_finished_tars(tmp_path, monkeypatch):
    dirty_corpus(tmp_path, 9)
    run_export(str(tmp_path / "shards"), tmp_path / "uids.npy", tmp_path / "one", shard_size=1)
    original = export_tasks.export_write_task
    calls = []

    def dies_on_the_second_task(task):
        calls.append(task.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # not retried: the run stops, as a killed process would
        return original(task)

    monkeypatch.setattr(export_tasks, "export_write_task", dies_on_the_second_task)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_export(str(tmp_path / "shards"), tmp_path / "uids.npy", out, shard_size=1, tasks=4)
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert finished and not json.loads((out / MANIFEST).read_text())["complete"]
    monkeypatch.setattr(export_tasks, "export_write_task", original)
    report = run_export(str(tmp_path / "shards"), tmp_path / "uids.npy", out, shard_size=1, tasks=4)
    assert report.tars_reused == 0  # the first task is marked done: its tars are not even looked at again
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name in finished} == finished
    assert outputs(out) == outputs(tmp_path / "one")


def test_options_are_checked(tmp_path):
    dirty_corpus(tmp_path, 1)
    for options, message in (({"workers": 0}, "--workers must be >= 1"), ({"tasks": 0}, "--tasks must be >= 1"),
                             ({"executor": "slurm"}, "choose local or ray")):
        with pytest.raises(CurateError, match=message):
            run_export(str(tmp_path / "shards"), tmp_path / "uids.npy", tmp_path / "o", **options)


def test_cli_export_with_tasks(tmp_path, monkeypatch, capsys):
    from conftest import run_cli

    dirty_corpus(tmp_path, 2)
    run_export(str(tmp_path / "shards"), tmp_path / "uids.npy", tmp_path / "one", shard_size=4)
    code = run_cli(monkeypatch, "export", tmp_path / "shards", "--subset", tmp_path / "uids.npy",
                   "--out", tmp_path / "cli", "--shard-size", "4", "--tasks", "3")
    text = " ".join(capsys.readouterr().err.split())  # the console writes to stderr
    assert code == 0, text
    assert "exported" in text and "problems recorded" in text
    assert outputs(tmp_path / "cli") == outputs(tmp_path / "one")


def test_a_shard_or_subset_changed_between_the_passes_is_a_clear_error(tmp_path, monkeypatch):
    dirty_corpus(tmp_path, 3)
    original_reduce = export_tasks._reduce

    def reduce_then_touch(*args, **kwargs):
        result = original_reduce(*args, **kwargs)
        shard = sorted((tmp_path / "shards").glob("0*.tar"))[0]
        shard.write_bytes(shard.read_bytes() + bytes(512))  # a shard grows after the find pass
        return result

    monkeypatch.setattr(export_tasks, "_reduce", reduce_then_touch)
    with pytest.raises(CurateError, match=r"00000\.tar: the shard changed since this export started"):
        run_export(str(tmp_path / "shards"), tmp_path / "uids.npy", tmp_path / "a", shard_size=2, tasks=2)
    monkeypatch.undo()

    original_find = export_tasks.export_find_task

    def rewrite_subset_then_find(task):
        write_uid_npy([uid_of(5)], tmp_path / "uids.npy")
        export_tasks._SUBSET.clear()
        return original_find(task)

    monkeypatch.setattr(export_tasks, "export_find_task", rewrite_subset_then_find)
    with pytest.raises(CurateError, match=r"uids\.npy: the subset file changed since this export started"):
        run_export(str(tmp_path / "shards"), tmp_path / "uids.npy", tmp_path / "b", shard_size=2, tasks=2)


def test_an_fsspec_shard_rewritten_between_the_passes_is_a_clear_error(tmp_path, monkeypatch):
    """Behind a URL the back end's modification time (or ETag) stands for the file's mtime: an object
    rewritten with bytes of the same size is noticed too."""
    fsspec = pytest.importorskip("fsspec")
    dirty_corpus(tmp_path, 3)
    memory, root = fsspec.filesystem("memory"), f"curate-test-{tmp_path.name}"
    for path in sorted((tmp_path / "shards").iterdir()):
        memory.pipe(f"/{root}/{path.name}", path.read_bytes())
    original_reduce = export_tasks._reduce

    def reduce_then_rewrite(*args, **kwargs):
        result = original_reduce(*args, **kwargs)
        time.sleep(0.01)  # a later creation time
        memory.pipe(f"/{root}/00000.tar", memory.cat(f"/{root}/00000.tar"))  # same bytes, a new object
        return result

    monkeypatch.setattr(export_tasks, "_reduce", reduce_then_rewrite)
    try:
        with pytest.raises(CurateError, match=r"00000\.tar: the shard changed since this export started"):
            run_export(f"memory://{root}/*.tar", tmp_path / "uids.npy", tmp_path / "a", shard_size=2, tasks=2)
    finally:
        memory.rm(f"/{root}", recursive=True)
