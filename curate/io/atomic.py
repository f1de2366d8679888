"""Atomic writes: write to a temp name beside the target, then rename, so no partial file is ever visible.

Temp names are `.NAME.tmp-HOST-PID-RANDOM` (HOST: 8 hex digits of the host name's hash). A writer killed
with SIGKILL leaves its temp file behind; `sweep_stale_temps` removes those of dead processes of this
host when a stage starts (a temp of another host is never touched: its writer may be alive there).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import uuid
from pathlib import Path

HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
TEMP_NAME = re.compile(r"^\..+\.tmp-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}$")


def temp_path(path: str | Path) -> Path:
    """A fresh temp name beside `path` (see the module docstring); the caller renames or removes it."""
    path = Path(path)
    return path.parent / f".{path.name}.tmp-{HOST_TAG}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def sweep_stale_temps(*directories: str | Path) -> int:
    """Remove temp files left in `directories` by dead writers of this host; returns how many."""
    removed = 0
    for directory in directories:
        try:
            entries = list(os.scandir(directory))
        except OSError:  # not created yet, or unreadable: nothing to sweep
            continue
        for entry in entries:
            match = TEMP_NAME.match(entry.name)
            if match and match["host"] == HOST_TAG and not _alive(int(match["pid"])):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed += 1
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path in the same directory; on success rename it onto `path`, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex), read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
