"""Completion markers (DataTrove-style): `OUT/_markers/<stage>/<name>.done`, written last and atomically.

A marker means every output of that unit is complete under its final name. A rerun skips marked units,
so an interrupted run resumes and a second rank never redoes finished work.
"""

from __future__ import annotations

import json
from pathlib import Path

from curate.io.atomic import write_text_atomic

MARKER_DIR = "_markers"


class Markers:
    def __init__(self, out_dir: str | Path, stage: str):
        self.dir = Path(out_dir) / MARKER_DIR / stage

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.done"

    def is_done(self, name: str) -> bool:
        return self.path(name).exists()

    def mark(self, name: str, info: dict | None = None) -> None:
        write_text_atomic(self.path(name), json.dumps(info or {}, sort_keys=True))

    def info(self, name: str) -> dict:
        return json.loads(self.path(name).read_text())

    def done(self) -> set[str]:
        return {p.name[: -len(".done")] for p in self.dir.glob("*.done")} if self.dir.exists() else set()

    def incomplete(self, names) -> list[str]:
        done = self.done()
        return [n for n in names if n not in done]
