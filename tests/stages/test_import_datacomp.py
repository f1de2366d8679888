"""`curate import datacomp`: DataComp's parquet + npz layout -> embedding tables that score without a GPU."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.errors import CurateError
from curate.io.tables import EmbeddingPool, vectors_to_numpy, read_meta
from curate.stages.import_datacomp import ImportDatacompConfig
from curate.stages.import_datacomp.entry import run as import_run


def make_datacomp_shard(directory, stem, n, seed, with_key=False):
    """One DataComp metadata shard as released: NNNNNNNN.parquet (uid, text, ...) + NNNNNNNN.npz (fp16 arrays)."""
    rng = np.random.default_rng(seed)
    uids = [rng.bytes(16).hex() for _ in range(n)]
    columns = {"uid": uids, "text": [f"caption {seed}-{i}" for i in range(n)],
               "url": [f"http://example.com/{i}.jpg" for i in range(n)],
               "clip_l14_similarity_score": rng.random(n).astype(np.float32)}
    if with_key:
        columns["key"] = [f"{seed:05d}{i:04d}" for i in range(n)]
    pq.write_table(pa.table(columns), directory / f"{stem}.parquet")
    arrays = {f"{arch}_{kind}": (rng.standard_normal((n, dim)) * 3).astype(np.float16)
              for arch, dim in (("l14", 768), ("b32", 512)) for kind in ("img", "txt")}
    np.savez(directory / f"{stem}.npz", **arrays)
    return uids, arrays


def normalised(a):
    a = a.astype(np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_import_round_trip_and_teacher_metadata(tmp_path):
    meta = tmp_path / "metadata"
    meta.mkdir()
    uids0, arrays0 = make_datacomp_shard(meta, "00000000", 5, seed=0, with_key=True)
    uids1, arrays1 = make_datacomp_shard(meta, "00000001", 3, seed=1)
    report = import_run(meta, tmp_path / "emb", ImportDatacompConfig(arch="l14"))
    assert (report.imported, report.rows, report.skipped_rows) == (2, 8, 0)
    pool = EmbeddingPool(tmp_path / "emb")
    assert pool.teacher.model == "ViT-L-14" and pool.teacher.pretrained == "openai"
    assert pool.dim == 768 and pool.teacher.logit_scale == 100.0
    assert pool.column("uid").tolist() == uids0 + uids1
    t0 = pq.read_table(tmp_path / "emb" / "00000000.parquet")
    assert t0.column("key").to_pylist()[:2] == ["000000000", "000000001"]  # the `key` column when present
    assert pq.read_table(tmp_path / "emb" / "00000001.parquet").column("key").to_pylist() == uids1  # else the uid
    assert t0.column("caption").to_pylist()[0] == "caption 0-0"
    image = vectors_to_numpy(t0.column("image_embedding"))
    text = vectors_to_numpy(t0.column("text_embedding"))
    np.testing.assert_allclose(image, normalised(arrays0["l14_img"]), atol=1e-3)
    np.testing.assert_allclose(text, normalised(arrays0["l14_txt"]), atol=1e-3)
    assert t0.schema.field("image_embedding").type == pa.list_(pa.field("element", pa.float16(), nullable=False), 768)
    # CLIPScore s_ii straight from the imported tables equals the one from DataComp's arrays
    np.testing.assert_allclose((image * text).sum(1),
                               (normalised(arrays0["l14_img"]) * normalised(arrays0["l14_txt"])).sum(1), atol=2e-3)
    assert read_meta(tmp_path / "emb" / "00000000.parquet")["arch"] == "l14"


def test_b32_and_rerun_skips_done_shards(tmp_path):
    meta = tmp_path / "metadata"
    meta.mkdir()
    make_datacomp_shard(meta, "00000000", 4, seed=2)
    import_run(meta, tmp_path / "emb", ImportDatacompConfig(arch="b32"))
    assert EmbeddingPool(tmp_path / "emb").teacher.embed_dim == 512
    out = tmp_path / "emb" / "00000000.parquet"
    mtime = out.stat().st_mtime_ns
    again = import_run(meta, tmp_path / "emb", ImportDatacompConfig(arch="b32"))
    assert again.skipped_done == 1 and again.imported == 0 and out.stat().st_mtime_ns == mtime
    with pytest.raises(CurateError, match="was imported with --arch b32"):
        import_run(meta, tmp_path / "emb", ImportDatacompConfig(arch="l14"))


def test_unusable_rows_are_skipped_and_recorded(tmp_path):
    meta = tmp_path / "metadata"
    meta.mkdir()
    rng = np.random.default_rng(3)
    uids = [rng.bytes(16).hex() for _ in range(5)]
    uids[1] = "NOT-A-UID"
    pq.write_table(pa.table({"uid": uids, "text": ["a", "b", None, "d", "e"]}), meta / "00000000.parquet")
    img = rng.standard_normal((5, 512)).astype(np.float16)
    txt = rng.standard_normal((5, 512)).astype(np.float16)
    img[3] = 0  # zero norm
    txt[4, 7] = np.nan
    np.savez(meta / "00000000.npz", b32_img=img, b32_txt=txt)
    report = import_run(meta, tmp_path / "emb", ImportDatacompConfig(arch="b32"))
    assert (report.rows, report.skipped_rows) == (2, 3)
    table = pq.read_table(tmp_path / "emb" / "00000000.parquet")
    assert table.column("uid").to_pylist() == [uids[0], uids[2]]
    assert table.column("caption").to_pylist() == ["a", ""]  # a null caption becomes empty
    errors = pq.read_table(tmp_path / "emb" / "_errors" / "00000000.parquet").to_pylist()
    assert [(e["uid"], e["reason"].split(" ")[0]) for e in errors] == [("NOT-A-UID", "uid"), (uids[3], "image"),
                                                                        (uids[4], "text")]
    assert not np.isnan(vectors_to_numpy(table.column("text_embedding"))).any()


def test_broken_layouts_are_clear_errors_naming_the_file(tmp_path):
    meta = tmp_path / "metadata"
    meta.mkdir()
    make_datacomp_shard(meta, "00000000", 4, seed=4)
    with pytest.raises(CurateError, match="--arch 'h14'"):
        import_run(meta, tmp_path / "emb", ImportDatacompConfig(arch="h14"))
    (meta / "00000000.npz").unlink()
    with pytest.raises(CurateError, match=r"00000000.npz: missing"):
        import_run(meta, tmp_path / "emb", ImportDatacompConfig(arch="l14"))
    np.savez(meta / "00000000.npz", l14_img=np.ones((3, 768), np.float16), l14_txt=np.ones((3, 768), np.float16))
    with pytest.raises(CurateError, match=r"00000000.npz: l14_img has 3 rows but 00000000.parquet has 4"):
        import_run(meta, tmp_path / "emb", ImportDatacompConfig(arch="l14"))
    with pytest.raises(CurateError, match=r"00000000.npz: no array b32_img, b32_txt \(it has l14_img, l14_txt\)"):
        import_run(meta, tmp_path / "emb", ImportDatacompConfig(arch="b32"))
    (meta / "00000000.npz").write_bytes(b"garbage")
    with pytest.raises(CurateError, match="00000000.npz: not a readable .npz"):
        import_run(meta, tmp_path / "emb", ImportDatacompConfig(arch="l14"))
    with pytest.raises(CurateError, match="no \\*.parquet metadata"):
        import_run(tmp_path / "emb", tmp_path / "emb2", ImportDatacompConfig(arch="l14"))
    assert not list((tmp_path / "emb").glob("*.parquet"))  # nothing half-written


def test_cli_import_datacomp(tmp_path):
    from typer.testing import CliRunner

    from curate.cli import app

    meta = tmp_path / "metadata"
    meta.mkdir()
    make_datacomp_shard(meta, "00000000", 3, seed=5)
    result = CliRunner().invoke(app, ["import", "datacomp", str(meta), "--arch", "b32", "--out", str(tmp_path / "emb")])
    assert result.exit_code == 0, result.output
    assert "imported 1 shards (3 rows" in result.output
    assert EmbeddingPool(tmp_path / "emb").teacher.model == "ViT-B-32"
