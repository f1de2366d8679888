"""`curate export` as map tasks (`--executor ray`, `--workers N`, `--tasks T`): the same tars and records as
the one-process export (local.py), from any number of processes or Ray workers.

The output numbering is global (output sample i is the i-th kept sample in input order, tar k holds samples
k·S .. k·S+S-1), so a shard's samples can be placed only once the kept counts of every earlier shard are
known, and "a uid found twice is exported once, the first time" is a question about the whole input. Hence
two map passes around a small reduce:

1. find (map, T spans of input shards): read each shard (in pieces by the fast path while it reads as a
   plain tar, then `iter_shard`, as the one-process export), and record every sample whose uid is in
   the subset (its number in the shard, its subset position, its key) and the problems met, each with the
   number of samples before it in the shard. Output: `find-tNNNNN.parquet` + `problems-tNNNNN.parquet`,
   then a marker.
2. reduce (the driver): the candidates in input order; the first of each subset position is kept, the rest
   are repeats (recorded), and the members a kept sample cannot export are recorded (the find pass noted
   them for every candidate). Writes `kept_shard.npy` / `kept_sample.npy` (input shard and sample number of
   every output sample, in output order) and the per-shard facts the writers check (size, version).
3. write (map, T spans of output tars): each task writes its tars, reading the input shards they draw from
   again, forward only (block ranges with patched headers from the pieces of the fast path, `iter_shard`
   from where a shard stops reading plain: the one-process code; sample numbers agree either way),
   skipping tars already under their final name (resume).
4. the driver writes `missing_uids.npy`, `export.errors.parquet` (problems in input order: shard, then the
   sample they precede, as the one-process export meets them) and `export_manifest.json`, then deletes the
   parts (`OUT.parts/export-<hash>/`).

Input shards are read twice (find, write), and a shard that feeds two output tars of different tasks is
read by both. The driver writes the subset once, sorted and without repeats, into the parts dir
(`subset.npy`); the tasks map it (the processes of one machine share its pages) and check that the user's
file kept its size and mtime. The driver holds the candidates' shard, sample and subset position (24 bytes
each) and a found flag per subset uid; each task its piece buffers (~25 MiB). Not supported:
--rank/--world-size (the write pass needs the reduce's placement: one driver submits both passes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.config import RunOptions
from curate.errors import CurateError
from curate.io.atomic import atomic_path
from curate.io.shards import INVALID_JSON_REPLACED, ShardReadError, iter_shard, json_is_invalid, sample_uid
from curate.io.tables import write_table_atomic
from curate.io.tar_blocks import DeterministicTarWriter
from curate.io.uids import is_sorted_unique, load_subset, sorted_unique_pairs
from curate.run.executors import executor_session
from curate.run.mapreduce import DEFAULT_TASKS, layout_parts_dir, parts_root, remove_parts, start_map
from curate.run.markers import Markers
from curate.stages.export import ExportReport
from curate.stages.export.common import (ERRORS_SCHEMA, KEY_DIGITS, NO_UID, REPEAT, TAR_FORMAT, FastRun, PieceReader,
                                         PlainPieces, SubsetIndex, piece_sample, shard_uids, unexported_members,
                                         write_fast_run, write_raw_sample, write_records)

FIND, WRITE = "export-find", "export-write"
CANDIDATES_SCHEMA = pa.schema([("shard", pa.int64()), ("sample", pa.int64()), ("position", pa.int64()),
                               ("key", pa.string())])
# `before`: samples of the shard yielded before the problem (its place in the one-process order); `phase` 0
# for what reading a shard reports, 1 for the verdict on a sample (no uid, repeat, a member not exported), 2
# for a member that will not be exported if the sample is kept (the reduce decides; then it becomes 1)
PROBLEMS_SCHEMA = pa.schema([("shard_number", pa.int64()), ("before", pa.int64()), ("phase", pa.int8()),
                             *ERRORS_SCHEMA])


@dataclass
class ExportLayout:
    """What fixes the map outputs; its hash names `<out>.parts/export-<hash>`."""

    config: dict  # the manifest's: shards, subset sha256, shard size
    fast: bool
    tasks: int


@dataclass
class FindTask:
    name: str
    parts_dir: str
    subset_path: str  # the user's file (checked unchanged); the tasks read the parts dir's snapshot
    subset_stamp: list
    shards: list  # [(shard number, url)]
    fast: bool


@dataclass
class WriteTask:
    name: str
    parts_dir: str
    out_dir: str
    tars: list  # output tar numbers
    shard_size: int
    shards: dict  # shard number -> [url, size, version] (`_stamp`) for the shards these tars draw from
    fast: bool


SUBSET_SNAPSHOT = "subset.npy"  # the subset sorted, each uid once, as the export found it at its start
_SUBSET: dict[str, SubsetIndex] = {}  # one subset index per process (a worker runs several tasks)


def _write_snapshot(uid_file: Path, parts_dir: Path) -> None:
    """The parts dir's copy of the subset, sorted and without repeats (as `curate filter` writes it already),
    once per export: the tasks map it instead of each loading and sorting the user's file."""
    snapshot = parts_dir / SUBSET_SNAPSHOT
    if snapshot.exists():
        return
    pairs = load_subset(uid_file)
    if not is_sorted_unique(pairs):
        pairs = sorted_unique_pairs(pairs)
    with atomic_path(snapshot) as tmp, open(tmp, "wb") as f:
        np.save(f, pairs)


def _subset(task: "FindTask") -> SubsetIndex:
    """The subset snapshot, memory-mapped: processes on one machine share its pages, none holds a copy (only
    this export writes the file, so nobody truncates it under the mapping). The user's file changed since the
    export started is an error."""
    if _stamp(task.subset_path) != task.subset_stamp:
        raise CurateError(f"{task.subset_path}: the subset file changed since this export started; rerun the "
                          "export")
    snapshot = str(Path(task.parts_dir) / SUBSET_SNAPSHOT)
    if snapshot not in _SUBSET:
        _SUBSET.clear()
        _SUBSET[snapshot] = SubsetIndex(load_subset(Path(snapshot), mmap=True), sorted_unique=True,
                                        track_found=False)  # (the reduce marks what is found)
    return _SUBSET[snapshot]


# what fsspec back ends report that changes when an object is rewritten (the first one present is used)
_VERSION_KEYS = ("mtime", "LastModified", "last_modified", "updated", "ETag", "etag", "created")


def _stamp(url: str) -> list:
    """[size, version] of a shard, to notice one that changes between the passes: the mtime in ns of a local
    file, else what the fsspec back end reports (modification time or ETag); [-1, -1] when unknown (the
    readers report an unreadable shard themselves)."""
    try:
        if "://" not in url:
            stat = os.stat(url)
            return [stat.st_size, stat.st_mtime_ns]
        fs, path = fsspec.core.url_to_fs(url)
        info = fs.info(path)
    except Exception:  # noqa: BLE001 - OSError locally; fsspec back ends raise many types
        return [-1, -1]
    version = next((info[key] for key in _VERSION_KEYS if info.get(key) is not None), -1)
    return [info.get("size", -1), version if isinstance(version, (int, float)) else str(version)]


def export_find_task(task: FindTask) -> dict:
    """Candidates and problems of the task's shards (see the module docstring, step 1)."""
    subset = _subset(task)
    parts = Path(task.parts_dir)
    candidates: list[tuple] = []
    problems: list[tuple] = []
    facts = {}
    streamed = {number: url for number, url in task.shards if task.fast}
    pieces = PieceReader(streamed, list(streamed)) if streamed else None
    try:
        for number, url in task.shards:
            stamp = _stamp(url)  # before reading: a change while it is read shows in the write pass
            skip = _find_plain(url, number, pieces, subset, candidates, problems) if number in streamed else 0
            if skip is not None:
                _find_slow(url, number, skip, subset, candidates, problems)
            facts[str(number)] = stamp
    finally:
        if pieces is not None:
            pieces.close()
    _write_rows(parts / f"find-{task.name}.parquet", CANDIDATES_SCHEMA, candidates)
    _write_rows(_problems_file(parts, task.name), PROBLEMS_SCHEMA, problems)
    Markers(parts, FIND).mark(task.name, {"shards": facts, "candidates": len(candidates)})
    return {"task": task.name, "ran": True}


def _find_plain(url: str, number: int, pieces, subset: SubsetIndex, candidates: list, problems: list) -> int | None:
    """The candidates of a local shard read in pieces by the fast path; returns None when it read the whole
    shard, else the number of samples after which iter_shard must go on (`PlainPieces.rest`)."""
    walk = PlainPieces(number, pieces)
    for _, region, tar, first in walk:
        uids, content = shard_uids(url, region, tar)
        for sample, (uid, position) in enumerate(zip(uids, subset.positions(uids).tolist())):
            if position >= 0:
                candidates.append((number, first + sample, position, tar.key(sample)))
                if content[sample] and json_is_invalid(piece_sample(url, region, tar, sample, copy=False)):
                    problems.append((number, first + sample, 2, url, tar.key(sample), uid, INVALID_JSON_REPLACED))
            elif uid is None:
                problems.append((number, first + sample, 1, url, tar.key(sample), None, NO_UID))
    return walk.rest


def _find_slow(url: str, number: int, skip: int, subset: SubsetIndex, candidates: list, problems: list) -> None:
    """The candidates of a shard read by iter_shard, after its first `skip` samples (read by the fast path)."""
    yielded = 0

    def note(key, reason):
        problems.append((number, yielded, 0, url, key, None, reason))

    try:
        for raw in iter_shard(url, note):
            if yielded >= skip:
                uid = sample_uid(raw)
                position = -1 if uid is None else subset.position(uid)
                if position >= 0:
                    candidates.append((number, yielded, position, raw.key))
                    problems.extend((number, yielded, 2, url, raw.key, None, reason)
                                    for reason in unexported_members(raw))
                    if json_is_invalid(raw):
                        problems.append((number, yielded, 2, url, raw.key, uid, INVALID_JSON_REPLACED))
                elif uid is None:
                    problems.append((number, yielded, 1, url, raw.key, None, NO_UID))
            yielded += 1
    except ShardReadError as exc:  # not bad data: the task fails, the run reports it
        raise CurateError(f"{exc}; make the shard readable and rerun to resume") from None


def _problems_file(parts_dir: Path, name: str) -> Path:
    """The problems a find task met (the write pass records none)."""
    return parts_dir / f"{FIND}-problems-{name}.parquet"


def _write_rows(path: Path, schema: pa.Schema, rows: list[tuple]) -> None:
    columns = list(zip(*rows)) if rows else [[] for _ in schema]
    write_table_atomic(pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(columns, schema)], schema=schema),
                       path)


def export_write_task(task: WriteTask) -> dict:
    """The task's output tars (see the module docstring, step 3); finished ones are skipped."""
    parts, out = Path(task.parts_dir), Path(task.out_dir)
    kept_shard = np.load(parts / "kept_shard.npy", mmap_mode="r")
    kept_sample = np.load(parts / "kept_sample.npy", mmap_mode="r")
    todo = [t for t in task.tars if not (out / f"{t:05d}.tar").exists()]  # others: written by an interrupted run
    runs = {}  # tar number -> [(input shard, its samples)]
    for tar_number in todo:
        first = tar_number * task.shard_size
        shards = np.asarray(kept_shard[first:first + task.shard_size])
        samples = np.asarray(kept_sample[first:first + task.shard_size]).astype(np.int64)
        breaks = np.flatnonzero(np.diff(shards) != 0) + 1
        runs[tar_number] = [(int(s[0]), part) for s, part in zip(np.split(shards, breaks), np.split(samples, breaks))]
    order = list(dict.fromkeys(number for tar_runs in runs.values() for number, _ in tar_runs))
    streamed = {n: task.shards[str(n)][0] for n in order if task.fast}
    pieces = PieceReader(streamed, list(streamed)) if streamed else None
    cursor = None
    try:
        for tar_number in todo:
            path = out / f"{tar_number:05d}.tar"
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                writer = DeterministicTarWriter(f, TAR_FORMAT)
                index = tar_number * task.shard_size
                for number, samples in runs[tar_number]:
                    url, *stamp = task.shards[str(number)]
                    if stamp != _stamp(url):
                        raise CurateError(f"{url}: the shard changed since this export started (size, modification "
                                          "time or ETag); rerun the export")
                    if cursor is None or cursor.number != number:
                        if cursor is not None and cursor.number in streamed:
                            pieces.abandon(cursor.number)  # the rest of it is not needed here
                        cursor = _ShardCursor(url, number, pieces if number in streamed else None)
                    cursor.write(writer, index, samples)
                    index += len(samples)
                writer.close()
    finally:
        if pieces is not None:
            pieces.close()
    Markers(parts, WRITE).mark(task.name, {"tars_reused": len(task.tars) - len(todo)})
    return {"task": task.name, "ran": True}


class _ShardCursor:
    """One input shard's samples for the write pass, asked for in ascending order: from the pieces of the fast
    path while the shard reads plain (block ranges with new headers), then from iter_shard (the one-process
    code). Sample numbers are iter_shard's, which the fast path's equal (see `PlainPieces`)."""

    def __init__(self, url: str, number: int, pieces):
        self.url, self.number = url, number
        self.plain = PlainPieces(number, pieces) if pieces is not None else None
        self.walk = iter(self.plain) if self.plain is not None else None
        self.piece = None  # (buffer, bytes, layout, number of its first sample) of the current piece
        self.slow = None if self.walk is not None else self._slow(0)

    def write(self, writer: DeterministicTarWriter, index: int, samples: np.ndarray) -> None:
        done = 0
        while done < len(samples):
            if self.walk is None:
                for sample in samples[done:].tolist():
                    self._write_slow(writer, index + done, sample)
                    done += 1
                return
            if self.piece is not None and samples[done] < self.piece[3] + self.piece[2].samples:
                source, region, tar, first = self.piece
                stop = int(np.searchsorted(samples, first + tar.samples))
                uids, content = shard_uids(self.url, region, tar)  # which samples need their uid in the json
                write_fast_run(writer, index + done,
                               FastRun(self.url, source, region, tar, samples[done:stop] - first, uids, content))
                done = stop
                continue
            self.piece = next(self.walk, None)
            if self.piece is None:  # the shard read to its end, or iter_shard takes over
                self.walk = None
                if self.plain.rest is None:
                    raise CurateError(f"{self.url}: the shard has fewer samples than when this export started; "
                                      "rerun the export")
                self.slow = self._slow(self.plain.rest)

    def _slow(self, skip: int):
        """iter_shard's samples numbered from `skip` on."""
        try:
            for yielded, raw in enumerate(iter_shard(self.url, lambda key, reason: None)):
                if yielded >= skip:
                    yield yielded, raw
        except ShardReadError as exc:
            raise CurateError(f"{exc}; make the shard readable and rerun to resume") from None

    def _write_slow(self, writer: DeterministicTarWriter, index: int, sample: int) -> None:
        for yielded, raw in self.slow:
            if yielded == sample:
                write_raw_sample(writer, f"{index:0{KEY_DIGITS}d}", raw)
                return
        raise CurateError(f"{self.url}: the shard has fewer samples than when this export started; rerun the "
                          "export")


def export_in_tasks(urls: list[str], uid_file: Path, out: Path, config: dict, shard_size: int, fast: bool,
                    opts: RunOptions = RunOptions()) -> ExportReport:
    """Steps 1-4 of the module docstring on `opts`' executor; `out` is checked and its manifest started by the
    caller."""
    executor, workers, tasks, retries, ray_address = (opts.executor, int(opts.workers), opts.tasks,
                                                      int(opts.retries), opts.ray_address)
    count = max(1, min(int(tasks or DEFAULT_TASKS), len(urls))) if urls else 1
    layout = ExportLayout(config, bool(fast), count)
    parts_dir = layout_parts_dir(out, "export", layout)
    with executor_session(executor, workers=workers, ray_address=ray_address) as run:
        job = start_map(parts_dir, layout, FIND, count, executor, workers, rank=0, world_size=1)
        stamp = _stamp(str(uid_file))  # before the snapshot is read from it
        _write_snapshot(uid_file, parts_dir)
        cuts = [(i * len(urls)) // count for i in range(count + 1)]
        find_tasks = [FindTask(job.names[i], str(parts_dir), str(uid_file), stamp,
                               [(n, urls[n]) for n in range(cuts[i], cuts[i + 1])], bool(fast)) for i in job.todo]
        report = run.run(export_find_task, find_tasks, retries=retries)
        report.raise_if_failed("export (find map tasks)")
        facts, problems, tar_count, written, index = _reduce(parts_dir, job.names, urls, shard_size)
        write_job = start_map(parts_dir, layout, WRITE, count, executor, workers, rank=0, world_size=1)
        tar_cuts = [(i * tar_count) // count for i in range(count + 1)]
        write_tasks = []
        for i in write_job.todo:
            tars = list(range(tar_cuts[i], tar_cuts[i + 1]))
            shards = _shards_of(parts_dir, tars, shard_size)
            write_tasks.append(WriteTask(write_job.names[i], str(parts_dir), str(out), tars, shard_size,
                                         {str(n): [urls[n], *facts[str(n)]] for n in shards}, bool(fast)))
        report = run.run(export_write_task, write_tasks, retries=retries)
        report.raise_if_failed("export (write map tasks)")
    markers = write_job.markers
    problems.sort(key=lambda row: row[:3])  # stable: input order, as the one-process export meets them
    tars_reused = sum(markers.info(name).get("tars_reused", 0) for name in write_job.names)
    shards = [{"name": f"{k:05d}.tar", "samples": min(shard_size, written - k * shard_size)} for k in range(tar_count)]
    result = write_records(out, index, [row[3:] for row in problems], config,
                               ExportReport(written=written, subset=len(index), input_shards=len(urls),
                                            tars_reused=tars_reused, shards=shards, out_dir=str(out)))
    remove_parts(parts_dir, parts_root(out))
    return result


def _read_rows(path: Path) -> list[tuple]:
    table = pq.read_table(path, schema=PROBLEMS_SCHEMA)
    return list(zip(*(table.column(name).to_pylist() for name in PROBLEMS_SCHEMA.names)))


def _reduce(parts_dir: Path, names: list[str], urls: list[str], shard_size: int):
    """Step 2: kept samples in output order (written to the parts dir), repeats recorded, subset marked found.
    Returns (per-shard facts, problems so far, output tar count, samples written, subset index)."""
    markers = Markers(parts_dir, FIND)
    facts: dict = {}
    for name in names:
        facts.update(markers.info(name)["shards"])
    files = [parts_dir / f"find-{name}.parquet" for name in names]
    numbers = [pq.read_table(f, columns=["shard", "sample", "position"]) for f in files]
    shard, sample, position = (np.concatenate([t.column(c).to_numpy() for t in numbers]) if numbers
                               else np.empty(0, np.int64) for c in ("shard", "sample", "position"))
    first = np.zeros(len(position), dtype=bool)
    first[np.unique(position, return_index=True)[1]] = True  # the first occurrence of each subset uid
    index = SubsetIndex(load_subset(parts_dir / SUBSET_SNAPSHOT, mmap=True), sorted_unique=True)
    index.found[position[first]] = True
    problems = [row for name in names for row in _read_rows(_problems_file(parts_dir, name))]
    if_kept = [row for row in problems if row[2] == 2]
    if if_kept:  # members not exported: recorded for the kept samples only
        pair = shard.astype(np.int64) << 32 | sample.astype(np.int64)
        kept = np.isin(np.array([row[0] << 32 | row[1] for row in if_kept], dtype=np.int64), pair[first])
        problems = [row for row in problems if row[2] != 2] + [(*row[:2], 1, *row[3:])
                                                               for row, k in zip(if_kept, kept.tolist()) if k]
    repeats = np.flatnonzero(~first)
    if len(repeats):  # keys only for these (a key column of every candidate could be large)
        starts = np.cumsum([0] + [t.num_rows for t in numbers])
        owner = np.searchsorted(starts, repeats, side="right") - 1
        for part in np.unique(owner).tolist():
            rows = repeats[owner == part]
            keys = pq.read_table(files[part], columns=["key"]).column("key").take(pa.array(rows - starts[part]))
            for row, key in zip(rows.tolist(), keys.to_pylist()):
                p = int(position[row])
                uid = f"{int(index.high[p]):016x}{int(index.low[p]):016x}"
                problems.append((int(shard[row]), int(sample[row]), 1, urls[int(shard[row])], key, uid, REPEAT))
    for name, values in (("kept_shard", shard[first]), ("kept_sample", sample[first])):
        with atomic_path(parts_dir / f"{name}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(values, dtype=np.int64))
    written = int(first.sum())
    return facts, problems, -(-written // shard_size), written, index


def _shards_of(parts_dir: Path, tars: list[int], shard_size: int) -> list[int]:
    """The input shards the output tars `tars` (consecutive) draw from."""
    if not tars:
        return []
    kept_shard = np.load(parts_dir / "kept_shard.npy", mmap_mode="r")
    return np.unique(np.asarray(kept_shard[tars[0] * shard_size:(tars[-1] + 1) * shard_size])).tolist()
