"""`curate embed`: schema, norms, uids, recorded skips, resume and byte-identical reruns."""

import dataclasses
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.io.tables import EmbeddingPool, vectors_to_numpy, read_meta
from curate.io.uids import content_uid
from curate.stages.embed import EmbedConfig
from curate.stages.embed.entry import run as embed
from conftest import synth_corpus
from conftest import one_line_error, run_curate

CONFIG = EmbedConfig(model="curate-tiny", pretrained="none", device="cpu", batch_size=16, workers=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    synth_corpus(out, samples=60, shard_size=20, seed=3, corrupt=0.2, target_samples=10)
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
    assert result.embedded == 60 and result.skipped == 0 and result.shards_total == 3
    pool = EmbeddingPool(tmp_path / "emb")
    assert pool.n_rows == 60 and pool.teacher.model == "curate-tiny" and pool.dim == pool.teacher.embed_dim
    table = pq.read_table(pool.files[0])
    assert table.schema.names[:5] == ["uid", "key", "caption", "image_embedding", "text_embedding"]
    assert table.schema.field("image_embedding").type.value_type == pa.float16()  # float16 vectors, as numbers
    assert table.schema.field("image_embedding").type.list_size == pool.dim
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
    assert result.embedded == 2 and result.skipped == 3
    table = pq.read_table(tmp_path / "emb" / "00000.parquet")
    assert table.column("key").to_pylist() == ["ok", "latin"]
    assert table.column("uid").to_pylist()[0] == content_uid(good, "a blue square")
    errors = pq.read_table(tmp_path / "emb" / "_errors" / "00000.parquet").to_pylist()
    by_key = {e["key"]: e for e in errors}
    assert "undecodable" in by_key["broken"]["reason"] and by_key["broken"]["kind"] == "skipped"
    assert "missing caption" in by_key["nocap"]["reason"]
    assert "empty caption" in by_key["blank"]["reason"]
    assert by_key["latin"]["kind"] == "note" and "UTF-8" in by_key["latin"]["reason"]
    assert result.shards[0]["reasons"]


def test_rerun_skips_done_and_resumes_missing_byte_identical(corpus, tmp_path):
    out = tmp_path / "emb"
    embed(str(corpus), out, CONFIG)
    first = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    again = embed(str(corpus), out, CONFIG)
    assert again.shards_skipped_done == 3 and again.embedded == 0
    # an interrupted run: one shard's output and marker are missing
    (out / "00001.parquet").unlink()
    (out / "_markers" / "embed" / "00001.done").unlink()
    resumed = embed(str(corpus), out, CONFIG)
    assert resumed.shards_skipped_done == 2 and [s["shard"] for s in resumed.shards] == ["00001"]
    assert {p.name: p.read_bytes() for p in out.glob("*.parquet")} == first
    assert (out / "00000.parquet").stat().st_mtime_ns == mtimes["00000.parquet"]


def test_output_without_marker_is_redone(corpus, tmp_path):
    out = tmp_path / "emb"
    embed(str(corpus), out, CONFIG)
    (out / "_markers" / "embed" / "00002.done").unlink()  # killed after the rename, before the marker
    (out / "00002.parquet").write_bytes(b"partial garbage")
    result = embed(str(corpus), out, CONFIG)
    assert [s["shard"] for s in result.shards] == ["00002"]
    assert pq.read_table(out / "00002.parquet").num_rows == 20


def test_workers_do_not_change_bytes(corpus, tmp_path):
    embed(str(corpus), tmp_path / "a", CONFIG)
    embed(str(corpus), tmp_path / "b", dataclasses.replace(CONFIG, workers=2))
    for p in sorted((tmp_path / "a").glob("*.parquet")):
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes()


# ---------------------------------------------------------------- through the CLI: no silent wrong result

def tiny_args(device_args=("--device", "cpu", "--workers", "0", "--batch-size", "16")):
    return ["--model", "curate-tiny", *device_args]


def test_no_teacher_named_means_the_papers_teacher_which_fails_offline_in_one_line(corpus, tmp_path, monkeypatch,
                                                                                    capsys):
    monkeypatch.setenv("CURATE_OFFLINE", "1")
    code, text = run_curate(monkeypatch, capsys, "embed", corpus, "--out", tmp_path / "emb", "--device", "cpu")
    line = one_line_error(code, text)
    assert "ViT-L-14/openai" in line and "cannot be downloaded" in line and "--pretrained" in line
    assert "FAILED" not in text and "attempt" not in text  # one line: no table of failed tasks, no retries
    assert not list((tmp_path / "emb").glob("*.parquet"))


def test_random_weights_only_by_name_with_a_warning_and_a_record(corpus, tmp_path, monkeypatch, capsys):
    code, text = run_curate(monkeypatch, capsys, "embed", corpus, "--out", tmp_path / "emb", *tiny_args(),
                            "--pretrained", "none")
    assert code == 0, text
    assert "warning" in text and "randomly initialised" in text
    meta = read_meta(tmp_path / "emb" / "00000.parquet")
    assert meta["random_init"] is True and meta["embedding_params"]["pretrained"] == "none"


def test_a_rerun_with_another_teacher_refuses_then_overwrites_when_asked(corpus, tmp_path, monkeypatch, capsys):
    import torch

    from curate.models.teacher import create_model, model_config, save_checkpoint

    out = tmp_path / "emb"
    assert run_curate(monkeypatch, capsys, "embed", corpus, "--out", out, *tiny_args(), "--pretrained", "none")[0] == 0
    before = (out / "00000.parquet").read_bytes()
    torch.manual_seed(5)
    other = save_checkpoint(create_model("curate-tiny"), tmp_path / "other.pt", "curate-tiny",
                            model_config("curate-tiny"))
    code, text = run_curate(monkeypatch, capsys, "embed", corpus, "--out", out, *tiny_args(), "--pretrained", other)
    line = one_line_error(code, text)
    assert "3 finished shard(s)" in line and "pretrained 'none'" in line and "--overwrite" in line
    assert (out / "00000.parquet").read_bytes() == before  # nothing was mixed in
    code, text = run_curate(monkeypatch, capsys, "embed", corpus, "--out", out, *tiny_args(), "--pretrained", other,
                            "--overwrite")
    assert code == 0, text
    assert read_meta(out / "00000.parquet")["teacher"]["pretrained"] == str(other.resolve())
    assert (out / "00000.parquet").read_bytes() != before
    # the same parameters again: every shard is kept as it is
    code, text = run_curate(monkeypatch, capsys, "embed", corpus, "--out", out, *tiny_args(), "--pretrained", other)
    assert code == 0 and "3 of 3 shards already done" in text, text


def test_a_retrained_checkpoint_at_the_same_path_is_another_teacher(corpus, tmp_path, monkeypatch, capsys):
    from curate.models.teacher import create_model, model_config, save_checkpoint

    path = tmp_path / "teacher.pt"
    save_checkpoint(create_model("curate-tiny"), path, "curate-tiny", model_config("curate-tiny"))
    out = tmp_path / "emb"
    assert run_curate(monkeypatch, capsys, "embed", corpus, "--out", out, *tiny_args(), "--pretrained", path)[0] == 0
    import torch

    torch.manual_seed(9)
    save_checkpoint(create_model("curate-tiny"), path, "curate-tiny", model_config("curate-tiny"))
    code, text = run_curate(monkeypatch, capsys, "embed", corpus, "--out", out, *tiny_args(), "--pretrained", path)
    assert "weights_sha256" in one_line_error(code, text)


def test_shards_without_captions_fail_with_the_reasons_and_embed_with_images_only(tmp_path, monkeypatch, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000.tar").write_bytes(tar_bytes([(f"s{i}.png", png((i, 2 * i, 3))) for i in range(5)]))
    code, text = run_curate(monkeypatch, capsys, "embed", shards, "--out", tmp_path / "emb", *tiny_args(),
                            "--pretrained", "none")
    line = one_line_error(code, text)
    assert "nothing was embedded" in line and "5 samples read" in line and "missing caption ×5" in line
    assert "--images-only" in line
    code, text = run_curate(monkeypatch, capsys, "embed", shards, "--out", tmp_path / "img", *tiny_args(),
                            "--pretrained", "none", "--images-only")
    assert code == 0, text
    table = pq.read_table(tmp_path / "img" / "00000.parquet")
    assert table.schema.names[:3] == ["uid", "key", "image_embedding"] and "text_embedding" not in table.schema.names
    assert table.column("uid").to_pylist()[0] == content_uid(png((0, 0, 3)), "")
    assert read_meta(tmp_path / "img" / "00000.parquet")["images_only"] is True


def test_an_image_folder_embeds_one_table_per_class_with_labels(tmp_path, monkeypatch, capsys):
    root = tmp_path / "train"
    for label, colors in (("n01440764", [(1, 2, 3), (4, 5, 6)]), ("n01443537", [(7, 8, 9)])):
        (root / label).mkdir(parents=True)
        for i, color in enumerate(colors):
            (root / label / f"img_{i}.JPEG").write_bytes(png(color))
    (root / "n01443537" / "notes.txt").write_text("not an image")
    code, text = run_curate(monkeypatch, capsys, "embed", root, "--out", tmp_path / "in1k", *tiny_args(),
                            "--pretrained", "none")
    assert "--images-only" in one_line_error(code, text)  # an ImageFolder has no captions
    code, text = run_curate(monkeypatch, capsys, "embed", root, "--out", tmp_path / "in1k", *tiny_args(),
                            "--pretrained", "none", "--images-only")
    assert code == 0, text
    pool = EmbeddingPool(tmp_path / "in1k")
    assert [p.name for p in pool.files] == ["n01440764.parquet", "n01443537.parquet"] and pool.n_rows == 3
    assert pool.column("label").tolist() == ["n01440764", "n01440764", "n01443537"]
    assert pool.column("key").tolist() == ["n01440764/img_0", "n01440764/img_1", "n01443537/img_0"]
    assert pool.column("uid").tolist()[2] == content_uid(png((7, 8, 9)), "")


def test_the_summary_counts_uids_derived_from_content(tmp_path, monkeypatch, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    members = [("a.png", png((1, 1, 1))), ("a.txt", b"one"), ("a.json", b'{"uid": "' + b"a" * 32 + b'"}'),
               ("b.png", png((2, 2, 2))), ("b.txt", b"two"), ("b.json", b'{"url": "http://x"}'),
               ("c.png", png((3, 3, 3))), ("c.txt", b"three")]
    (shards / "00000.tar").write_bytes(tar_bytes(members))
    code, text = run_curate(monkeypatch, capsys, "embed", shards, "--out", tmp_path / "emb", *tiny_args(),
                            "--pretrained", "none")
    assert code == 0, text
    assert "2 of 3 uids were derived from content" in text and "resharder" in text
    assert read_meta(tmp_path / "emb" / "00000.parquet")["counts"]["content_uids"] == 2
