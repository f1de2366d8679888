"""`curate export`: copy the samples of a subset (a DataComp `uids.npy`) into new WebDataset tar shards.

- Members are copied byte for byte (no decoding): every member of a kept sample (jpg, txt, json, ...),
  in its input order; samples in input order (shards in `expand_shards` order, samples in tar order).
- Output: OUT_DIR/00000.tar, 00001.tar, ... with `shard_size` samples each (the last may be smaller).
  Output keys are the running index of the sample in the export, 9 digits (`000000042.jpg`): input keys
  are never used in output names, so a member called `../x` or `/abs/x` cannot reach outside OUT_DIR or
  surprise a later extractor. The sample's uid travels in its `.json` `uid` field, where DataComp's tools
  look for it: a sample whose uid came from content (no valid json uid, as in img2dataset's shards) gets the
  field written into its `.json` (one is added when it has none); every other member, and the `.json` of a
  sample that holds its uid already, is copied byte for byte. Member extensions outside `[a-z0-9._-]` are
  dropped and recorded.
- Tar headers (GNU format) are deterministic (mtime 0, uid/gid 0, mode 0644, no user names): same input,
  same bytes.
- A subset uid found twice is exported once (the first occurrence); the repeat is recorded.
- Records: `missing_uids.npy` (subset uids not found in the shards, DataComp layout), `_errors/export.parquet`
  (unreadable members, corrupt shards, samples without a uid, repeats, invalid .json replaced), `sizes.json`
  (samples per output tar, the shard table that open_clip and DataComp's resharder read) and
  `export_manifest.json`, written first with `complete: false` and last with the report. A shard that cannot be opened or read at all (I/O,
  not bad data) stops the export with an error naming it; the finished tars are kept and a rerun resumes.
- Speed: shards (local files, or fsspec URLs: s3://, gs://, http://, ...) are read in pieces of
  PIECE_BYTES (4 MiB) by a reader thread; each piece is scanned (`curate.io.tar_blocks.scan_plain_tar`,
  vectorised over the headers), its complete samples' uids looked up, new headers patched in and its kept
  samples written as block ranges by a writer thread, all while the piece is in the CPU cache, with no
  per-member Python work. A sample still open at a piece's end is carried into the next piece. As long as
  the shard is plain (clean headers, nothing iter_shard would report) it stays on this path; at the first
  piece that is not (compressed, damaged, odd names or member types, an unexportable extension, a file that
  changed while read), the shard goes on in `iter_shard` from the first sample not yet committed. Both
  paths give the same bytes and records. Memory: READ_AHEAD + 2 + WRITE_BEHIND piece buffers (5 × 5 MiB),
  plus one for a sample larger than CARRY_BYTES.
- Resume: every tar is written under a temp name and renamed, so a tar under its final name is complete.
  A rerun with the same shards, subset and shard size re-reads the input but does not rewrite finished
  tars; a rerun after a complete export is a no-op. Another export's directory is refused.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import re
import tarfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Union

import fsspec
import numpy as np
import orjson
import pyarrow as pa

from curate.errors import CurateError
from curate.io.atomic import atomic_path, file_sha256, sweep_stale_temps, temp_path, write_text_atomic
from curate.io.shards import (CAPTION_EXT, INVALID_JSON_REPLACED, MAX_MEMBER_BYTES, RawSample, ShardReadError,
                               expand_shards, is_pipe, iter_shard, json_is_invalid, json_with_uid, raw_json,
                               sample_uid)
from curate.io.tables import ERRORS_DIR, write_table_atomic
from curate.io.tar_blocks import (BLOCK, NAME_FIELD, DeterministicTarWriter, PlainTar, header_blocks,
                                  scan_plain_tar, zero_padding)
from curate.io.uids import DATACOMP_DTYPE, UID_RE, is_uid
from curate.stages.filter import sorted_uid_pairs

MANIFEST = "export_manifest.json"
SIZES = "sizes.json"  # {"00000.tar": samples, ...}: the shard table open_clip and DataComp's resharder read
MISSING = "missing_uids.npy"
ERRORS = f"{ERRORS_DIR}/export.parquet"
KEY_DIGITS = 9
SAFE_EXT = re.compile(r"[a-z0-9_][a-z0-9._-]{0,63}")
TAR_FORMAT = tarfile.GNU_FORMAT
BACKGROUND_WRITES = True  # False: _TarWriter writes in the calling thread
NO_UID = "no uid: no valid json uid and no image + caption"
REPEAT = "uid already exported from an earlier sample; repeat skipped"
ERRORS_SCHEMA = pa.schema([("shard", pa.string()), ("key", pa.string()), ("uid", pa.string()),
                           ("reason", pa.string())])


@dataclass
class ExportReport:
    written: int = 0
    subset: int = 0
    missing: int = 0
    problems: int = 0
    input_shards: int = 0
    tars_reused: int = 0  # finished tars of an interrupted run, not rewritten
    shards: list[dict] = field(default_factory=list)  # [{"name": "00000.tar", "samples": n}, ...]
    out_dir: str = ""
    noop: bool = False  # the export was already complete


class SubsetIndex:
    """The subset's uids as sorted (high, low) uint64 halves, binary search per sample: 16 bytes per uid. A
    subset already sorted without repeats (as `curate filter` and DataComp write them) is used as it is; any
    other is sorted and deduplicated first (a few copies at once: ~4x the file at the peak). `found` (a byte
    per uid, which uids were exported) only with `track_found`."""

    def __init__(self, pairs: np.ndarray, sorted_unique: bool | None = None, track_found: bool = True):
        if sorted_unique is None:
            sorted_unique = is_sorted_unique(pairs)
        if not sorted_unique:
            pairs = sorted_unique_pairs(pairs)
        self.high, self.low = pairs["f0"], pairs["f1"]  # views: of the file, or of the sorted copy
        self.found = np.zeros(len(pairs), dtype=bool) if track_found else None

    def __len__(self) -> int:
        return len(self.high)

    def position(self, uid: str) -> int:
        """Index of `uid` in the subset, or -1."""
        high, low = np.uint64(int(uid[:16], 16)), np.uint64(int(uid[16:], 16))
        i = int(np.searchsorted(self.high, high))
        while i < len(self.high) and self.high[i] == high:
            if self.low[i] == low:
                return i
            i += 1
        return -1

    def positions(self, uids: list[str | None]) -> np.ndarray:
        """`position` of each uid (-1 for None), vectorized: an int64 array."""
        result = np.full(len(uids), -1, dtype=np.int64)
        where = [i for i, uid in enumerate(uids) if uid is not None]
        if not where or not len(self.high):
            return result
        halves = np.frombuffer(bytes.fromhex("".join([uids[i] for i in where])), dtype=">u8").reshape(-1, 2)
        high, low = halves[:, 0].astype(np.uint64), halves[:, 1].astype(np.uint64)
        left = np.searchsorted(self.high, high, side="left")
        right = np.searchsorted(self.high, high, side="right")
        hit = (right - left == 1) & (self.low[np.minimum(left, len(self.low) - 1)] == low)
        where = np.array(where, dtype=np.int64)
        result[where[hit]] = left[hit]
        for i in where[~hit & (right - left > 1)].tolist():  # several subset uids share the high half
            result[i] = self.position(uids[i])
        return result

    def missing_pairs(self) -> np.ndarray:
        pairs = np.empty(int((~self.found).sum()), dtype=DATACOMP_DTYPE)
        pairs["f0"], pairs["f1"] = self.high[~self.found], self.low[~self.found]
        return pairs


def subset_file(subset: str | Path) -> Path:
    path = Path(subset)
    if path.is_dir():
        path = path / "uids.npy"
    if not path.is_file():
        raise CurateError(f"{path}: no subset uid file; give the --out directory of `curate filter` "
                          "or a DataComp .npy subset")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:4] == b"PAR1":
        raise CurateError(f"{path}: is a Parquet table, not a subset; export takes the uids a selection kept: the "
                          "--out directory of `curate filter` (or its uids.npy), or a DataComp .npy subset. To "
                          "select from a score table run `curate filter` first")
    if magic != b"\x93NUMPY":
        raise CurateError(f"{path}: not a .npy file ({len(magic) and 'starts with ' + repr(magic) or 'empty'}); "
                          "give the --out directory of `curate filter` or a DataComp .npy subset")
    return path


def sorted_unique_pairs(pairs: np.ndarray) -> np.ndarray:
    """The subset sorted, each uid once (a repeated uid in the file would otherwise be reported missing)."""
    pairs = sorted_uid_pairs(pairs["f0"], pairs["f1"])
    if len(pairs) > 1:
        pairs = pairs[np.concatenate([[True], pairs[1:] != pairs[:-1]])]
    return pairs


def is_sorted_unique(pairs: np.ndarray, chunk: int = 1 << 24) -> bool:
    """Whether the (high, low) pairs are strictly increasing (checked in chunks: no temporaries the size of a
    billion-uid subset)."""
    for start in range(0, max(len(pairs) - 1, 0), chunk):
        part = np.asarray(pairs[start:start + chunk + 1])
        high, low = part["f0"], part["f1"]
        if not ((high[1:] > high[:-1]) | ((high[1:] == high[:-1]) & (low[1:] > low[:-1]))).all():
            return False
    return True


def load_subset(path: Path, mmap: bool = False) -> np.ndarray:
    """A DataComp subset file: structured `u8,u8` (high, low); any other dtype is a clear error. Read into
    memory unless `mmap` (a mapped file that its owner truncates meanwhile would kill the process: map only
    files of this export's own, or only to check the header)."""
    try:
        pairs = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CurateError(f"{path}: cannot read as a .npy uid file ({exc})") from None
    if pairs.dtype != DATACOMP_DTYPE or pairs.ndim != 1:
        raise CurateError(f"{path}: uid file has dtype {pairs.dtype} and shape {pairs.shape}, expected a 1-D "
                          "array of DataComp's structured 'u8,u8' (high and low 64 bits of the 128-bit uid); "
                          "write it with `curate filter`")
    return pairs


class PieceBuffer:
    """Bytes that the writer thread writes from: refilled only once the writes queued from them are done
    (`last_write`, the Future of the last one)."""

    def __init__(self):
        self.data = bytearray()
        self.last_write: Future | None = None

    def wait_for_writes(self) -> None:
        if self.last_write is not None:
            self.last_write.result()
            self.last_write = None


@dataclass
class FastRun:
    """Kept samples of one piece of a shard read by the fast path: its bytes, its layout and the kept sample
    numbers (input order). Written by patching new headers into `buffer` and copying block ranges."""

    url: str
    source: PieceBuffer  # holds the bytes; a buffer is refilled only once `source.last_write` is done
    buffer: memoryview  # the piece (with what was carried into it): a part of source.data
    tar: PlainTar
    samples: np.ndarray  # int64
    uids: list | None = None  # the uid of every sample of the piece (`shard_uids`)
    content: np.ndarray | None = None  # per sample of the piece: its uid comes from content, not its .json

    def split(self, count: int) -> tuple["FastRun", "FastRun"]:
        return (replace(self, samples=self.samples[:count]),
                replace(self, samples=self.samples[count:]))


KeptUnit = Union[RawSample, FastRun]
PIECE_BYTES = 4 << 20  # the fast path reads shards in pieces this large: scanned and written while in cache
CARRY_BYTES = 1 << 20  # room before each piece for the end of the piece before (a sample not yet complete)
READ_AHEAD = 2  # pieces read ahead by the reader thread
WRITE_BEHIND = 1  # pieces whose writes may still be queued when their buffer comes round again


@dataclass
class _Piece:
    number: int  # the shard's index in urls
    slot: PieceBuffer  # the bytes are slot.data[CARRY_BYTES:CARRY_BYTES + length]
    length: int
    final: bool  # the last piece of the shard (its end verified)
    error: bool = False  # the shard could not be read to its end in pieces: iter_shard decides


class _PieceReader:
    """The shards `urls[n]` for n in `numbers` (in order) read piece by piece on one helper thread, READ_AHEAD
    pieces ahead of the consumer: local files with plain reads, fsspec URLs (s3://, gs://, http://, ...)
    through fsspec. A slot (buffer) is refilled only after the writes queued from it are done."""

    def __init__(self, urls, numbers: list[int]):
        self.urls, self.todo = urls, collections.deque(numbers)  # shard numbers still to read, in order
        # + the piece in use, the one before it (its end is carried over) and WRITE_BEHIND being written
        self.slots = [PieceBuffer() for _ in range(READ_AHEAD + 2 + WRITE_BEHIND)]
        self.queued: list[Future] = []
        self.submitted = 0
        self.file, self.number, self.offset, self.size = None, -1, 0, 0  # reader-thread state
        self.abandoned = -1  # shards up to this number are no longer read
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="curate-export-reader")

    def next(self) -> _Piece | None:
        """The next piece of the stream (None when every shard is read)."""
        while len(self.queued) < READ_AHEAD + 1:
            slot = self.slots[self.submitted % len(self.slots)]
            self.queued.append(self.executor.submit(self._read, slot))
            self.submitted += 1
        return self.queued.pop(0).result()

    def abandon(self, number: int) -> None:
        """Read no more of shard `number` (pieces already read are skipped by the consumer)."""
        self.abandoned = number

    def _open(self, url: str) -> None:
        if is_pipe(url):  # a command's output has no size to read in pieces: iter_shard streams it
            raise OSError(f"{url}: a pipe")
        if "://" in url:
            self.file = fsspec.open(url, "rb").open()
            self.size = self.file.size
            if not isinstance(self.size, int):
                raise OSError(f"{url}: size unknown")
        else:
            self.file = open(url, "rb", buffering=0)
            self.size = os.fstat(self.file.fileno()).st_size

    def _read(self, slot: PieceBuffer) -> _Piece | None:
        # any failure (a local OSError, or whatever an fsspec back end raises) makes an error piece: iter_shard
        # then reads the shard and reports what is wrong
        try:
            while self.file is None or self.number <= self.abandoned:
                self._close()
                if not self.todo:
                    return None
                self.number, self.offset = self.todo.popleft(), 0
                try:
                    self._open(self.urls[self.number])
                except Exception:  # noqa: BLE001 - see above
                    self._close()
                    return _Piece(self.number, slot, 0, False, error=True)
            length = min(PIECE_BYTES, self.size - self.offset)
            slot.wait_for_writes()
            if len(slot.data) < CARRY_BYTES + PIECE_BYTES:
                slot.data = bytearray(CARRY_BYTES + PIECE_BYTES)
            view = memoryview(slot.data)[CARRY_BYTES:CARRY_BYTES + length]
            done = 0
            while done < length:
                more = self.file.readinto(view[done:])
                if not more:
                    break
                done += more
            view.release()
            self.offset += done
            final = self.offset == self.size
            piece = _Piece(self.number, slot, done, final)
            if done < length or (final and self.file.read(1)):  # the file shrank or grew while read
                piece.error, piece.final = True, False
            if piece.final or piece.error:
                self._close()
            return piece
        except Exception:  # noqa: BLE001 - see above
            number = self.number
            self._close()
            return _Piece(number, slot, 0, False, error=True)

    def _close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(Exception):  # (a remote file's close may fail too; nothing is lost)
                self.file.close()
        self.file = None

    def close(self) -> None:
        """Stop: no wait (this can run in the reader's own thread when a generator is collected there); a read
        still running only fills a buffer nobody uses, and the thread closes its file when it ends."""
        for future in self.queued:
            future.cancel()
        self.todo, self.abandoned = collections.deque(), 1 << 62
        self.executor.submit(self._close)
        self.executor.shutdown(wait=False)


def kept_samples(urls: list[str], subset: SubsetIndex, problems: list[tuple],
                 fast: bool = True) -> Iterator[KeptUnit]:
    """The input samples whose uid is in the subset, in input order, each uid once: one RawSample at a time,
    or FastRuns with the kept samples of a piece of a shard (`fast=False`: RawSamples only).

    Shards (local files or fsspec URLs) are read in pieces (PIECE_BYTES) by a reader thread (_PieceReader)
    and scanned piece by piece (`scan_plain_tar(final=False)`), so that a piece is read, scanned, patched and
    written while it is in the cache. The samples a piece completes are committed (uids looked up, marked
    found, yielded); a sample still open at the piece's end is carried over to the next piece. When a piece
    is not plain, the shard goes on in iter_shard, which skips the samples already committed: they are
    exactly the samples iter_shard reads first (see scan_plain_tar)."""
    pieces = _PieceReader(urls, list(range(len(urls)))) if fast and urls else None
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


def _stream_shard(url: str, number: int, pieces: _PieceReader, subset: SubsetIndex,
                  problems: list[tuple]) -> Iterator[FastRun]:
    """The fast path over one shard, piece by piece (see kept_samples). Returns None when the whole shard was
    read, else the number of samples committed before the piece that needs iter_shard."""
    walk = PlainPieces(number, pieces)
    for source, region, tar, _ in walk:
        run = _fast_shard(url, subset, problems, source, region, tar)
        if len(run.samples):
            yield run
    return walk.rest


class PlainPieces:
    """Shard `number` of the reader's stream, scanned piece by piece. Iterating gives (buffer, bytes, layout,
    number of its first sample in the shard) for each piece that completes samples. Then `rest` is None when
    the whole shard was read, else the number of samples given before the first piece that is not plain: from
    there on, iter_shard must read the shard (skipping that many samples, which are exactly its first ones)."""

    def __init__(self, number: int, pieces: _PieceReader):
        self.number, self.pieces, self.rest = number, pieces, None

    def __iter__(self) -> Iterator[tuple[PieceBuffer, memoryview, PlainTar, int]]:
        number, pieces, committed = self.number, self.pieces, 0
        carry = None  # the open sample at the end of the piece before: a view, or (grown buffer, length)
        while True:
            piece = pieces.next()
            while piece is not None and piece.number < number:  # the rest of a shard given up on: skipped
                piece = pieces.next()
            if piece is None or piece.number != number or piece.error:
                pieces.abandon(number)
                self.rest = committed  # (piece.number > number: the shard could not be opened)
                return
            source, region, grown = _region(carry, piece)
            total = len(region)
            tar = scan_plain_tar(region, total, MAX_MEMBER_BYTES, final=piece.final)
            if tar is None or not all(SAFE_EXT.fullmatch(ext) for ext in tar.exts):
                pieces.abandon(number)
                self.rest = committed
                return
            if tar.samples:
                yield source, region, tar, committed
                committed += tar.samples
            if piece.final:
                self.rest = None
                return
            # nothing committed from a grown region: it grows in place; else the rest is carried (copied)
            carry = (source, total) if grown and not tar.samples else region[tar.end:]


def _region(carry, piece: _Piece) -> tuple[PieceBuffer, memoryview, bool]:
    """(buffer, bytes to scan, whether the buffer is a grown one): the bytes carried over from the piece
    before (a view to copy, or (grown buffer, length) to extend), followed by the piece. A carry up to
    CARRY_BYTES goes into the room before the piece; a larger one (a big sample, or no sample complete yet)
    into a buffer of its own, doubled as needed so that a huge member costs O(size) copying."""
    data = piece.slot.data
    if carry is None:
        return piece.slot, memoryview(data)[CARRY_BYTES:CARRY_BYTES + piece.length], False
    if isinstance(carry, memoryview) and len(carry) <= CARRY_BYTES:
        start = CARRY_BYTES - len(carry)
        data[start:CARRY_BYTES] = carry
        return piece.slot, memoryview(data)[start:CARRY_BYTES + piece.length], False
    if isinstance(carry, memoryview):  # a new buffer: the old one may hold samples still to be written
        grown, length = PieceBuffer(), len(carry)
        grown.data = bytearray(2 * (length + piece.length))
        grown.data[:length] = carry
    else:
        grown, length = carry
    if len(grown.data) < length + piece.length:
        bigger = bytearray(2 * (length + piece.length))
        bigger[:length] = memoryview(grown.data)[:length]
        grown.data = bigger
    grown.data[length:length + piece.length] = memoryview(data)[CARRY_BYTES:CARRY_BYTES + piece.length]
    return grown, memoryview(grown.data)[:length + piece.length], True


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


def unexported_members(raw: RawSample) -> list[str]:
    """The reason, per member of a kept sample, why it is not exported (an extension outside [a-z0-9._-]).
    Recorded when the sample is selected, so that a resumed export, which skips finished tars, records them
    too."""
    return [f"member extension {ext[:80]!r} is not [a-z0-9._-]; not exported"
            for ext in raw.members if not SAFE_EXT.fullmatch(ext)]


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


def shard_uids(url: str, buffer: bytearray, tar: PlainTar) -> tuple[list[str | None], np.ndarray]:
    """sample_uid of every sample of the piece, and which of them come from content (no valid `.json` uid).
    The usual case (a .json member that orjson reads, holding a valid uid) is done here, as load_json_object
    would; every other sample goes through sample_uid itself."""
    json_member = np.full(tar.samples, -1, dtype=np.int64)
    if "json" in tar.exts:
        is_json = tar.ext_id == tar.exts.index("json")
        json_member[tar.sample[is_json]] = np.flatnonzero(is_json)
    json_start = np.where(json_member >= 0, (tar.header_block[json_member] + 1) * BLOCK, 0)
    json_end = np.where(json_member >= 0, json_start + tar.size[json_member], -1)
    uids: list[str | None] = []
    content = np.zeros(tar.samples, dtype=bool)
    view = memoryview(buffer)
    loads, uid_match, append = orjson.loads, UID_RE.fullmatch, uids.append
    for sample, (start, end) in enumerate(zip(json_start.tolist(), json_end.tolist())):
        if end >= 0:
            try:
                meta = loads(view[start:end])
                uid = meta.get("uid") if type(meta) is dict else None
            except orjson.JSONDecodeError:
                uid = None
            if type(uid) is str and uid_match(uid):  # is_uid
                append(uid)
                continue
        raw = piece_sample(url, view, tar, sample, copy=False)
        uid = sample_uid(raw)
        append(uid)
        # (a json that orjson refused may still hold a valid uid for json.loads, e.g. with NaN elsewhere in it)
        content[sample] = uid is not None and not is_uid(raw_json(raw)[0].get("uid"))
    return uids, content


def piece_sample(url: str, buffer, tar: PlainTar, sample: int, copy: bool = True) -> RawSample:
    """Sample `sample` of a scanned piece as a RawSample (members in tar order). `copy=False` leaves the
    members other than .json and .txt as views of the buffer (valid while it is)."""
    view, members = memoryview(buffer), {}
    for m in range(int(tar.first[sample]), int(tar.first[sample + 1])):
        data_start = (int(tar.header_block[m]) + 1) * BLOCK
        ext, data = tar.exts[tar.ext_id[m]], view[data_start:data_start + int(tar.size[m])]
        members[ext] = bytes(data) if copy or ext in ("json", CAPTION_EXT) else data  # sample_uid decodes these
    return RawSample(tar.key(sample), members, url, sample)


def _write_raw(writer: DeterministicTarWriter, key: str, raw: RawSample) -> None:
    """The sample's members under the output key, but those `unexported_members` names, with its uid in its
    `.json` (`json_with_uid`: added when the uid came from content, so that DataComp's tools find it; a
    sample without a .json gains one, last)."""
    uid = raw.uid or sample_uid(raw)
    patched = json_with_uid(raw, uid) if uid is not None else None
    for ext, data in raw.members.items():
        if SAFE_EXT.fullmatch(ext):
            writer.add(f"{key}.{ext}", patched if ext == "json" and patched is not None else data)
    if patched is not None and "json" not in raw.members:
        writer.add(f"{key}.json", patched)


def _write_run(writer: DeterministicTarWriter, first_index: int, run: FastRun) -> None:
    """The run's samples as output samples first_index, first_index + 1, ...: new headers are patched into the
    piece's buffer and the samples' block ranges written as they are (their extensions are all safe). A sample
    whose uid came from content is written member by member instead, with the uid put into its .json."""
    if run.content is not None and run.content[run.samples].any():
        flagged = run.content[run.samples]
        breaks = np.flatnonzero(np.diff(flagged.astype(np.int8)) != 0) + 1
        done = 0
        for part, part_flagged in zip(np.split(run.samples, breaks), np.split(flagged, breaks)):
            if part_flagged[0]:
                for offset, sample in enumerate(part.tolist()):
                    raw = piece_sample(run.url, run.buffer, run.tar, sample)
                    raw.uid = run.uids[sample]
                    _write_raw(writer, f"{first_index + done + offset:0{KEY_DIGITS}d}", raw)
            else:
                _write_run(writer, first_index + done, replace(run, samples=part, content=None))
            done += len(part)
        return
    tar, samples = run.tar, run.samples
    counts = tar.first[samples + 1] - tar.first[samples]
    members = np.repeat(tar.first[samples] - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
    running = first_index + np.repeat(np.arange(len(samples)), counts)
    if first_index + len(samples) > 10 ** KEY_DIGITS:  # keys would need more digits: plain member writes
        view = run.buffer
        for m, index in zip(members.tolist(), running.tolist()):
            start = (int(tar.header_block[m]) + 1) * BLOCK
            writer.add(f"{index:0{KEY_DIGITS}d}.{tar.exts[tar.ext_id[m]]}", view[start:start + int(tar.size[m])])
        return
    ext_table = np.zeros((len(tar.exts), NAME_FIELD - KEY_DIGITS - 1), dtype=np.uint8)
    for i, ext in enumerate(tar.exts):
        ext_table[i, :len(ext)] = np.frombuffer(ext.encode("ascii"), dtype=np.uint8)
    names = np.empty((len(members), NAME_FIELD), dtype=np.uint8)
    names[:, :KEY_DIGITS] = running[:, None] // 10 ** np.arange(KEY_DIGITS - 1, -1, -1, dtype=np.int64) % 10 + ord("0")
    names[:, KEY_DIGITS] = ord(".")
    names[:, KEY_DIGITS + 1:] = ext_table[tar.ext_id[members]]
    table = np.frombuffer(run.buffer, dtype=np.uint8, count=len(run.buffer) // BLOCK * BLOCK).reshape(-1, BLOCK)
    table[tar.header_block[members]] = header_blocks(names, tar.size[members], writer.format)
    zero_padding(table, tar, members)
    starts, ends = tar.sample_blocks()
    breaks = np.flatnonzero(np.diff(samples) != 1) + 1  # runs of consecutive samples: one range each
    first, last = samples[np.append(0, breaks)], samples[np.append(breaks - 1, len(samples) - 1)]
    writer.add_block_ranges(run.buffer, (starts[first] * BLOCK).tolist(), (ends[last] * BLOCK).tolist())


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


def export_subset(shards_spec, subset: str | Path, out_dir: str | Path, shard_size: int = 10_000,
                  fast: bool = True, *, executor: str = "local", workers: int = 1, tasks: int | None = None,
                  retries: int = 1, ray_address: str | None = None,
                  progress: Callable[[int], None] | None = None) -> ExportReport:
    """Write the subset's samples into OUT_DIR/NNNNN.tar (see the module docstring). `fast=False` reads every
    shard with iter_shard (the reference the fast path is tested against). `executor` ray, `workers` > 1 or
    `tasks`: the same outputs from map tasks (curate/stages/export_distributed.py). `progress(n)`: n more
    samples are in finished tars (once per output tar; as map tasks, once at the end)."""
    from curate.run.mapreduce import check_task_options

    if shard_size < 1:
        raise CurateError(f"--shard-size {shard_size}: must be >= 1")
    if executor not in ("local", "ray"):
        raise CurateError(f"--executor {executor!r}: choose local or ray")
    check_task_options(workers, tasks, retries)
    uid_file = subset_file(subset)
    load_subset(uid_file, mmap=True)  # a bad file is an error now (only its header is read here)
    urls = expand_shards(shards_spec)
    out = Path(out_dir)
    # `format`: how samples are written (2: content uids go into the .json); tars of another format are not reused
    config = {"shards": urls, "subset_sha256": file_sha256(uid_file), "shard_size": shard_size, "format": 2}
    out.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(out)  # tars of an export killed earlier
    earlier = _check_out_dir(out, config)
    if earlier is not None and earlier.get("complete"):
        return ExportReport(**{**earlier["report"], "noop": True})
    if earlier is None:
        write_text_atomic(out / MANIFEST, json.dumps({"complete": False, "config": config}, indent=2) + "\n")
    if executor != "local" or int(workers) > 1 or tasks is not None:  # (a Slurm array runs one export per task)
        from curate.stages.export_distributed import export_distributed

        result = export_distributed(urls, uid_file, out, config, shard_size, fast, executor, int(workers), tasks,
                                    int(retries), ray_address)
        if progress:
            progress(result.written)
        return result

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
                        _write_run(writer, report.written, unit)
                        unit.source.last_write = tars.flush()
                    else:
                        _write_raw(writer, f"{report.written:0{KEY_DIGITS}d}", unit)
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


def write_records(out: Path, index: SubsetIndex, problems: list[tuple], config: dict,
                  report: ExportReport) -> ExportReport:
    """The end of an export: `missing_uids.npy`, `export.errors.parquet` (`problems`: (shard, key, uid, reason)
    rows) and the complete manifest; fills in the report's missing and problem counts."""
    with atomic_path(out / MISSING) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, index.missing_pairs())
    report.missing = int((~index.found).sum())
    report.problems = len(problems)
    errors_path = out / ERRORS
    if problems:
        rows = [dict(zip(ERRORS_SCHEMA.names, p)) for p in problems]
        write_table_atomic(pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA), errors_path, meta={"stage": "export"})
    elif errors_path.exists():
        errors_path.unlink()
    sizes = {shard["name"]: shard["samples"] for shard in report.shards}
    write_text_atomic(out / SIZES, json.dumps(sizes, indent=1) + "\n")
    write_text_atomic(out / MANIFEST, json.dumps({"complete": True, "config": config, "report": asdict(report)},
                                                 indent=2) + "\n")
    return report
