"""sha256 of every output `make demo` writes that must not change when code is only reorganised: tables,
uid files, exported tars and their records (not the HTML report, timings or run markers, which hold times).

    .venv/bin/python bench/demo_digest.py demo_out > before.txt   # then compare with `diff` after a change
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

SKIP_PARTS = {"_markers", ".curate-cache"}
SKIP_NAMES = {"report.html", "run.json", "truth.json", "stats.json"}  # stats.json/truth.json hold paths and times


def digests(root: Path) -> list[tuple[str, str]]:
    rows = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or SKIP_PARTS & set(rel.parts) or path.name in SKIP_NAMES:
            continue
        rows.append((hashlib.sha256(path.read_bytes()).hexdigest()[:16], rel.as_posix()))
    return rows


if __name__ == "__main__":
    for digest, name in digests(Path(sys.argv[1] if len(sys.argv) > 1 else "demo_out")):
        print(digest, name)
