"""`curate export` in one process: a reader thread reads the shards in pieces, this thread scans them, looks
the uids up and patches new headers, and a writer thread writes the output tars (see the package docstring
for the outputs and the fast path)."""

from __future__ import annotations

import itertools
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Union

import numpy as np

from curate.errors import CurateError
from curate.io.atomic import temp_path
from curate.io.shards import INVALID_JSON_REPLACED, RawSample, ShardReadError, iter_shard, json_is_invalid, sample_uid
from curate.io.tar_blocks import DeterministicTarWriter, PlainTar
from curate.stages.export import ExportReport
from curate.io.uids import load_subset
from curate.stages.export.common import (KEY_DIGITS, NO_UID, REPEAT, TAR_FORMAT, FastRun, PieceBuffer, PieceReader,
                                         PlainPieces, SubsetIndex, piece_sample, shard_uids, unexported_members,
                                         write_fast_run, write_raw_sample, write_records)

BACKGROUND_WRITES = True  # False: _TarWriter writes in the calling thread
KeptUnit = Union[RawSample, FastRun]


# ---------------------------------------------------------------- the kept samples, in input order

def kept_samples(urls: list[str], subset: SubsetIndex, problems: list[tuple],
                 fast: bool = True) -> Iterator[KeptUnit]:
    """The input samples whose uid is in the subset, in input order, each uid once: one RawSample at a time,
    or FastRuns with the kept samples of a piece of a shard (`fast=False`: RawSamples only).

    Shards (local files or fsspec URLs) are read in pieces (PIECE_BYTES) by a reader thread (PieceReader)
    and scanned piece by piece (`scan_plain_tar(final=False)`), so that a piece is read, scanned, patched and
    written while it is in the cache. The samples a piece completes are committed (uids looked up, marked
    found, yielded); a sample still open at the piece's end is carried over to the next piece. When a piece
    is not plain, the shard goes on in iter_shard, which skips the samples already committed: they are
    exactly the samples iter_shard reads first (see scan_plain_tar)."""
    pieces = PieceReader(urls, list(range(len(urls)))) if fast and urls else None
    try:
        for number, url in enumerate(urls):
            committed = 0
            if pieces is not None:
                committed = yield from _stream_shard(url, number, pieces, subset, problems)
                if committed is None:
                    continue
            try:
                yield from _kept_of_shard(url, subset, problems, skip=committed)
            except ShardReadError as exc:  # not bad data but an unreadable shard: stop, so that a rerun can resume
                raise CurateError(f"{exc}; export stopped at this shard (the tars written so far are complete and "
                                  "kept): make the shard readable and rerun to resume") from None
    finally:
        if pieces is not None:
            pieces.close()


def _stream_shard(url: str, number: int, pieces: PieceReader, subset: SubsetIndex,
                  problems: list[tuple]) -> Iterator[FastRun]:
    """The fast path over one shard, piece by piece (see kept_samples). Returns None when the whole shard was
    read, else the number of samples committed before the piece that needs iter_shard."""
    walk = PlainPieces(number, pieces)
    for source, region, tar, _ in walk:
        run = _fast_shard(url, subset, problems, source, region, tar)
        if len(run.samples):
            yield run
    return walk.rest



def _kept_of_shard(url: str, subset: SubsetIndex, problems: list[tuple], skip: int = 0) -> Iterator[RawSample]:
    """The kept samples of one shard (see kept_samples), after its first `skip` samples."""
    for raw in iter_shard(url, lambda key, reason, url=url: problems.append((url, key, None, reason))):
        if raw.index < skip:
            continue
        uid = sample_uid(raw)
        if uid is None:
            problems.append((url, raw.key, None, NO_UID))
            continue
        position = subset.position(uid)
        if position < 0:
            continue
        if subset.found[position]:
            problems.append((url, raw.key, uid, REPEAT))
            continue
        subset.found[position] = True
        problems.extend((url, raw.key, None, reason) for reason in unexported_members(raw))
        if json_is_invalid(raw):
            problems.append((url, raw.key, uid, INVALID_JSON_REPLACED))
        raw.uid = uid
        yield raw



def _fast_shard(url: str, subset: SubsetIndex, problems: list[tuple], source: PieceBuffer, buffer: memoryview,
                tar: PlainTar) -> FastRun:
    """The kept samples of a plain piece (`buffer`, layout `tar`): uids looked up, repeats and samples without a
    uid recorded, kept samples marked found."""
    uids, content = shard_uids(url, buffer, tar)
    position = subset.positions(uids)
    in_subset = np.flatnonzero(position >= 0)
    first = np.zeros(len(in_subset), dtype=bool)  # the first sample of each uid in this piece
    first[np.unique(position[in_subset], return_index=True)[1]] = True
    new = first & ~subset.found[position[in_subset]]
    kept = in_subset[new]
    subset.found[position[kept]] = True
    rows = []  # problems (rare), in sample order as iter_shard's path meets them
    repeats = in_subset[~new].tolist()
    if repeats or len(in_subset) < len(uids):
        no_uid = [sample for sample, uid in enumerate(uids) if uid is None]
        rows += [(sample, NO_UID if uids[sample] is None else REPEAT) for sample in repeats + no_uid]
    rows += [(sample, INVALID_JSON_REPLACED) for sample in kept[content[kept]].tolist()
             if json_is_invalid(piece_sample(url, buffer, tar, sample, copy=False))]
    for sample, reason in sorted(rows):
        problems.append((url, tar.key(sample), uids[sample], reason))
    return FastRun(url, source, buffer, tar, kept, uids, content)



# ---------------------------------------------------------------- the output tars

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") and "SC_IOV_MAX" in os.sysconf_names else 16


def write_gathered(file, pieces: list) -> None:
    """Write the bytes-like `pieces` in order to the unbuffered `file`, up to IOV_MAX per `os.writev`: a
    30 % subset leaves thousands of short runs per tar, one system call each with plain writes."""
    if not hasattr(os, "writev"):
        for piece in pieces:
            view = memoryview(piece).cast("B")
            while view.nbytes:  # a raw file may write less than it is given
                view = view[file.write(view):]
        return
    fd = file.fileno()
    views = [memoryview(piece).cast("B") for piece in pieces]
    first = 0
    while first < len(views):
        batch = views[first:first + IOV_MAX]
        written = os.writev(fd, batch)
        if not written and any(view.nbytes for view in batch):
            raise OSError(f"{file.name}: the system wrote nothing of {sum(view.nbytes for view in batch)} bytes")
        while written and written >= views[first].nbytes:  # whole pieces written
            written -= views[first].nbytes
            first += 1
        if written:  # a short write ended inside this piece
            views[first] = views[first][written:]
        while first < len(views) and not views[first].nbytes:
            first += 1


class _TarWriter:
    """The output tars, written by one background thread: writing (system calls that release the GIL)
    overlaps reading and scanning the next shard. A file-like object for DeterministicTarWriter: `write` only
    queues (the data must stay unchanged until written: `flush` returns the Future to wait for), and each
    flush is one task, so the thread needs the GIL rarely. A tar is written under a temp name and renamed when
    complete, as atomic_path does; after a failure nothing more is written and the temp file is removed."""

    def __init__(self):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="curate-export-writer")
        self.queued: list = []
        self.queued_bytes = 0
        self.last: Future | None = None
        self.error: BaseException | None = None  # the thread's failure, raised in the main thread
        self.file, self.tmp = None, None  # thread side: the open temp file and its name

    def _submit(self, fn, *args) -> Future | None:
        if self.error is not None:
            raise self.error
        if not BACKGROUND_WRITES:
            self._run(fn, *args)
            if self.error is not None:
                raise self.error
            return None
        self.last = self.executor.submit(self._run, fn, *args)
        return self.last

    def _run(self, fn, *args) -> None:
        if self.error is None:
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - raised in the main thread by _submit or wait
                self.error = exc

    def open(self, path: Path) -> Path:
        """Start the tar `path`; returns its temp name (atomic_path's naming)."""
        tmp = temp_path(path)
        self._submit(self._open, tmp)
        return tmp

    def _open(self, tmp: Path) -> None:
        self.tmp = tmp
        self.file = open(tmp, "wb", buffering=0)  # `_write` gathers the queued pieces itself

    def write(self, data) -> None:
        self.queued.append(data)
        self.queued_bytes += len(data)
        if self.queued_bytes >= 1 << 24:
            self.flush()

    def flush(self) -> Future | None:
        if self.queued:
            self._submit(self._write, self.queued)
            self.queued, self.queued_bytes = [], 0
        return self.last

    def _write(self, pieces: list) -> None:
        write_gathered(self.file, pieces)

    def finish(self, tmp: Path, path: Path) -> None:
        """The tar is complete: write what is queued, close it and rename it to `path`."""
        self._submit(self._finish, self.queued, tmp, path)
        self.queued, self.queued_bytes = [], 0

    def _finish(self, pieces: list, tmp: Path, path: Path) -> None:
        self._write(pieces)
        self.file.close()
        self.file = None
        os.replace(tmp, path)
        self.tmp = None

    def wait(self) -> None:
        if self.last is not None:
            self.last.result()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Wait for the thread; remove the temp file of a tar left unfinished (by an error)."""
        self.executor.shutdown(wait=True)
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None


class _KeptStream:
    """kept_samples, handed out in units of at most a given number of samples (a FastRun is split)."""

    def __init__(self, units: Iterator[KeptUnit]):
        self.units, self.pending = units, None

    def next_unit(self, limit: int) -> KeptUnit | None:
        unit, self.pending = self.pending or next(self.units, None), None
        if isinstance(unit, FastRun) and len(unit.samples) > limit:
            unit, self.pending = unit.split(limit)
        return unit


def _unit_samples(unit: KeptUnit) -> int:
    return len(unit.samples) if isinstance(unit, FastRun) else 1


def export_in_process(urls: list[str], uid_file: Path, out: Path, config: dict, shard_size: int, fast: bool,
                      progress: Callable[[int], None] | None = None) -> ExportReport:
    """Write the subset's samples into OUT/NNNNN.tar in this process, then the records; `out` is checked and
    its manifest started by the caller. `fast=False` reads every shard with iter_shard (the reference the fast
    path is tested against). `progress(n)`: n more samples are in finished tars (once per output tar)."""
    index = SubsetIndex(load_subset(uid_file))
    if hasattr(progress, "set_total"):
        progress.set_total(len(index))  # at most: uids not found in the shards are never written
    problems: list[tuple] = []
    report = ExportReport(subset=len(index), input_shards=len(urls), out_dir=str(out))
    stream = _KeptStream(kept_samples(urls, index, problems, fast=fast))
    tars = _TarWriter()
    try:
        for shard_number in itertools.count():
            unit = stream.next_unit(shard_size)
            if unit is None:
                break
            path = out / f"{shard_number:05d}.tar"
            start = report.written
            if path.exists():  # finished by an interrupted run of this same export: identical bytes
                while unit is not None:
                    report.written += _unit_samples(unit)
                    room = shard_size - (report.written - start)
                    unit = stream.next_unit(room) if room else None
                report.tars_reused += 1
            else:
                tmp = tars.open(path)
                writer = DeterministicTarWriter(tars, TAR_FORMAT)
                while unit is not None:
                    if isinstance(unit, FastRun):
                        write_fast_run(writer, report.written, unit)
                        unit.source.last_write = tars.flush()
                    else:
                        write_raw_sample(writer, f"{report.written:0{KEY_DIGITS}d}", unit)
                    report.written += _unit_samples(unit)
                    room = shard_size - (report.written - start)
                    unit = stream.next_unit(room) if room else None
                writer.close()
                tars.finish(tmp, path)
            report.shards.append({"name": path.name, "samples": report.written - start})
            if progress:
                progress(report.written - start)
        tars.wait()
    finally:
        tars.close()

    return write_records(out, index, problems, config, report)
