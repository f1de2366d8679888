"""Sample uids: 32 lowercase hex digits (128 bits), and DataComp's `.npy` subset layout (sorted `u8,u8`
pairs; reading and checking subset files).

Rule (documented in README): the uid is the `uid` field of the sample's `.json` when present and valid,
otherwise the first 32 hex digits of sha256(image bytes + b"\\0" + caption as UTF-8).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.errors import CurateError
from curate.io.atomic import atomic_path

UID_RE = re.compile(r"[0-9a-f]{32}")
DATACOMP_DTYPE = np.dtype("u8,u8")
_HEX_LUT = np.full(256, 255, dtype=np.uint8)
_HEX_LUT[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX_LUT[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)


def is_uid(value: object) -> bool:
    """Exactly 32 lowercase hex digits (fullmatch: `$` alone would also accept a trailing newline)."""
    return isinstance(value, str) and UID_RE.fullmatch(value) is not None


def content_uid(image_bytes: bytes, caption: str) -> str:
    """The fallback uid: first 32 hex of sha256(image bytes + NUL + caption utf-8)."""
    h = hashlib.sha256()
    h.update(image_bytes)
    h.update(b"\0")
    h.update(caption.encode("utf-8"))
    return h.hexdigest()[:32]


def uids_to_pairs(uids) -> np.ndarray:
    """Hex uids -> sorted structured array (high u64, low u64), DataComp's subset format."""
    try:
        column = pa.array(list(uids), pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise CurateError(f"uid list: not all uids are strings of 32 hex digits ({exc})") from None
    high, low = uid_halves(column, "uid list")
    pairs = np.empty(len(high), dtype=DATACOMP_DTYPE)
    pairs["f0"], pairs["f1"] = high, low
    pairs.sort()
    return pairs


def uid_halves(column: pa.Array | pa.ChunkedArray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """32-hex uid strings -> (high, low) uint64 arrays, straight from the Arrow buffers (no Python loop).

    The high half is the first 16 hex digits, as in DataComp's `u8,u8` layout; comparing (high, low)
    numerically is the same as comparing the hex strings.
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise CurateError(f"{where}: column `uid` has type {column.type}; expected strings of 32 lowercase "
                          "hex digits (the 128-bit uid)")
    highs, lows = [], []
    for chunk in chunks:
        if chunk.null_count:
            raise CurateError(f"{where}: {chunk.null_count} rows have no uid (null); every row needs one")
        lengths = pc.binary_length(chunk).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != 32).any():
            bad = chunk[int(np.argmax(lengths != 32))].as_py()
            raise CurateError(f"{where}: uid {bad[:40]!r} is not 32 lowercase hex digits "
                              f"({int((lengths != 32).sum())} such rows)")
        if len(chunk) == 0:
            continue
        offsets_type = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
        offsets = np.frombuffer(chunk.buffers()[1], offsets_type)[chunk.offset: chunk.offset + len(chunk) + 1]
        data = np.frombuffer(chunk.buffers()[2], np.uint8)[offsets[0]: offsets[-1]].reshape(-1, 32)
        nibbles = _HEX_LUT[data]
        if (nibbles == 255).any():
            bad = chunk[int(np.argmax((nibbles == 255).any(axis=1)))].as_py()
            raise CurateError(f"{where}: uid {bad!r} is not 32 lowercase hex digits")
        packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]  # (n, 16) bytes, big-endian
        halves = packed.view(">u8").astype(np.uint64)  # (n, 2)
        highs.append(halves[:, 0])
        lows.append(halves[:, 1])
    if not highs:
        return np.empty(0, np.uint64), np.empty(0, np.uint64)
    return np.concatenate(highs), np.concatenate(lows)


def pairs_to_uids(pairs: np.ndarray) -> list[str]:
    return [f"{int(hi):016x}{int(lo):016x}" for hi, lo in zip(pairs["f0"], pairs["f1"])]


def write_uid_npy(uids, path: str | Path) -> int:
    """Write uids as DataComp's sorted `u8,u8` array, atomically. Returns the count."""

    pairs = uids_to_pairs(list(uids))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, pairs)
    return len(pairs)


def read_uid_npy(path: str | Path) -> list[str]:
    """Read a DataComp subset file; a wrong dtype is a clear error, not a traceback."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CurateError(f"{path}: cannot read as a .npy uid file ({exc})") from None
    if arr.dtype != DATACOMP_DTYPE:
        raise CurateError(
            f"{path}: uid file has dtype {arr.dtype}, expected DataComp's structured 'u8,u8' "
            "(high and low 64 bits of the 128-bit uid); write it with `curate filter` or uids_to_pairs()"
        )
    return pairs_to_uids(arr)


# ---------------------------------------------------------------- uid halves in order; subset files

def uid_order(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """Indices that sort the uids ascending. Random uids almost never share a high half, so one
    argsort of it usually suffices (about twice as fast as a two-key lexsort)."""
    order = np.argsort(high)
    sorted_high = high[order]
    if len(order) > 1 and (sorted_high[1:] == sorted_high[:-1]).any():
        order = np.lexsort((low, high))
    return order


def sorted_uid_pairs(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """DataComp's subset array: structured `u8,u8` (high, low), sorted."""
    order = uid_order(high, low)
    pairs = np.empty(len(order), dtype=DATACOMP_DTYPE)
    pairs["f0"], pairs["f1"] = high[order], low[order]
    return pairs


def subset_file(subset: str | Path) -> Path:
    """The uid file of a subset: the --out directory of `curate filter` (its uids.npy) or a DataComp `.npy`;
    anything else (a Parquet table, not a .npy) is a clear error."""
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


def find_pairs(sorted_high: np.ndarray, sorted_low: np.ndarray, high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """Index of each (high, low) query among sorted unique pairs (the halves of a subset file; memory maps
    welcome: a binary search touches log2(M) entries per query), or -1: an int64 array."""
    result = np.full(len(high), -1, dtype=np.int64)
    if not len(sorted_high) or not len(high):
        return result
    left = np.searchsorted(sorted_high, high, side="left")
    right = np.searchsorted(sorted_high, high, side="right")
    single = right - left == 1
    hit = single & (np.asarray(sorted_low[np.minimum(left, len(sorted_low) - 1)]) == low)
    result[hit] = left[hit]
    for i in np.flatnonzero(right - left > 1).tolist():  # several listed uids share this high half (rare)
        lows = np.asarray(sorted_low[left[i]:right[i]])
        j = int(np.searchsorted(lows, low[i]))
        if j < len(lows) and lows[j] == low[i]:
            result[i] = left[i] + j
    return result


def read_uid_list(source: str | Path) -> np.ndarray:
    """A released or computed uid list as sorted unique `u8,u8` pairs: a DataComp `.npy` (ours, DFN's, HYPE's),
    the --out directory of `curate filter`, or a Parquet table (or directory of them) with a `uid` column."""
    path = Path(source)
    parquet = sorted(path.glob("*.parquet")) if path.is_dir() and not (path / "uids.npy").is_file() else []
    if path.is_file() and path.suffix == ".parquet" or parquet:

        files = parquet or [path]
        highs, lows = [], []
        for f in files:
            try:
                column = pq.read_table(f, columns=["uid"]).column("uid")
            except (OSError, pa.ArrowInvalid, KeyError) as exc:
                raise CurateError(f"{f}: cannot read a `uid` column from it ({exc}); a uid list is a DataComp "
                                  ".npy, a `curate filter` --out directory or a Parquet table with `uid`") from None
            h, lo = uid_halves(column, str(f))
            highs.append(h)
            lows.append(lo)
        pairs = np.empty(sum(len(h) for h in highs), DATACOMP_DTYPE)
        pairs["f0"], pairs["f1"] = np.concatenate(highs), np.concatenate(lows)
        return sorted_unique_pairs(pairs)
    if not path.exists():
        raise CurateError(f"{path}: no such uid list; give a DataComp .npy, a `curate filter` --out directory "
                          "or a Parquet table with a `uid` column")
    pairs = load_subset(subset_file(path), mmap=True)
    return np.asarray(pairs) if is_sorted_unique(pairs) else sorted_unique_pairs(np.asarray(pairs))
