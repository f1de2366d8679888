"""What the one-process export (local.py) and the map-task export (tasks.py) both use: the subset index, the
shards read in pieces by the fast path (PieceReader, PlainPieces), a piece's uids and samples, the two ways a
sample is written (a fast run's block ranges with new headers, or a RawSample member by member) and the
records that end an export."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import tarfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import fsspec
import numpy as np
import orjson
import pyarrow as pa

from curate.io.atomic import atomic_path, write_text_atomic
from curate.io.shards import CAPTION_EXT, MAX_MEMBER_BYTES, RawSample, is_pipe, json_with_uid, raw_json, sample_uid
from curate.io.tables import ERRORS_DIR, write_table_atomic
from curate.io.tar_blocks import (BLOCK, NAME_FIELD, DeterministicTarWriter, PlainTar, header_blocks,
                                  scan_plain_tar, zero_padding)
from curate.io.uids import DATACOMP_DTYPE, UID_RE, find_pairs, is_sorted_unique, is_uid, sorted_unique_pairs
from curate.stages.export import ExportReport

MANIFEST = "export_manifest.json"
SIZES = "sizes.json"  # {"00000.tar": samples, ...}: the shard table open_clip and DataComp's resharder read
MISSING = "missing_uids.npy"
ERRORS = f"{ERRORS_DIR}/export.parquet"
KEY_DIGITS = 9
SAFE_EXT = re.compile(r"[a-z0-9_][a-z0-9._-]{0,63}")
TAR_FORMAT = tarfile.GNU_FORMAT
NO_UID = "no uid: no valid json uid and no image + caption"
REPEAT = "uid already exported from an earlier sample; repeat skipped"
ERRORS_SCHEMA = pa.schema([("shard", pa.string()), ("key", pa.string()), ("uid", pa.string()),
                           ("reason", pa.string())])


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
        if not where:
            return result
        halves = np.frombuffer(bytes.fromhex("".join([uids[i] for i in where])), dtype=">u8").reshape(-1, 2)
        result[np.array(where, dtype=np.int64)] = find_pairs(self.high, self.low, halves[:, 0].astype(np.uint64),
                                                             halves[:, 1].astype(np.uint64))
        return result

    def missing_pairs(self) -> np.ndarray:
        pairs = np.empty(int((~self.found).sum()), dtype=DATACOMP_DTYPE)
        pairs["f0"], pairs["f1"] = self.high[~self.found], self.low[~self.found]
        return pairs


# ---------------------------------------------------------------- the fast path: shards read in pieces

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


PIECE_BYTES = 4 << 20  # the fast path reads shards in pieces this large: scanned and written while in cache
CARRY_BYTES = 1 << 20  # room before each piece for the end of the piece before (a sample not yet complete)
READ_AHEAD = 2  # pieces read ahead by the reader thread
WRITE_BEHIND = 1  # pieces whose writes may still be queued when their buffer comes round again


@dataclass
class Piece:
    number: int  # the shard's index in urls
    slot: PieceBuffer  # the bytes are slot.data[CARRY_BYTES:CARRY_BYTES + length]
    length: int
    final: bool  # the last piece of the shard (its end verified)
    error: bool = False  # the shard could not be read to its end in pieces: iter_shard decides


class PieceReader:
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

    def next(self) -> Piece | None:
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

    def _read(self, slot: PieceBuffer) -> Piece | None:
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
                    return Piece(self.number, slot, 0, False, error=True)
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
            piece = Piece(self.number, slot, done, final)
            if done < length or (final and self.file.read(1)):  # the file shrank or grew while read
                piece.error, piece.final = True, False
            if piece.final or piece.error:
                self._close()
            return piece
        except Exception:  # noqa: BLE001 - see above
            number = self.number
            self._close()
            return Piece(number, slot, 0, False, error=True)

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


class PlainPieces:
    """Shard `number` of the reader's stream, scanned piece by piece. Iterating gives (buffer, bytes, layout,
    number of its first sample in the shard) for each piece that completes samples. Then `rest` is None when
    the whole shard was read, else the number of samples given before the first piece that is not plain: from
    there on, iter_shard must read the shard (skipping that many samples, which are exactly its first ones)."""

    def __init__(self, number: int, pieces: PieceReader):
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


def _region(carry, piece: Piece) -> tuple[PieceBuffer, memoryview, bool]:
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


# ---------------------------------------------------------------- a piece's samples

def unexported_members(raw: RawSample) -> list[str]:
    """The reason, per member of a kept sample, why it is not exported (an extension outside [a-z0-9._-]).
    Recorded when the sample is selected, so that a resumed export, which skips finished tars, records them
    too."""
    return [f"member extension {ext[:80]!r} is not [a-z0-9._-]; not exported"
            for ext in raw.members if not SAFE_EXT.fullmatch(ext)]


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


# ---------------------------------------------------------------- writing samples

def write_raw_sample(writer: DeterministicTarWriter, key: str, raw: RawSample) -> None:
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


def write_fast_run(writer: DeterministicTarWriter, first_index: int, run: FastRun) -> None:
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
                    write_raw_sample(writer, f"{first_index + done + offset:0{KEY_DIGITS}d}", raw)
            else:
                write_fast_run(writer, first_index + done, replace(run, samples=part, content=None))
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


# ---------------------------------------------------------------- the end of an export

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
