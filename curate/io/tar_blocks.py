"""Tar at the block level: one deterministic tar writer, and a header scan of plain tar files done with numpy.

Writer: members get the headers Python's `tarfile` writes for a `TarInfo` with mtime 0, mode 0644, uid/gid 0
and empty owner names (USTAR or GNU format), the archive ends with two zero blocks and is padded to a whole
record (20 blocks), exactly as `tarfile.open(path, "w", format=...)` does, so the bytes equal tarfile's. The
headers are built from a template that `tarfile` itself produced (name, size and checksum filled in), so the
project's tars do not depend on a hand copy of the header layout; names longer than the name field or sizes
beyond 11 octal digits go through `tarfile.TarInfo.tobuf`.

Scan (`scan_plain_tar`): reads the member layout of a whole tar held in memory without per-member Python
work. It accepts only archives whose every header it understands exactly as `tarfile` and
`curate.io.shards.iter_shard` do (plain regular members with short printable ASCII `KEY.EXT` names, numeric
fields spelled spaces/octal digits/NULs, valid checksums, no repeated extension in a sample, nothing but zero
blocks after the last member) and returns None for anything else, so that such a shard can be read by the
general (slow, careful) reader instead.
"""

from __future__ import annotations

import functools
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from curate.io.atomic import atomic_path

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 20 blocks: tarfile pads a closed archive to a multiple of this
NAME_FIELD = 100
MAX_OCTAL_SIZE = 8 ** 11 - 1  # the largest size tarfile writes as 11 octal digits (larger: base-256)
ENCODING, ERRORS = tarfile.ENCODING, "surrogateescape"  # what tarfile.open(..., "w") uses for names
_ZERO_BLOCK = bytes(BLOCK)


# ---------------------------------------------------------------- deterministic headers

def tarfile_header(name: str, size: int, tar_format: int) -> bytes:
    """The reference: the header `tarfile` writes for our deterministic member (also used for long names)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tar_format, ENCODING, ERRORS)


@functools.lru_cache(maxsize=None)
def _template(tar_format: int) -> np.ndarray:
    """tarfile's header for an empty name and size 0, with the checksum field blanked to spaces (as it is
    when the checksum is computed); name, size and checksum are filled in per member."""
    block = np.frombuffer(tarfile_header("", 0, tar_format), dtype=np.uint8).copy()
    block[148:156] = ord(" ")
    block[124:136] = 0  # size field: written per member
    block.flags.writeable = False  # cached and shared
    return block


@functools.lru_cache(maxsize=None)
def _template_bytes(tar_format: int) -> tuple[bytes, int]:
    """The template as bytes, and the sum of its bytes (the checksum of a header with empty name and size)."""
    block = _template(tar_format)
    return block.tobytes(), int(block.sum())


def header_block(name: str, size: int, tar_format: int) -> bytes:
    """One member header, equal to `tarfile_header(name, size, tar_format)`."""
    encoded = name.encode(ENCODING, ERRORS)
    if len(encoded) > NAME_FIELD or not 0 <= size <= MAX_OCTAL_SIZE:
        return tarfile_header(name, size, tar_format)
    template, template_sum = _template_bytes(tar_format)
    size_field = b"%011o\0" % size
    checksum = template_sum + sum(encoded) + sum(size_field)
    return b"".join((encoded, bytes(NAME_FIELD - len(encoded)), template[NAME_FIELD:124], size_field,
                     template[136:148], b"%06o\0 " % checksum, template[156:]))


def header_blocks(names: np.ndarray, sizes: np.ndarray, tar_format: int) -> np.ndarray:
    """Many headers at once: `names` (n, 100) uint8 NUL-padded name fields, `sizes` (n,) int64 each
    <= MAX_OCTAL_SIZE -> (n, 512) uint8, row i equal to tarfile's header for (names[i], sizes[i])."""
    n = len(sizes)
    blocks = np.empty((n, BLOCK), dtype=np.uint8)
    blocks[:] = _template(tar_format)
    blocks[:, :NAME_FIELD] = names
    size_digits = ((sizes[:, None] >> np.arange(30, -1, -3, dtype=np.int64)) & 7) + ord("0")  # 11 octal digits
    blocks[:, 124:135] = size_digits
    blocks[:, 135] = 0
    # the template's bytes (checksum field as 8 spaces, empty name and size) + the name + the size digits
    checksums = _template_bytes(tar_format)[1] + names.sum(axis=1, dtype=np.int64) + size_digits.sum(axis=1)
    blocks[:, 148:154] = ((checksums[:, None] >> np.arange(15, -1, -3, dtype=np.int64)) & 7) + ord("0")
    blocks[:, 154] = 0  # "%06o\0" then the placeholder's last space stays
    return blocks


def end_of_archive(offset: int) -> bytes:
    """What tarfile writes on close after `offset` bytes of members: two zero blocks, then zeros to a record."""
    offset += 2 * BLOCK
    return bytes(2 * BLOCK + (-offset % RECORD))


class DeterministicTarWriter:
    """Writes members with deterministic headers (see the module docstring) to an open binary file."""

    def __init__(self, file, tar_format: int):
        self.file, self.format, self.offset = file, tar_format, 0

    def add(self, name: str, data) -> None:
        """One member; `data` is any bytes-like object."""
        size = len(data) if not isinstance(data, memoryview) else data.nbytes
        header = header_block(name, size, self.format)
        self.file.write(header)
        self.file.write(data)
        padding = -size % BLOCK
        if padding:
            self.file.write(_ZERO_BLOCK[:padding])
        self.offset += len(header) + size + padding

    def add_block_ranges(self, buffer, starts: list[int], ends: list[int]) -> None:
        """Whole, already formatted member blocks (header + data + padding, e.g. from `scan_plain_tar`):
        buffer[start:end] for each range (byte offsets, multiples of BLOCK)."""
        view, write = memoryview(buffer), self.file.write
        for start, end in zip(starts, ends):
            write(view[start:end])
        size = sum(ends) - sum(starts)
        assert size % BLOCK == 0
        self.offset += size

    def close(self) -> None:
        self.file.write(end_of_archive(self.offset))


def write_tar_atomic(path: str | Path, samples: Iterable[tuple[str, dict[str, bytes]]],
                     tar_format: int = tarfile.USTAR_FORMAT) -> None:
    """Write (key, {ext: bytes}) samples as a deterministic tar (members KEY.ext in the given order),
    renamed into place when complete."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            writer = DeterministicTarWriter(f, tar_format)
            for key, members in samples:
                for ext, data in members.items():
                    writer.add(f"{key}.{ext}", data)
            writer.close()


# ---------------------------------------------------------------- scanning plain tars

@dataclass
class PlainTar:
    """The member layout of a plain tar that `scan_plain_tar` accepted. Member i: header block
    `header_block[i]`, its data in the blocks after it, `size[i]` bytes, sample `sample[i]`, extension
    `exts[ext_id[i]]` (lower-cased, as iter_shard gives it). Members of a sample are consecutive."""

    header_block: np.ndarray  # int64 block index of each member's header
    size: np.ndarray  # int64
    sample: np.ndarray  # int64 sample number of each member, 0, 0, 0, 1, 1, ...
    ext_id: np.ndarray  # int64 index into exts
    exts: list[str]
    first: np.ndarray  # int64 per sample: its first member; one more entry at the end, the member count
    key_length: np.ndarray  # int64 per sample: length of the key in the first member's name
    names: np.ndarray  # (members, 100) uint8 name fields as read
    end: int  # byte offset after the last member's data blocks

    @property
    def samples(self) -> int:
        return len(self.first) - 1

    def key(self, sample: int) -> str:
        """The sample's key as iter_shard gives it."""
        return self.names[self.first[sample], :self.key_length[sample]].tobytes().decode("ascii")

    def sample_blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """(first block, end block) of every sample: its members' headers, data and padding."""
        starts = self.header_block[self.first[:-1]]
        return starts, np.append(starts[1:], self.end // BLOCK)


# the numeric header fields (mode, uid, gid, size, mtime, checksum, devmajor, devminor) as byte ranges
_NUMERIC_FIELDS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (148, 156), (329, 337), (337, 345))
_NUMERIC_COLUMNS = np.concatenate([np.arange(start, stop) for start, stop in _NUMERIC_FIELDS])
_FIELD_STARTS = np.cumsum([0] + [stop - start for start, stop in _NUMERIC_FIELDS])[:-1]
# byte classes for the numeric fields: NUL, space, octal digit, anything else
_BYTE_CLASS = np.full(256, 3, dtype=np.uint8)
_BYTE_CLASS[0], _BYTE_CLASS[ord(" ")], _BYTE_CLASS[ord("0"):ord("8")] = 0, 1, 2
_SIZE_FIELD, _CHECKSUM_FIELD = 3, 5
_POSITIONS = np.arange(NAME_FIELD, dtype=np.uint8)[None, :]
_UNPRINTABLE = np.ones(256, dtype=bool)
_UNPRINTABLE[0x20:0x7F] = False
_LOWER = np.arange(256, dtype=np.uint8)
_LOWER[ord("A"):ord("Z") + 1] += 32


@functools.lru_cache(maxsize=256)
def _field_weights(signature: bytes) -> np.ndarray | None:
    """Octal digit weights for one layout of the numeric fields (its byte classes), or None when a field
    is not spaces, octal digits, then spaces or NULs (or only spaces and NULs: 0). Every field of that form
    means the same number to tarfile's reader; other spellings it may also accept are refused here."""
    weights = np.zeros(len(signature), dtype=np.int64)
    for (start, stop), offset in zip(_NUMERIC_FIELDS, _FIELD_STARTS.tolist()):
        classes = signature[offset:offset + stop - start]
        digits = [i for i, c in enumerate(classes) if c == 2]
        if not digits:
            if any(c > 1 for c in classes):
                return None
            continue
        first, last = digits[0], digits[-1]
        if (any(c != 1 for c in classes[:first]) or any(c != 2 for c in classes[first:last + 1])
                or any(c > 1 for c in classes[last + 1:])):
            return None
        weights[offset + first:offset + last + 1] = 8 ** np.arange(last - first, -1, -1, dtype=np.int64)
    return weights


def _numeric_fields(headers: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(sizes, checksums) of n headers, or None when one of their numeric fields is not in the accepted form."""
    parts = [headers[:, 100:156], headers[:, 329:345]]  # the numeric fields: two runs of columns
    digit = [(part - np.uint8(ord("0"))) < 8 for part in parts]
    if all((d == d[0]).all() and ((part == part[0]) | d).all() for d, part in zip(digit, parts)):
        # the usual case: every header spells its numbers alike (digits in the same places, same fillers)
        layouts, layout_of = _BYTE_CLASS[headers[:1, _NUMERIC_COLUMNS]], None
    else:
        layouts, layout_of = np.unique(_BYTE_CLASS[headers[:, _NUMERIC_COLUMNS]], axis=0, return_inverse=True)
    weights = []
    for layout in layouts:
        w = _field_weights(layout.tobytes())
        if w is None:
            return None
        weights.append(w)
    weights = np.stack(weights)[layout_of.ravel()] if layout_of is not None else weights[0][None, :]
    values = []
    for field in (_SIZE_FIELD, _CHECKSUM_FIELD):
        (start, stop), column = _NUMERIC_FIELDS[field], _FIELD_STARTS[field]
        digits = headers[:, start:stop].astype(np.int64) - ord("0")
        field_weights = weights[:, column:column + stop - start]
        values.append(digits @ field_weights[0] if len(field_weights) == 1 else (digits * field_weights).sum(axis=1))
    return values[0], values[1]


def _walk_chain(buffer, total: int, final: bool = True) -> tuple[np.ndarray, int] | None:
    """(header block indices, end offset) by walking the header chain in Python, the fallback of `_magic_chain`
    (size: 11 digits, the usual spelling); the caller checks every header strictly. `final=False`: `buffer`
    holds the start of a longer archive; the walk stops at the end of the buffer (the last member's data may
    run past it: end > total) or at a block starting with NUL."""
    heads = []
    append, offset, last_block = heads.append, 0, total - BLOCK
    try:
        while offset <= last_block and buffer[offset]:
            append(offset)
            offset += BLOCK + max(0, int(bytes(buffer[offset + 124:offset + 135]), 8) + BLOCK - 1) // BLOCK * BLOCK
    except ValueError:
        return None
    if not heads or (final and (offset > total or total - offset < 2 * BLOCK)):
        return None
    return np.array(heads, dtype=np.int64) // BLOCK, offset


_MAGIC = np.frombuffer(b"ustar", dtype=np.uint8)
_SIZE_WEIGHTS = 8 ** np.arange(10, -1, -1, dtype=np.int64)


def _magic_chain(table: np.ndarray, total: int, final: bool = True) -> tuple[np.ndarray, int] | None:
    """The header chain without a per-member loop (~6x faster than the walk): the blocks carrying the ustar
    magic (USTAR, GNU and PAX headers all do) whose 11-digit sizes link each to the next, from block 0 to the
    end. That is the chain the walk follows; None (then the walk decides) when any block breaks it, e.g. a
    data block that looks like a header (a tar inside a member), a header without the magic (v7), or a size
    not spelled as 11 octal digits. `final=False`: as `_walk_chain`'s."""
    candidates = np.flatnonzero(table[:, 257] == _MAGIC[0])
    for offset in range(1, len(_MAGIC)):
        candidates = candidates[table[candidates, 257 + offset] == _MAGIC[offset]]
    if not len(candidates) or candidates[0] != 0 or not table[candidates, 0].all():  # the walk stops at a NUL
        return None
    digits = table[candidates, 124:135].astype(np.int64) - ord("0")
    if ((digits < 0) | (digits > 7)).any():
        return None
    following = candidates + 1 + (digits @ _SIZE_WEIGHTS + BLOCK - 1) // BLOCK
    if final:
        if (candidates[1:] != following[:-1]).any():
            return None
        end = int(following[-1]) * BLOCK
        return (candidates, end) if total - end >= 2 * BLOCK else None
    # the start of a longer archive: the chain runs until a successor lies past the table or is a block
    # starting with NUL (where the walk stops too)
    breaks = np.flatnonzero(candidates[1:] != following[:-1])
    length = int(breaks[0]) + 1 if len(breaks) else len(candidates)
    successor = int(following[length - 1])
    if length < len(candidates) and int(candidates[length]) < successor:
        return None  # a magic block inside a member's data: the walk decides
    if successor < len(table) and table[successor, 0]:
        return None  # a successor without the magic (v7 header, garbage): the walk decides
    return candidates[:length], successor * BLOCK


def scan_plain_tar(buffer, total: int, max_member_bytes: int, final: bool = True) -> PlainTar | None:
    """The layout of a plain tar held in `buffer[:total]`, or None when anything in it needs the careful
    reader: see the module docstring. With a result, `iter_shard` would read exactly these members, group them
    into exactly these samples and report no problem.

    `final=False`: `buffer[:total]` is only the start of the archive (read in pieces). The result then holds
    the samples that are complete for sure: every sample but the last one whose members lie wholly in the
    buffer (more members of it may follow), and `end` is where that last sample starts: the next piece of
    the archive is scanned from there. Those samples are exactly the ones `iter_shard` reads first, whatever
    follows: their members and the header after them passed every check. No sample yet (e.g. a member
    larger than the buffer): a result with 0 samples and end 0."""
    data = np.frombuffer(buffer, dtype=np.uint8, count=total)
    table = data[:total // BLOCK * BLOCK].reshape(-1, BLOCK)
    chain = _magic_chain(table, total, final) or _walk_chain(buffer, total, final)
    if chain is None:
        return None
    head, end = chain
    if final:
        if data[end:].any():  # a sound end: zero blocks only
            return None
    elif end > total:  # the last member's data runs past the buffer: left for the next piece
        head, end = head[:-1], int(head[-1]) * BLOCK
        if not len(head):
            return _no_samples()
    headers = table[head]
    values = _numeric_fields(headers)
    if values is None:
        return None
    size, checksum = values
    if (size > max_member_bytes).any():
        return None
    # the chain walked must be the one these sizes give (the walk read only the first 11 size characters)
    if (np.diff(head, append=end // BLOCK) != 1 + (size + BLOCK - 1) // BLOCK).any():
        return None
    unsigned = headers.sum(axis=1, dtype=np.uint32) - headers[:, 148:156].sum(axis=1, dtype=np.uint32) + 8 * ord(" ")
    if (unsigned != checksum).any():
        return None  # (tarfile also accepts a signed-byte checksum: left to it)
    type_flag = headers[:, 156]
    if not ((type_flag == ord("0")) | (type_flag == 0)).all() or headers[:, 345].any():
        return None  # only regular files, and no ustar name prefix
    nul = headers[:, :NAME_FIELD] == 0
    length = np.where(nul.any(axis=1), np.argmax(nul, axis=1), NAME_FIELD)
    columns = min(int(length.max()) + 1, NAME_FIELD)
    names = headers[:, :columns]  # what matters of the names
    position = _POSITIONS[:, :columns]
    in_name = position < length[:, None]
    if (_UNPRINTABLE[names] & in_name).any():
        return None  # printable ASCII only: no decoding or lower-casing questions
    slashes = (names == ord("/")) & in_name
    has_slash = slashes.any(axis=1)
    slash = np.where(has_slash, columns - 1 - np.argmax(slashes[:, ::-1], axis=1), -1)
    dots = (names == ord(".")) & in_name
    if has_slash.any():
        dots &= position > slash[:, None]
    dot = np.argmax(dots, axis=1)
    # KEY.EXT in the last path component, KEY neither empty nor starting with "." or "__"; then
    # base_plus_ext gives key = name[:dot], ext = name[dot + 1:]
    if not dots.any(axis=1).all() or (dot <= slash + 1).any():
        return None
    rows = np.arange(len(head))
    component = slash + 1  # < dot <= 99
    if ((names[rows, component] == ord("_")) & (names[rows, component + 1] == ord("_"))).any():
        return None
    key_bytes = np.where(position < dot[:, None], names, 0)
    new_sample = np.ones(len(head), dtype=bool)
    new_sample[1:] = (dot[1:] != dot[:-1]) | (key_bytes[1:] != key_bytes[:-1]).any(axis=1)
    sample = np.cumsum(new_sample) - 1
    ext_length = length - dot - 1
    width = int(ext_length.max())
    if width > 64:
        return None  # longer than any exportable extension: the careful reader records it
    if width == 0:
        width = 1
    ext_position = np.arange(width)
    ext_bytes = names[rows[:, None], np.minimum(dot[:, None] + 1 + ext_position, columns - 1)]
    ext_bytes[ext_position >= ext_length[:, None]] = 0
    ext_bytes = _LOWER[ext_bytes]
    if width <= 8:  # the usual case: one integer per extension
        packed = np.zeros((len(head), 8), dtype=np.uint8)
        packed[:, :width] = ext_bytes
        distinct, ext_id = np.unique(packed.view("<u8").ravel(), return_inverse=True)
        exts = [int(v).to_bytes(8, "little").rstrip(b"\0").decode("ascii") for v in distinct]
    else:
        distinct, ext_id = np.unique(ext_bytes, axis=0, return_inverse=True)
        exts = [row.tobytes().rstrip(b"\0").decode("ascii") for row in distinct]
    ext_id = ext_id.ravel().astype(np.int64)
    if np.bincount(sample * len(exts) + ext_id).max() > 1:
        return None  # a repeated extension within a sample: the careful reader records it
    first = np.append(np.flatnonzero(new_sample), len(head))
    key_length = dot[new_sample].astype(np.int64)
    if not final:  # the last sample may go on in the next piece
        samples = len(first) - 2
        if samples == 0:
            return _no_samples()
        members = int(first[samples])
        end = int(head[members]) * BLOCK
        head, size, sample, ext_id, headers = (head[:members], size[:members], sample[:members],
                                               ext_id[:members], headers[:members])
        first, key_length = first[:samples + 1], key_length[:samples]
    return PlainTar(header_block=head, size=size, sample=sample, ext_id=ext_id, exts=exts,
                    first=first, key_length=key_length, names=headers[:, :NAME_FIELD], end=end)


def _no_samples() -> PlainTar:
    empty = np.zeros(0, dtype=np.int64)
    return PlainTar(header_block=empty, size=empty, sample=empty, ext_id=empty, exts=[], first=np.zeros(1, np.int64),
                    key_length=empty, names=np.zeros((0, NAME_FIELD), dtype=np.uint8), end=0)


def _last_blocks(header_block: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(block index, bytes of data in it) of the last, partly filled data block of each member that has one."""
    tail = size % BLOCK
    partial = tail != 0
    return header_block[partial] + size[partial] // BLOCK + 1, tail[partial]


def _dirty_padding(table: np.ndarray, last: np.ndarray, tail: np.ndarray) -> bool:
    """Whether any byte after the data in these last blocks (`_last_blocks`) is not zero."""
    if not len(last):
        return False
    words = table[last].view("<u8")  # (n, 64): eight bytes at a time
    shared = tail // 8  # the word where the data ends and the padding starts
    if ((words != 0) & (np.arange(BLOCK // 8)[None, :] > shared[:, None])).any():
        return True
    keep = (np.uint64(1) << (np.uint64(8) * (tail % 8).astype(np.uint64))) - np.uint64(1)  # the data's bytes
    return bool((words[np.arange(len(last)), shared] & ~keep).any())


def zero_padding(table: np.ndarray, tar: PlainTar, members: np.ndarray) -> None:
    """Zero the bytes after each listed member's data in its last block (tarfile writes NULs there; the input
    may hold anything). Checked for the members written only, not when scanning: an export writes the
    fraction of what it scans that it keeps, and its map tasks' find pass writes nothing."""
    last, tail = _last_blocks(tar.header_block[members], tar.size[members])
    if not _dirty_padding(table, last, tail):
        return
    rows = table[last]
    rows[np.arange(BLOCK)[None, :] >= tail[:, None]] = 0
    table[last] = rows
