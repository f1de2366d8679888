"""`curate export`: kept samples copied whole, in input order, into deterministic shards inside OUT_DIR only."""

from __future__ import annotations

import io
import json
import re
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from curate.errors import CurateError
from curate.io.uids import content_uid, read_uid_npy, write_uid_npy
from curate.stages.export import MANIFEST, export_subset


def uid_of(i: int) -> str:
    return f"{i:032x}"


def make_shard(path, samples):
    """samples: list of (member name -> bytes) dicts, written in order."""
    with tarfile.open(path, "w") as tar:
        for members in samples:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def sample(key, i, extra=None):
    members = {f"{key}.jpg": f"image {i}".encode(), f"{key}.txt": f"caption {i}".encode(),
               f"{key}.json": json.dumps({"uid": uid_of(i), "key": key}).encode()}
    return {**members, **(extra or {})}


def read_tar(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read(), m) for m in tar.getmembers()]


@pytest.fixture
def corpus(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    make_shard(shards / "00000.tar", [sample(f"a{i}", i) for i in range(6)])
    make_shard(shards / "00001.tar", [sample(f"b{i}", i, {f"b{i}.cls": b"3"}) for i in range(6, 12)])
    return shards


def test_export_keeps_all_members_in_input_order_and_splits_shards(tmp_path, corpus):
    keep = [1, 4, 5, 7, 10]
    write_uid_npy([uid_of(i) for i in keep] + [uid_of(99)], tmp_path / "subset" / "uids.npy")
    out = tmp_path / "out"
    report = export_subset(str(corpus), tmp_path / "subset", out, shard_size=2)
    assert report.written == 5 and report.missing == 1 and report.subset == 6
    assert [s["samples"] for s in report.shards] == [2, 2, 1]
    members = [m for name in ("00000.tar", "00001.tar", "00002.tar") for m in read_tar(out / name)]
    # every member of each kept sample, bytes unchanged, samples in input order, keys renamed to the running index
    expected = []
    for running, i in enumerate(keep):
        key = f"a{i}" if i < 6 else f"b{i}"
        src = sample(key, i, {f"{key}.cls": b"3"} if i >= 6 else None)
        expected += [(f"{running:09d}.{name.split('.', 1)[1]}", data) for name, data in src.items()]
    assert [(name, data) for name, data, _ in members] == expected
    assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" and m.mode == 0o644 for _, _, m in members)
    assert read_uid_npy(out / "missing_uids.npy") == [uid_of(99)]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] and manifest["report"]["written"] == 5


def test_export_is_deterministic_and_a_complete_rerun_is_a_noop(tmp_path, corpus):
    write_uid_npy([uid_of(i) for i in range(0, 12, 2)], tmp_path / "uids.npy")
    a = export_subset(str(corpus), tmp_path / "uids.npy", tmp_path / "a", shard_size=4)
    export_subset(str(corpus), tmp_path / "uids.npy", tmp_path / "b", shard_size=4)
    for name in ("00000.tar", "00001.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    mtime = (tmp_path / "a" / "00000.tar").stat().st_mtime_ns
    again = export_subset(str(corpus), tmp_path / "uids.npy", tmp_path / "a", shard_size=4)
    assert again.noop and again.written == a.written == 6
    assert (tmp_path / "a" / "00000.tar").stat().st_mtime_ns == mtime


def test_an_interrupted_export_resumes_to_identical_bytes(tmp_path, corpus):
    write_uid_npy([uid_of(i) for i in range(12)], tmp_path / "uids.npy")
    full = tmp_path / "full"
    export_subset(str(corpus), tmp_path / "uids.npy", full, shard_size=5)
    part = tmp_path / "part"
    export_subset(str(corpus), tmp_path / "uids.npy", part, shard_size=5)
    # as if killed after the first tar: later tars, records and the final manifest are missing
    manifest = json.loads((part / MANIFEST).read_text())
    (part / MANIFEST).write_text(json.dumps({"complete": False, "config": manifest["config"]}))
    for name in ("00001.tar", "00002.tar", "missing_uids.npy"):
        (part / name).unlink()
    report = export_subset(str(corpus), tmp_path / "uids.npy", part, shard_size=5)
    assert report.tars_reused == 1 and report.written == 12 and not report.noop
    assert sorted(p.name for p in part.iterdir()) == sorted(p.name for p in full.iterdir())
    for p in full.iterdir():
        if p.suffix == ".tar":
            assert (part / p.name).read_bytes() == p.read_bytes()


def test_another_export_or_foreign_tars_in_out_dir_are_refused(tmp_path, corpus):
    write_uid_npy([uid_of(1)], tmp_path / "uids.npy")
    export_subset(str(corpus), tmp_path / "uids.npy", tmp_path / "out", shard_size=5)
    with pytest.raises(CurateError, match="holds an export of other shards, another subset or shard size"):
        export_subset(str(corpus), tmp_path / "uids.npy", tmp_path / "out", shard_size=3)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.tar").write_bytes(b"")
    with pytest.raises(CurateError, match="did not write"):
        export_subset(str(corpus), tmp_path / "uids.npy", tmp_path / "foreign")


def test_malicious_member_names_never_escape_out_dir(tmp_path):
    work = tmp_path / "work"
    shards = work / "shards"
    shards.mkdir(parents=True)
    evil = [
        {"../escape.jpg": b"img0", "../escape.txt": b"cap0"},
        {"/abs/x.jpg": b"img1", "/abs/x.txt": b"cap1", "/abs/x.json": json.dumps({"uid": uid_of(1)}).encode()},
        {"a/../../b.jpg": b"img2", "a/../../b.txt": b"cap2"},
        {"ok.jpg": b"img3", "ok.txt": b"cap3", "ok.p\u00e4th": b"odd ext"},
    ]
    make_shard(shards / "00000.tar", evil)
    uids = [content_uid(b"img0", "cap0"), uid_of(1), content_uid(b"img2", "cap2"), content_uid(b"img3", "cap3")]
    write_uid_npy(uids, work / "uids.npy")
    out = work / "out"
    before = {p for p in tmp_path.rglob("*")}
    report = export_subset(str(shards), work / "uids.npy", out, shard_size=10)
    assert report.written == 4 and report.missing == 0
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(p.is_relative_to(out) for p in created)  # nothing written outside OUT_DIR
    names = [name for name, _, _ in read_tar(out / "00000.tar")]
    assert all(re.fullmatch(r"\d{9}\.[a-z0-9._-]+", n) for n in names)
    assert names[:2] == ["000000000.jpg", "000000000.txt"] and "000000003.jpg" in names
    # the odd extension is dropped and recorded, not written
    errors = pq.read_table(out / "export.errors.parquet").to_pylist()
    assert any("extension" in e["reason"] for e in errors)
    # and the output extracts safely with the strictest tarfile filter
    with tarfile.open(out / "00000.tar") as tar:
        tar.extractall(tmp_path / "extract", filter="data")
    assert (tmp_path / "extract" / "000000001.json").exists()


def test_repeated_uids_are_exported_once_and_recorded(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    make_shard(shards / "00000.tar", [sample("x", 1), sample("y", 1), sample("z", 2)])
    write_uid_npy([uid_of(1), uid_of(2)], tmp_path / "uids.npy")
    report = export_subset(str(shards), tmp_path / "uids.npy", tmp_path / "out")
    assert report.written == 2 and report.problems == 1
    errors = pq.read_table(tmp_path / "out" / "export.errors.parquet").to_pylist()
    assert errors[0]["key"] == "y" and "already exported" in errors[0]["reason"]


def test_a_corrupt_shard_is_recorded_and_the_rest_exported(tmp_path, corpus):
    (corpus / "00002.tar").write_bytes(b"this is not a tar file" * 100)
    write_uid_npy([uid_of(0), uid_of(11)], tmp_path / "uids.npy")
    report = export_subset(str(corpus), tmp_path / "uids.npy", tmp_path / "out")
    assert report.written == 2 and report.problems >= 1
    errors = pq.read_table(tmp_path / "out" / "export.errors.parquet").to_pylist()
    assert any(e["shard"].endswith("00002.tar") for e in errors)


def test_bad_subset_files_are_clear_errors(tmp_path, corpus):
    np.save(tmp_path / "wrong.npy", np.arange(5, dtype=np.uint64))
    with pytest.raises(CurateError, match="wrong.npy: uid file has dtype uint64.*'u8,u8'"):
        export_subset(str(corpus), tmp_path / "wrong.npy", tmp_path / "out")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CurateError, match="no subset uid file"):
        export_subset(str(corpus), tmp_path / "empty_dir", tmp_path / "out")
    write_uid_npy([uid_of(1)], tmp_path / "uids.npy")
    with pytest.raises(CurateError, match="--shard-size 0"):
        export_subset(str(corpus), tmp_path / "uids.npy", tmp_path / "out", shard_size=0)


def test_cli_export_reports_written_and_missing(tmp_path, corpus):
    from typer.testing import CliRunner

    from curate.cli import app

    write_uid_npy([uid_of(2), uid_of(8), uid_of(50)], tmp_path / "uids.npy")
    result = CliRunner().invoke(app, ["export", str(corpus), "--subset", str(tmp_path / "uids.npy"),
                                      "--out", str(tmp_path / "out"), "--shard-size", "1"])
    assert result.exit_code == 0, result.output
    assert "exported 2 of the subset's 3 samples into 2 shards" in result.output
    assert "1 subset uids were not found" in result.output
