"""`curate synth`: determinism, truth counts, the defining property of each corruption kind, labels,
the target set and the tar layout."""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from curate.errors import CurateError
from curate.stages.synth import (
    ATTRIBUTE_VALUES,
    CAPTION_TEMPLATES,
    CORRUPTION_KINDS,
    GENERIC_CAPTIONS,
    LABEL_NAMES,
    SWAP_MIN_DIFFERENT_ATTRIBUTES,
    TARGET_CLASSES,
)
from curate.stages.synth.entry import caption_for, corruption_counts
from conftest import synth_corpus

N, SHARD, SEED, F, TARGET = 300, 70, 7, 0.25, 100


def read_tar(path: Path) -> tuple[list[tarfile.TarInfo], dict[str, dict[str, bytes]]]:
    """Members in file order, and samples grouped by key."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        infos = tar.getmembers()
        for info in infos:
            key, ext = info.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return infos, samples


def read_corpus(directory: Path) -> dict[str, dict]:
    """key -> {"jpg": bytes, "txt": str, "json": dict} over all shards, in shard order."""
    out = {}
    for shard in sorted(directory.glob("*.tar")):
        for key, members in read_tar(shard)[1].items():
            out[key] = {"jpg": members["jpg"], "txt": members["txt"].decode(), "json": json.loads(members["json"])}
    return out


def grey_fraction(jpg: bytes) -> float:
    """Share of pixels whose channels agree within 20 levels (the grey backgrounds of clean pictures)."""
    rgb = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")).astype(int)
    return float(np.mean(np.ptp(rgb, axis=2) < 20))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    summary = synth_corpus(root / "a", samples=N, shard_size=SHARD, seed=SEED, corrupt=F, target_samples=TARGET)
    synth_corpus(root / "b", samples=N, shard_size=SHARD, seed=SEED, corrupt=F, target_samples=TARGET)
    synth_corpus(root / "c", samples=N, shard_size=SHARD, seed=SEED + 1, corrupt=F, target_samples=TARGET)
    samples = read_corpus(root / "a")
    by_uid = {s["json"]["uid"]: s for s in samples.values()}
    return {"root": root, "summary": summary, "samples": samples, "by_uid": by_uid}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(corpus):
    root = corpus["root"]
    names = sorted(p.relative_to(root / "a") for p in (root / "a").rglob("*") if p.is_file())
    assert [str(n) for n in names if n.suffix == ".tar"] == \
        ["00000.tar", "00001.tar", "00002.tar", "00003.tar", "00004.tar",
         "target/00000.tar", "target/00001.tar"]
    for name in names:
        assert (root / "a" / name).read_bytes() == (root / "b" / name).read_bytes(), name
    for name in ("00000.tar", "target/00000.tar"):
        assert (root / "a" / name).read_bytes() != (root / "c" / name).read_bytes()
    uids_c = {s["json"]["uid"] for s in read_corpus(root / "c").values()}
    assert not uids_c & set(corpus["by_uid"])


def test_tar_layout_and_deterministic_headers(corpus):
    root = corpus["root"]
    index = 0
    for shard in sorted((root / "a").glob("*.tar")):
        infos, _ = read_tar(shard)
        expected = []
        for _ in range(len(infos) // 3):
            key = f"{index:09d}"
            expected += [f"{key}.jpg", f"{key}.txt", f"{key}.json"]
            index += 1
        assert [i.name for i in infos] == expected
        for info in infos:
            assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == (0, 0, 0, "", "", 0o644)
            assert info.isreg()
    assert index == N
    # shard-major: the last shard is the ragged remainder
    assert len(read_tar(root / "a" / "00004.tar")[0]) == 3 * (N - 4 * SHARD)


def test_uids_are_unique_lowercase_hex_and_keys_match(corpus):
    uids = [s["json"]["uid"] for s in corpus["samples"].values()]
    assert all(re.fullmatch(r"[0-9a-f]{32}", u) for u in uids)
    assert len(set(uids)) == N
    assert all(s["json"]["key"] == key for key, s in corpus["samples"].items())


def test_truth_counts_match_fraction(corpus):
    n_corrupt = math.floor(F * N + 0.5)
    expected = corruption_counts(N, F)
    assert expected["clean"] == N - n_corrupt
    assert sum(expected[k] for k in CORRUPTION_KINDS) == n_corrupt
    assert max(expected[k] for k in CORRUPTION_KINDS) - min(expected[k] for k in CORRUPTION_KINDS) <= 1
    seen = {kind: 0 for kind in expected}
    for s in corpus["samples"].values():
        seen[s["json"]["truth"]] += 1
    assert seen == expected
    manifest = json.loads((corpus["root"] / "a" / "manifest.json").read_text())
    assert manifest["truth_counts"] == expected == corpus["summary"].truth_counts
    assert manifest["label_names"] == list(LABEL_NAMES) and manifest["complete"] is True


def test_corruption_counts_hand_checked():
    assert corruption_counts(10, 0.0) == {"clean": 10, "swapped": 0, "generic": 0, "noise_image": 0,
                                          "clone": 0, "duplicate": 0}
    # floor(0.37 * 20 + 0.5) = 7 corrupted: 2, 2, 1, 1, 1
    assert corruption_counts(20, 0.37) == {"clean": 13, "swapped": 2, "generic": 2, "noise_image": 1,
                                           "clone": 1, "duplicate": 1}


def _of_kind(corpus, kind):
    found = [s for s in corpus["samples"].values() if s["json"]["truth"] == kind]
    assert found, kind
    return found


def test_duplicate_is_exact_copy_with_new_uid(corpus):
    for s in _of_kind(corpus, "duplicate"):
        original = corpus["by_uid"][s["json"]["duplicate_of"]]
        assert original["json"]["truth"] == "clean"
        assert s["jpg"] == original["jpg"] and s["txt"] == original["txt"]
        assert s["json"]["uid"] != original["json"]["uid"]
        assert s["json"]["attributes"] == original["json"]["attributes"]


def test_swapped_caption_comes_from_a_different_picture(corpus):
    for s in _of_kind(corpus, "swapped"):
        donor = corpus["by_uid"][s["json"]["caption_from"]]
        own = s["json"]["attributes"]
        assert s["txt"] == donor["txt"]
        differing = sum(own[k] != donor["json"]["attributes"][k] for k in ATTRIBUTE_VALUES)
        assert differing >= SWAP_MIN_DIFFERENT_ATTRIBUTES
        assert s["txt"] not in {caption_for(own, t) for t in range(len(CAPTION_TEMPLATES))}
        assert s["jpg"] != donor["jpg"]


def test_clone_is_near_duplicate_with_reworded_caption(corpus):
    for s in _of_kind(corpus, "clone"):
        original = corpus["by_uid"][s["json"]["clone_of"]]
        attrs = s["json"]["attributes"]
        assert attrs == original["json"]["attributes"]
        assert s["jpg"] != original["jpg"]
        assert s["txt"] != original["txt"]
        assert s["txt"] in {caption_for(attrs, t) for t in range(len(CAPTION_TEMPLATES))}
        a = np.asarray(Image.open(io.BytesIO(s["jpg"])), dtype=float)
        b = np.asarray(Image.open(io.BytesIO(original["jpg"])), dtype=float)
        # near-duplicate: a shift of 1-2 px leaves most pixels alike
        assert np.mean(np.abs(a - b).max(axis=2) < 30) > 0.8


def test_generic_and_noise_image(corpus):
    for s in _of_kind(corpus, "generic"):
        assert s["txt"] in GENERIC_CAPTIONS
    clean_grey = [grey_fraction(s["jpg"]) for s in _of_kind(corpus, "clean")]
    for s in _of_kind(corpus, "noise_image"):
        attrs = s["json"]["attributes"]
        assert s["txt"] in {caption_for(attrs, t) for t in range(len(CAPTION_TEMPLATES))}
        assert grey_fraction(s["jpg"]) < 0.2 < min(clean_grey)


def test_clean_captions_describe_attributes(corpus):
    for s in _of_kind(corpus, "clean"):
        attrs = s["json"]["attributes"]
        assert s["txt"] in {caption_for(attrs, t) for t in range(len(CAPTION_TEMPLATES))}
    assert caption_for({"shape": "circle", "colour": "red", "size": "small", "count": 2, "texture": "striped"}, 0) \
        == "two small red circles on a striped background"
    assert caption_for({"shape": "star", "colour": "blue", "size": "large", "count": 1, "texture": "plain"}, 4) \
        == "there is a large blue star on a plain background"


def test_labels_are_multi_hot_of_attributes(corpus):
    assert len(LABEL_NAMES) == sum(len(v) for v in ATTRIBUTE_VALUES.values()) == len(set(LABEL_NAMES))
    for s in corpus["samples"].values():
        labels, attrs = s["json"]["labels"], s["json"]["attributes"]
        assert len(labels) == len(LABEL_NAMES) and set(labels) <= {0, 1}
        on = {LABEL_NAMES[i] for i, v in enumerate(labels) if v}
        assert on == {f"{attr}:{attrs[attr]}" for attr in ATTRIBUTE_VALUES}


def test_corpus_has_target_family_and_others(corpus):
    attrs = [s["json"]["attributes"] for s in corpus["samples"].values()]
    family = sum(a["count"] == 1 and a["texture"] == "plain" for a in attrs)
    assert 0.1 * N < family < 0.5 * N
    assert {a["texture"] for a in attrs} == set(ATTRIBUTE_VALUES["texture"])
    assert {a["count"] for a in attrs} == set(ATTRIBUTE_VALUES["count"])


def test_target_set(corpus):
    target_dir = corpus["root"] / "a" / "target"
    classes = json.loads((target_dir / "classes.json").read_text())
    assert classes["classes"] == list(TARGET_CLASSES)
    assert all("{}" in t for t in classes["templates"])
    samples = read_corpus(target_dir)
    assert len(samples) == TARGET == classes["samples"]
    counts = {c: 0 for c in TARGET_CLASSES}
    for s in samples.values():
        meta = s["json"]
        assert meta["class_name"] == TARGET_CLASSES[meta["label"]] == meta["attributes"]["shape"]
        assert meta["attributes"]["count"] == 1 and meta["attributes"]["texture"] == "plain"
        assert meta["truth"] == "clean" and re.fullmatch(r"[0-9a-f]{32}", meta["uid"])
        assert meta["class_name"] in s["txt"]
        counts[meta["class_name"]] += 1
    assert counts == classes["class_counts"] and max(counts.values()) - min(counts.values()) <= 1
    assert not {s["json"]["uid"] for s in samples.values()} & set(corpus["by_uid"])


def test_image_size_option(tmp_path):
    synth_corpus(tmp_path / "big", samples=5, shard_size=5, seed=0, corrupt=0.0, target_samples=2, image_size=96)
    sample = next(iter(read_corpus(tmp_path / "big").values()))
    assert Image.open(io.BytesIO(sample["jpg"])).size == (96, 96)


@pytest.mark.parametrize("kwargs, message", [
    ({"samples": 0}, "--samples"),
    ({"shard_size": 0}, "--shard-size"),
    ({"corrupt": 1.0}, "--corrupt"),
    ({"corrupt": -0.1}, "--corrupt"),
    ({"seed": -1}, "--seed"),
    ({"image_size": 8}, "--image-size"),
    ({"samples": 2, "corrupt": 0.9}, "no clean sample"),
])
def test_bad_parameters_are_clear_errors(tmp_path, kwargs, message):
    args = {"samples": 10, "shard_size": 5, "seed": 0, "corrupt": 0.2, "target_samples": 0} | kwargs
    with pytest.raises(CurateError, match=message):
        synth_corpus(tmp_path / "out", **args)


def test_out_dir_rules(tmp_path):
    out = tmp_path / "out"
    synth_corpus(out, samples=12, shard_size=5, seed=1, corrupt=0.5, target_samples=6)
    before = (out / "00000.tar").read_bytes()
    synth_corpus(out, samples=12, shard_size=5, seed=1, corrupt=0.5, target_samples=6)   # same parameters: regenerated identically
    assert (out / "00000.tar").read_bytes() == before
    with pytest.raises(CurateError, match="other parameters"):
        synth_corpus(out, samples=12, shard_size=5, seed=2, corrupt=0.5, target_samples=6)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CurateError, match="no synth manifest"):
        synth_corpus(foreign, samples=12, shard_size=5, seed=1, corrupt=0.5)


def test_cli_synth(tmp_path):
    from curate.cli import app

    result = CliRunner().invoke(app, ["synth", str(tmp_path / "cli"), "--samples", "20", "--shard-size", "8",
                                      "--seed", "4", "--corrupt", "0.5", "--target-samples", "6"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "cli").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "bad"), "--samples", "0"])
    assert isinstance(result.exception, CurateError)
