"""Sample uids: 32 lowercase hex digits (128 bits), and DataComp's `.npy` subset layout.

Rule (documented in README): the uid is the `uid` field of the sample's `.json` when present and valid,
otherwise the first 32 hex digits of sha256(image bytes + b"\\0" + caption as UTF-8).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from curate.errors import CurateError

UID_RE = re.compile(r"^[0-9a-f]{32}$")
DATACOMP_DTYPE = np.dtype("u8,u8")


def is_uid(value: object) -> bool:
    return isinstance(value, str) and UID_RE.match(value) is not None


def content_uid(image_bytes: bytes, caption: str) -> str:
    """The fallback uid: first 32 hex of sha256(image bytes + NUL + caption utf-8)."""
    h = hashlib.sha256()
    h.update(image_bytes)
    h.update(b"\0")
    h.update(caption.encode("utf-8"))
    return h.hexdigest()[:32]


def uids_to_pairs(uids) -> np.ndarray:
    """Hex uids -> sorted structured array (high u64, low u64), DataComp's subset format."""
    pairs = np.empty(len(uids), dtype=DATACOMP_DTYPE)
    for i, uid in enumerate(uids):
        if not is_uid(uid):
            raise CurateError(f"not a 32-hex uid: {uid!r}")
        pairs[i] = (int(uid[:16], 16), int(uid[16:], 16))
    pairs.sort()
    return pairs


def pairs_to_uids(pairs: np.ndarray) -> list[str]:
    return [f"{int(hi):016x}{int(lo):016x}" for hi, lo in zip(pairs["f0"], pairs["f1"])]


def write_uid_npy(uids, path: str | Path) -> int:
    """Write uids as DataComp's sorted `u8,u8` array, atomically. Returns the count."""
    from curate.io.atomic import atomic_path

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
