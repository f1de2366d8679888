"""Shared test helpers. Import the plain functions with `from conftest import make_embedding_dir`."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from curate.io.tables import TeacherInfo, build_embedding_table, write_table_atomic


TESTS_DIR = Path(__file__).resolve().parent

SLURM_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP",
              "SLURM_ARRAY_TASK_MAX")

# Blocks every non-local socket in a subprocess and logs each attempt: proves a run needs no network.
NO_NETWORK_SITECUSTOMIZE = '''
import os, socket
_log = os.environ["CURATE_TEST_NET_LOG"]
def _refuse(what):
    with open(_log, "a") as f:
        f.write(f"{os.getpid()} {what}\\n")
    raise OSError(f"network disabled by the test suite: {what}")
_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
def connect(self, address):
    if self.family == socket.AF_UNIX:
        return _connect(self, address)
    _refuse(f"connect {address!r}")
def connect_ex(self, address):
    if self.family == socket.AF_UNIX:
        return _connect_ex(self, address)
    _refuse(f"connect_ex {address!r}")
def getaddrinfo(host, *args, **kwargs):
    if host in (None, "localhost", "127.0.0.1", "::1"):
        return _getaddrinfo(host, *args, **kwargs)
    _refuse(f"getaddrinfo {host!r}")
socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
'''


@pytest.fixture
def no_slurm(monkeypatch):
    """No Slurm array variables, whatever the environment the tests run in (they would split tasks into ranks)."""
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray (num_cpus=2) for a whole test module: starting one costs seconds."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    # Workers import tests/executor_tasks.py by name, like the driver does.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(TESTS_DIR), *sys.path])}})
    yield ray
    ray.shutdown()


def make_embedding_dir(path, n_rows_per_file: list[int], dim: int, seed: int, logit_scale: float = 100.0,
                       model: str = "test", pretrained: str = "none") -> Path:
    """Write a small embedding directory like `curate embed` makes: one table per fake shard.

    Files are `shard-00000.parquet`, ... (pool order = name order); uids are 32 random hex digits,
    embeddings random Gaussian rows, L2-normalised, stored as float16. Same seed -> same bytes.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    teacher = TeacherInfo(model=model, pretrained=pretrained, embed_dim=dim, logit_scale=logit_scale)
    for index, n in enumerate(n_rows_per_file):
        hex_digits = rng.bytes(16 * n).hex()
        uids = [hex_digits[32 * row:32 * (row + 1)] for row in range(n)]
        keys = [f"{index:05d}{row:04d}" for row in range(n)]
        captions = [f"caption {index}-{row}" for row in range(n)]
        image = rng.standard_normal((n, dim)).astype(np.float32)
        text = rng.standard_normal((n, dim)).astype(np.float32)
        image /= np.linalg.norm(image, axis=1, keepdims=True)
        text /= np.linalg.norm(text, axis=1, keepdims=True)
        table = build_embedding_table(uids, keys, captions, image, text)
        shard = f"shard-{index:05d}.tar"
        write_table_atomic(table, path / f"shard-{index:05d}.parquet",
                           meta={"teacher": teacher.to_dict(), "shard": shard})
    return path


def record_robustness(config, name: str, data: dict) -> None:
    """Keep a robustness tally (README numbers) in pytest's cache; a no-op when the cache plugin is off."""
    cache = getattr(config, "cache", None)
    if cache is not None:
        cache.set(f"curate/robustness/{name}", data)


def run_cli(monkeypatch, *args):
    """`curate ARGS` through cli.main() in this process; its SystemExit code."""
    from curate import cli

    monkeypatch.setattr(sys, "argv", ["curate", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    return exc.value.code


def run_curate(monkeypatch, capsys, *args) -> tuple[int, str]:
    """`curate ARGS` through cli.main() in this process: (exit code, stdout + stderr), on a wide terminal."""
    from curate import cli

    monkeypatch.setattr(sys, "argv", ["curate", *map(str, args)])
    monkeypatch.setenv("COLUMNS", "250")  # rich reads it at print time: table rows stay on one line
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def one_line_error(code: int, text: str) -> str:
    """The single `error:` line of a failed command (exit 2, no traceback)."""
    assert "Traceback" not in text, text
    assert code == 2, text
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text
    return lines[0]


def run_score(emb, out, progress=None, **values):
    """`curate.stages.score.entry.run` with its options as keywords (split between ScoreConfig and RunOptions)."""
    from curate.config import configure
    from curate.stages.score import ScoreConfig
    from curate.stages.score.entry import run

    return run(emb, out, *configure(ScoreConfig, **values), progress=progress)


def run_normsim(emb, out, progress=None, **values):
    """`curate.stages.normsim.entry.run` with its options as keywords (split between NormsimConfig and RunOptions)."""
    from curate.config import configure
    from curate.stages.normsim import NormsimConfig
    from curate.stages.normsim.entry import run

    return run(emb, out, *configure(NormsimConfig, **values), progress=progress)


def run_filter(tables, out, **values):
    """`curate.stages.filter.entry.run` with its options as keywords (split between FilterConfig and RunOptions)."""
    from curate.config import configure
    from curate.stages.filter import FilterConfig
    from curate.stages.filter.entry import run

    return run(tables, out, *configure(FilterConfig, **values))


def run_export(shards, subset, out, progress=None, **values):
    """`curate.stages.export.entry.run` with its options as keywords (split between ExportConfig and RunOptions)."""
    from curate.config import configure
    from curate.stages.export import ExportConfig
    from curate.stages.export.entry import run

    return run(shards, subset, out, *configure(ExportConfig, **values), progress=progress)


def synth_corpus(out, progress=None, **values):
    """`curate.stages.synth.entry.run` with its options (SynthConfig) as keywords."""
    from curate.stages.synth import SynthConfig
    from curate.stages.synth.entry import run

    return run(out, SynthConfig(**values), progress=progress)


def run_clones(emb, out, **values):
    """`curate.stages.clones.entry.run` with its options (ClonesConfig) as keywords."""
    from curate.stages.clones import ClonesConfig
    from curate.stages.clones.entry import run

    return run(emb, out, ClonesConfig(**values))
