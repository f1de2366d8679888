"""`curate embed`: schema, norms, uids, recorded skips, resume and byte-identical reruns."""

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.io.tables import EmbeddingPool, vectors_to_numpy, read_meta
from curate.io.uids import content_uid
from curate.stages.embed import EmbedConfig, embed
from curate.stages.synth import make_corpus

CONFIG = EmbedConfig(model="curate-tiny", pretrained="none", device="cpu", batch_size=16, workers=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    make_corpus(out, samples=60, shard_size=20, seed=3, corrupt=0.2, target_samples=10)
    return out


def tar_bytes(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def png(color=(0, 128, 255)):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, "PNG")
    return buf.getvalue()


def test_embed_schema_norms_uids(corpus, tmp_path):
    result = embed(str(corpus), tmp_path / "emb", CONFIG)
    assert result["embedded"] == 60 and result["skipped"] == 0 and result["shards_total"] == 3
    pool = EmbeddingPool(tmp_path / "emb")
    assert pool.n_rows == 60 and pool.teacher.model == "curate-tiny" and pool.dim == pool.teacher.embed_dim
    table = pq.read_table(pool.files[0])
    assert table.schema.names[:5] == ["uid", "key", "caption", "image_embedding", "text_embedding"]
    assert str(table.schema.field("image_embedding").type) == f"fixed_size_binary[{2 * pool.dim}]"  # float16 vectors
    for col in ("image_embedding", "text_embedding"):
        norms = np.linalg.norm(vectors_to_numpy(table.column(col)), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=2e-3)  # fp16 storage of unit vectors
    metas = [json.loads(j) for j in table.column("json").to_pylist()]
    assert table.column("uid").to_pylist() == [m["uid"] for m in metas]  # uid rule: the json's uid first
    meta = read_meta(pool.files[0])
    assert meta["shard"].endswith("00000.tar") and meta["teacher"]["logit_scale"] > 0


def test_bad_samples_are_skipped_and_recorded(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    good = png()
    (shards / "00000.tar").write_bytes(tar_bytes([
        ("ok.png", good), ("ok.txt", b"a blue square"),
        ("broken.jpg", b"\xff\xd8 not really a jpeg"), ("broken.txt", b"caption"),
        ("nocap.png", good),
        ("blank.png", png((1, 2, 3))), ("blank.txt", b"   "),
        ("latin.png", png((9, 9, 9))), ("latin.txt", b"caf\xe9 au lait"),
    ]))
    result = embed(str(shards), tmp_path / "emb", CONFIG)
    assert result["embedded"] == 2 and result["skipped"] == 3
    table = pq.read_table(tmp_path / "emb" / "00000.parquet")
    assert table.column("key").to_pylist() == ["ok", "latin"]
    assert table.column("uid").to_pylist()[0] == content_uid(good, "a blue square")
    errors = pq.read_table(tmp_path / "emb" / "00000.errors.parquet").to_pylist()
    by_key = {e["key"]: e for e in errors}
    assert "undecodable" in by_key["broken"]["reason"] and by_key["broken"]["kind"] == "skipped"
    assert "missing caption" in by_key["nocap"]["reason"]
    assert "empty caption" in by_key["blank"]["reason"]
    assert by_key["latin"]["kind"] == "note" and "UTF-8" in by_key["latin"]["reason"]
    assert result["shards"][0]["reasons"]


def test_rerun_skips_done_and_resumes_missing_byte_identical(corpus, tmp_path):
    out = tmp_path / "emb"
    embed(str(corpus), out, CONFIG)
    first = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    again = embed(str(corpus), out, CONFIG)
    assert again["shards_skipped_done"] == 3 and again["embedded"] == 0
    # an interrupted run: one shard's output and marker are missing
    (out / "00001.parquet").unlink()
    (out / "_markers" / "embed" / "00001.done").unlink()
    resumed = embed(str(corpus), out, CONFIG)
    assert resumed["shards_skipped_done"] == 2 and [s["shard"] for s in resumed["shards"]] == ["00001"]
    assert {p.name: p.read_bytes() for p in out.glob("*.parquet")} == first
    assert (out / "00000.parquet").stat().st_mtime_ns == mtimes["00000.parquet"]


def test_output_without_marker_is_redone(corpus, tmp_path):
    out = tmp_path / "emb"
    embed(str(corpus), out, CONFIG)
    (out / "_markers" / "embed" / "00002.done").unlink()  # killed after the rename, before the marker
    (out / "00002.parquet").write_bytes(b"partial garbage")
    result = embed(str(corpus), out, CONFIG)
    assert [s["shard"] for s in result["shards"]] == ["00002"]
    assert pq.read_table(out / "00002.parquet").num_rows == 20


def test_workers_do_not_change_bytes(corpus, tmp_path):
    embed(str(corpus), tmp_path / "a", CONFIG)
    embed(str(corpus), tmp_path / "b", EmbedConfig(**{**CONFIG.__dict__, "workers": 2}))
    for p in sorted((tmp_path / "a").glob("*.parquet")):
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes()
