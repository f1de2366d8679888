"""The cached curate-tiny teacher: trained once per machine (a synth corpus, then `curate teacher train`'s recipe
TINY_TEACHER_TRAIN) under a file name that carries a hash of that recipe."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from curate.stages.teacher import TINY_TEACHER_CORPUS, TINY_TEACHER_TRAIN, TinyTeacherConfig
from curate.stages.teacher import entry


def tiny_teacher_cache_dir() -> Path:
    """$CURATE_CACHE/teacher, else <repo>/.cache/teacher for a source checkout, else ~/.cache/curate/teacher."""
    env = os.environ.get("CURATE_CACHE")
    if env:
        return Path(env).expanduser() / "teacher"
    repo = Path(__file__).resolve().parents[3]
    if (repo / "pyproject.toml").is_file():
        return repo / ".cache" / "teacher"
    return Path.home() / ".cache" / "curate" / "teacher"


def tiny_teacher_recipe() -> dict:
    from curate.models.teacher import model_config

    from curate.stages.synth import FORMAT, world_digest

    train = asdict(TINY_TEACHER_TRAIN)
    train.pop("log_every")
    # the world the corpus is drawn from: a new world (or format) trains a new teacher under a new name
    return {"corpus": TINY_TEACHER_CORPUS, "world": {"format": FORMAT, "digest": world_digest()}, "train": train,
            "config": model_config(TINY_TEACHER_TRAIN.model)}


def tiny_teacher_path(cache_dir: Path | None = None) -> Path:
    """Where the cached teacher for the current recipe lives (the name changes with the recipe)."""
    digest = hashlib.sha256(json.dumps(tiny_teacher_recipe(), sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir or tiny_teacher_cache_dir()) / f"curate-tiny-{digest}.pt"


def ensure_tiny_teacher(cfg: TinyTeacherConfig = TinyTeacherConfig(),
                        on_log: Callable[[dict], None] | None = None) -> Path:
    """The cached curate-tiny checkpoint; made (synth corpus + training, ~3 min on 2 cores) when missing.
    `on_log`: the training's log entries (see entry.run).

    A file lock serialises concurrent callers: the second waits and then finds the checkpoint.
    """
    path = tiny_teacher_path(cfg.cache_dir)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_suffix(".lock")):
        if path.is_file():
            return path
        from curate.stages.synth import SynthConfig
        from curate.stages.synth import entry as synth

        corpus = path.parent / f"corpus-{path.stem}"  # one per recipe: a corpus of another world is never reused
        synth.run(corpus, SynthConfig(**TINY_TEACHER_CORPUS))
        entry.run(str(corpus), path, TINY_TEACHER_TRAIN, on_log=on_log)
    return path


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive flock on `path` for the length of the block."""
    import fcntl

    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
