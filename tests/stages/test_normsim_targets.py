"""NormSim targets: every format loads to the same L2-normalised float32 matrix, the score table records what
the target was, and the retired `imagenet` name and the unloadable text tower answer in one clear line."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import make_embedding_dir, run_cli, run_filter, run_normsim
from curate.errors import CurateError
from curate.io.tables import (TeacherInfo, build_embedding_table, numpy_to_vectors, read_meta,
                              write_table_atomic)
from curate.io.targets import load_target, open_target
from curate.recipe import load_recipe

DIM = 6
TEACHER = TeacherInfo("test", "none", DIM, 100.0)


def unit_rows_oracle(raw: np.ndarray) -> np.ndarray:
    """x / ‖x‖ per row, in float64, as float32: what every target format must give."""
    x = raw.astype(np.float64)
    return (x / np.sqrt((x * x).sum(axis=1, keepdims=True))).astype(np.float32)


@pytest.fixture()
def raw():
    """A (12, 6) matrix of fp16-representable values, so that fp16 formats hold it exactly."""
    values = np.random.default_rng(11).standard_normal((12, DIM)) * 3.0
    return values.astype(np.float16).astype(np.float32)


def image_only_table(path, image: np.ndarray, teacher: TeacherInfo = TEACHER, null_text: bool = False):
    """An image-only embedding table (`curate embed --images-only`): no text vectors, or a null column."""
    n = len(image)
    columns = {"uid": pa.array([f"{i:032x}" for i in range(n)]), "key": pa.array([str(i) for i in range(n)]),
               "image_embedding": numpy_to_vectors(image)}
    if null_text:
        columns["text_embedding"] = pa.nulls(n, pa.list_(pa.float16(), image.shape[1]))
    write_table_atomic(pa.table(columns), path, meta={"teacher": teacher.to_dict(), "shard": "in1k.tar"})


def write_every_format(tmp_path, raw: np.ndarray) -> dict:
    """The same rows in every format `--target` takes; name -> path."""
    paths = {}
    np.save(tmp_path / "f32.npy", raw)
    paths["npy float32"] = tmp_path / "f32.npy"
    np.save(tmp_path / "f16.npy", raw.astype(np.float16))
    paths["npy float16"] = tmp_path / "f16.npy"
    torch.save(torch.from_numpy(raw), tmp_path / "tensor.pt")
    paths["pt tensor"] = tmp_path / "tensor.pt"
    torch.save({"image_features": torch.from_numpy(raw).half()}, tmp_path / "features.pt")
    paths["pt dict image_features"] = tmp_path / "features.pt"
    # the reference's released IN-1k files: in1k_clip_vit_l14_{0..4}.pt, each {"image_features": (n_i, D)}
    ref = tmp_path / "in1k_reference"
    ref.mkdir()
    for i, part in enumerate(np.array_split(raw, 5)):
        torch.save({"image_features": torch.from_numpy(part).half()}, ref / f"in1k_clip_vit_l14_{i}.pt")
    paths["reference in1k .pt files"] = ref
    pq.write_table(pa.table({"embedding": numpy_to_vectors(raw, pa.float32())}), tmp_path / "list.parquet")
    paths["parquet fixed_size_list"] = tmp_path / "list.parquet"
    emb = tmp_path / "emb"
    emb.mkdir()
    for i, rows in enumerate(np.array_split(np.arange(len(raw)), 2)):
        n = len(rows)
        table = build_embedding_table([f"{r:032x}" for r in rows], [str(r) for r in rows], ["c"] * n, raw[rows],
                                      raw[rows])
        write_table_atomic(table, emb / f"shard-{i:05d}.parquet", meta={"teacher": TEACHER.to_dict(), "shard": "s"})
    paths["embedding dir"] = emb
    image_only = tmp_path / "in1k_emb"
    image_only.mkdir()
    image_only_table(image_only / "train-00000.parquet", raw[:7])
    image_only_table(image_only / "train-00001.parquet", raw[7:], null_text=True)
    paths["image-only embedding dir"] = image_only
    paths["image-only table"] = image_only / "train-00000.parquet"
    return paths


def test_every_target_format_loads_to_the_same_normalised_matrix(tmp_path, raw):
    want = unit_rows_oracle(raw)
    paths = write_every_format(tmp_path, raw)
    first = None
    for name, path in paths.items():
        got = load_target(path, TEACHER)
        rows = want[:7] if name == "image-only table" else want
        assert got.dtype == np.float32 and got.shape == rows.shape, name
        np.testing.assert_allclose(got, rows, rtol=0, atol=2e-7, err_msg=name)
        np.testing.assert_allclose(np.linalg.norm(got.astype(np.float64), axis=1), 1.0, atol=1e-6, err_msg=name)
        if rows is want:
            first = got if first is None else first
            assert np.array_equal(got, first), name  # the same float32 input gives the same bits
    # by hand: (3, 4) / 5
    np.save(tmp_path / "hand.npy", np.array([[3.0, 4.0]], np.float32))
    np.testing.assert_allclose(load_target(tmp_path / "hand.npy", None), [[0.6, 0.8]], atol=1e-7)


def test_reference_in1k_files_load_as_the_reference_concatenates_them(tmp_path, raw):
    """The reference: torch.cat([torch.load(f"in1k_clip_vit_l14_{i}.pt")["image_features"] for i in range(5)]).
    Twelve parts here, so that name order (…_10 before …_2) and natural order differ."""
    ref = tmp_path / "in1k"
    ref.mkdir()
    for i, part in enumerate(np.array_split(raw, 12)):
        torch.save({"image_features": torch.from_numpy(part).half(), "labels": torch.arange(len(part))},
                   ref / f"in1k_clip_vit_l14_{i}.pt")
    reference = torch.cat([torch.load(ref / f"in1k_clip_vit_l14_{i}.pt", weights_only=True)["image_features"]
                           for i in range(12)], dim=0)
    np.testing.assert_array_equal(load_target(ref, TEACHER), unit_rows_oracle(reference.float().numpy()))
    target = open_target(ref, TEACHER)
    assert (target.kind, target.format, target.files) == ("image_embeddings", "files_dir", 12)


def test_score_table_records_the_target_kind_source_and_digest(tmp_path, raw):
    pool = make_embedding_dir(tmp_path / "pool", [5, 4], dim=DIM, seed=3)
    paths = write_every_format(tmp_path, raw)
    want = unit_rows_oracle(raw)
    digest = hashlib.sha256(want.tobytes()).hexdigest()[:16]
    for name, fmt, files in (("image-only embedding dir", "embedding_dir", 2), ("pt dict image_features", "pt", 1),
                             ("reference in1k .pt files", "files_dir", 5)):
        out = tmp_path / f"{fmt}.parquet"
        run_normsim(pool, out, target=str(paths[name]), p="inf", device="cpu")
        params = read_meta(out)["params"]
        assert params["target_kind"] == "image_embeddings" and params["target_format"] == fmt, name
        assert params["target_path"] == str(paths[name].resolve()) and params["target_files"] == files
        assert params["target_rows"] == 12 and params["target_sha256"] == digest
        assert params["target"] == str(paths[name])
    # the inline NormSim of `curate filter` records the same in kept.parquet and stats.json
    scores = tmp_path / "scores.parquet"
    run_normsim(pool, scores, target=str(paths["npy float32"]), p="2")
    result = run_filter([scores], tmp_path / "subset", keep=["normsim_2:0.5"], normsim="inf",
                         target=str(paths["image-only embedding dir"]), emb=pool)
    stats = json.loads((tmp_path / "subset" / "stats.json").read_text())
    assert result.kept == 5
    for recorded in (stats["normsim"], read_meta(tmp_path / "subset" / "kept.parquet")["normsim"]):
        assert recorded["p"] == "inf" and recorded["target_kind"] == "image_embeddings"
        assert recorded["target_sha256"] == digest


class FakeTextTower:
    """Stands in for load_teacher(...): prompt i of a batch maps to a fixed random unit vector of its text."""

    def __init__(self, dim: int):
        self.dim, self.device = dim, torch.device("cpu")
        self.info = TeacherInfo("test", "none", dim, 100.0)

    def tokenizer(self, prompts):
        return list(prompts)

    def encode_text(self, tokens):
        seeds = [int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) for t in tokens]
        return torch.from_numpy(np.stack([np.random.default_rng(s).standard_normal(self.dim) for s in seeds]))


def test_imagenet_text_is_recorded_as_text_prompts(tmp_path, monkeypatch):
    import curate.models

    monkeypatch.setattr(curate.models, "load_teacher", lambda *a, **k: FakeTextTower(DIM), raising=False)
    pool = make_embedding_dir(tmp_path / "pool", [4], dim=DIM, seed=3)
    out = tmp_path / "text.parquet"
    run_normsim(pool, out, target="imagenet-text", p="2", templates="simple", cache_dir=tmp_path / "cache")
    params = read_meta(out)["params"]
    assert params["target"] == "imagenet-text" and params["target_kind"] == "text_prompts"
    assert params["target_format"] == "imagenet-text" and params["templates"] == "simple"
    assert params["target_rows"] == 1000 and params["target_files"] == 0


def test_imagenet_names_the_image_target_in_one_line(tmp_path, monkeypatch, capsys):
    pool = make_embedding_dir(tmp_path / "pool", [4], dim=DIM, seed=3)
    np.save(tmp_path / "t.npy", np.eye(DIM, dtype=np.float32))
    run_normsim(pool, tmp_path / "scores.parquet", target=str(tmp_path / "t.npy"), p="2")
    monkeypatch.chdir(tmp_path)
    for command in (["normsim", pool, "--target", "imagenet", "--out", tmp_path / "n.parquet"],
                    ["filter", tmp_path / "scores.parquet", "--keep", "normsim_inf:0.5", "--normsim", "inf",
                     "--target", "imagenet", "--emb", pool, "--out", tmp_path / "subset"]):
        assert run_cli(monkeypatch, *command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert "image embeddings of ImageNet's training images" in err
        assert "`curate embed DIR --images-only --out in1k_emb`" in err and "`--target in1k_emb`" in err
        assert "`--target imagenet-text`" in err
    assert not (tmp_path / "n.parquet").exists()
    # a directory the user named `imagenet` is a path like any other
    make_embedding_dir(tmp_path / "imagenet", [3], dim=DIM, seed=4)
    assert run_cli(monkeypatch, "normsim", pool, "--target", "imagenet", "--out", tmp_path / "n.parquet") == 0
    assert read_meta(tmp_path / "n.parquet")["params"]["target_kind"] == "image_embeddings"


def test_a_recipe_with_the_imagenet_target_is_refused_before_it_runs(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[run]\ndir = "work"\n\n[normsim]\ntarget = "imagenet"\n')
    with pytest.raises(CurateError, match=r'\[normsim\] target = "imagenet": the paper\'s ImageNet target is the '
                                          r'image embeddings .* pass `target = "in1k_emb"`'):
        load_recipe(recipe)
    recipe.write_text('[run]\ndir = "work"\n\n[[filter]]\nname = "a"\nkeep = ["normsim_inf:0.2"]\n'
                      'normsim = "inf"\ntarget = "imagenet"\n')
    assert run_cli(monkeypatch, "run", recipe, "--dry-run") == 2
    err = capsys.readouterr().err
    assert '[filter] target = "imagenet"' in err and 'target = "imagenet-text"' in err  # brackets printed as text


def test_imagenet_text_without_the_teachers_weights_says_what_normsim_can_do(tmp_path, monkeypatch, capsys):
    """Imported DataComp embeddings name ViT-L-14/openai; offline, loading its text tower fails with advice for
    `curate embed` (--pretrained), an option normsim does not have."""
    import curate.models
    from curate.stages.import_datacomp.entry import ARCHS

    def offline(model, pretrained, **kwargs):
        raise CurateError(f"weights for {model}/{pretrained} cannot be downloaded (no network) and are not cached; "
                          "pass a local checkpoint instead: --pretrained /path/to/open_clip_model.safetensors|.pt")

    monkeypatch.setattr(curate.models, "load_teacher", offline, raising=False)
    teacher = ARCHS["b32"]
    pool = make_embedding_dir(tmp_path / "pool", [3], dim=teacher.embed_dim, seed=1, model=teacher.model,
                              pretrained=teacher.pretrained)
    assert run_cli(monkeypatch, "normsim", pool, "--target", "imagenet-text", "--out", tmp_path / "n.parquet",
                   "--cache-dir", tmp_path / "cache") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--pretrained" not in err and "Traceback" not in err
    assert "ViT-B-32/openai" in err and "cannot be downloaded (no network) and are not cached" in err
    assert "normsim takes no other checkpoint" in err and "--images-only" in err


def second_moment_of_unit_rows() -> np.ndarray:
    x = unit_rows_oracle(np.random.default_rng(5).standard_normal((20, DIM))).astype(np.float64)
    return (x.T @ x / len(x)).astype(np.float32)


class NotATensor:
    """Pickled by reference: torch.load(weights_only=True) must refuse it."""


@pytest.mark.parametrize("make, message", [
    (lambda d: torch.save({"labels": torch.zeros(3)}, d / "t.pt"), "a dict without the embeddings under "
                                                                   "image_features, image_embedding, embedding"),
    (lambda d: torch.save(torch.zeros(3, DIM, dtype=torch.int64), d / "t.pt"), "2-D float .* tensor"),
    (lambda d: torch.save(torch.zeros(DIM), d / "t.pt"), "got a 1-D"),
    (lambda d: torch.save({"image_features": NotATensor()}, d / "t.pt"), r"torch.load\(weights_only=True\)"),
    (lambda d: (d / "t.pt").write_bytes(b"not a tensor"), r"torch.load\(weights_only=True\)"),
    # the reference's `variance_imagenet_1k.pt`: the second moment (1/N) Σ x xᵀ of unit rows, not embeddings
    (lambda d: torch.save(torch.from_numpy(second_moment_of_unit_rows()), d / "t.pt"), "looks like a second moment"),
], ids=["dict without embeddings", "integer tensor", "1-D tensor", "pickled object", "not a tensor file",
        "second moment"])
def test_bad_pt_targets_are_one_line_errors(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(CurateError, match=message):
        load_target(tmp_path / "t.pt", TEACHER)


def test_directory_errors(tmp_path, raw):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CurateError, match="no target files in this directory"):
        load_target(tmp_path / "empty", TEACHER)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "a.npy", raw)
    np.save(mixed / "b.npy", raw[:, :4])
    with pytest.raises(CurateError, match=r"different widths \[4, 6\]"):
        load_target(mixed, None)
    other = make_embedding_dir(tmp_path / "other", [3], dim=DIM, seed=2, model="another")
    with pytest.raises(CurateError, match="embed the target with the pool's teacher"):
        load_target(other, TEACHER)
    with pytest.raises(CurateError, match="target not found; .* .npy, .pt or .parquet"):
        load_target(tmp_path / "missing.pt", TEACHER)


def test_row_blocks_do_not_change_the_normalised_bits(raw):
    from curate.io.targets import normalise_rows

    whole = normalise_rows(raw, "t", block_rows=len(raw))
    assert np.array_equal(normalise_rows(raw, "t", block_rows=5), whole)
    np.testing.assert_array_equal(whole, (raw / np.linalg.norm(raw.astype(np.float64), axis=1)[:, None]).astype(
        np.float32))
    raw[7] = 0.0
    with pytest.raises(CurateError, match="1 target rows are not finite or have zero norm .first at row 7"):
        normalise_rows(raw, "t", block_rows=5)
