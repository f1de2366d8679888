"""The command line says what happened: version, empty shards, pipe: shards, a subset that is not one, errors
without a stray progress bar, bars that count samples, Ctrl-C that says what was finished, `curate run`'s
step numbers."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import make_embedding_dir, one_line_error, run_curate
from curate import __version__
from curate.io.tables import EmbeddingPool

CURATE_BIN = Path(sys.executable).parent / "curate"
TINY = ["--model", "curate-tiny", "--pretrained", "none", "--device", "cpu", "--workers", "0", "--batch-size", "4"]


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_shard(path: Path, first: int, count: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(first, first + count):
            for ext, data in (("png", png(i)), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    write_shard(root / "00000.tar", 0, 6)
    write_shard(root / "00001.tar", 6, 5)
    return root


def test_version(monkeypatch, capsys):
    code, text = run_curate(monkeypatch, capsys, "--version")
    assert code == 0 and text.strip() == f"curate {__version__}"


def test_an_empty_shard_file_is_called_empty_not_corrupt(shards, tmp_path, monkeypatch, capsys):
    (shards / "00002.tar").write_bytes(b"")
    code, text = run_curate(monkeypatch, capsys, "embed", shards, "--out", tmp_path / "emb", *TINY)
    assert code == 0, text
    errors = pq.read_table(tmp_path / "emb" / "_errors" / "00002.parquet").to_pylist()
    assert len(errors) == 1 and errors[0]["reason"].startswith("empty file (0 bytes)")
    assert "corrupt" not in errors[0]["reason"]
    assert re.search(r"00002 .* empty file", text), text


def test_pipe_shards_read_as_webdataset_reads_them(shards, tmp_path, monkeypatch, capsys):
    code, text = run_curate(monkeypatch, capsys, "embed", f"pipe:cat {shards}/{{00000..00001}}.tar",
                            "--out", tmp_path / "piped", *TINY)
    assert code == 0, text
    code, text = run_curate(monkeypatch, capsys, "embed", shards, "--out", tmp_path / "files", *TINY)
    assert code == 0, text
    piped, files = EmbeddingPool(tmp_path / "piped"), EmbeddingPool(tmp_path / "files")
    assert [p.name for p in piped.files] == [p.name for p in files.files] == ["00000.parquet", "00001.parquet"]
    assert piped.column("uid").tolist() == files.column("uid").tolist()
    np.testing.assert_array_equal(piped.matrix("image_embedding"), files.matrix("image_embedding"))
    # a failing command is a failed shard, with its exit status, not an empty one
    code, text = run_curate(monkeypatch, capsys, "embed", f"pipe:cat {tmp_path}/missing/00009.tar",
                            "--out", tmp_path / "broken", *TINY, "--retries", "0")
    assert "exited with status 1" in one_line_error(code, text)


def test_export_of_a_score_table_says_what_a_subset_is(tmp_path, monkeypatch, capsys):
    emb = make_embedding_dir(tmp_path / "emb", [4], dim=4, seed=0)
    assert run_curate(monkeypatch, capsys, "score", emb, "--out", tmp_path / "scores.parquet",
                      "--device", "cpu")[0] == 0
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "00000.tar", 0, 2)
    code, text = run_curate(monkeypatch, capsys, "export", tmp_path / "shards", "--subset",
                            tmp_path / "scores.parquet", "--out", tmp_path / "out")
    line = one_line_error(code, text)
    assert "is a Parquet table, not a subset" in line and "curate filter" in line and "pickle" not in line


def test_an_error_before_any_work_shows_no_progress_bar(tmp_path, monkeypatch, capsys):
    code, text = run_curate(monkeypatch, capsys, "score", tmp_path / "nothing", "--out", tmp_path / "s.parquet")
    one_line_error(code, text)
    assert text.strip().splitlines() == [line for line in text.strip().splitlines() if line.startswith("error:")]


def test_the_score_bar_counts_samples_not_rows_times_passes(tmp_path, monkeypatch, capsys):
    emb = make_embedding_dir(tmp_path / "emb", [7, 6], dim=4, seed=1)  # 13 rows: ragged batches of 4
    code, text = run_curate(monkeypatch, capsys, "score", emb, "--out", tmp_path / "s.parquet", "--device", "cpu",
                            "--k", "3", "--batch-size", "4")
    assert code == 0, text
    assert "13 / 13 samples" in text, text


def test_ctrl_c_says_what_was_finished_and_that_a_rerun_resumes(shards, tmp_path):
    """The second shard is a command that never ends: once the first shard's marker is written, SIGINT."""
    out = tmp_path / "emb"
    command = [str(CURATE_BIN), "embed", str(shards / "00000.tar"), "pipe:sleep 600; cat 00009.tar",
               "--out", str(out), *TINY]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "200"}, start_new_session=True)
    marker = out / "_markers" / "embed" / "00000.done"
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), proc.communicate()[0] if proc.poll() is not None else "no marker in 240 s"
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole foreground group, the pipe's shell too
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert "interrupted: 1 shard(s) finished" in output and "rerun the same command to resume" in output, output
    assert "Traceback" not in output


RECIPE = """
[run]
dir = "{dir}"
device = "cpu"
[synth]
samples = 40
shard_size = 20
target_samples = 0
[teacher]
model = "curate-tiny"
pretrained = "none"
[embed]
shards = "corpus"
batch_size = 16
workers = 0
[score]
k = 2
batch_size = 16
[[filter]]
name = "half"
keep = ["negclip:0.5"]
"""


def test_run_numbers_its_steps_and_shows_each_steps_bar(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(dir=tmp_path / "run"))
    code, text = run_curate(monkeypatch, capsys, "run", recipe)
    assert code == 0, text
    for number, step in enumerate(["synth", "teacher", "embed", "score", "filter:half"], 1):
        assert f"[{number}/5] run {step}" in text, text
    assert "2 / 2 shards, 40 samples" in text and "40 / 40 samples" in text, text
    code, text = run_curate(monkeypatch, capsys, "run", recipe)
    assert code == 0 and "[3/5] skip embed: done" in text, text
