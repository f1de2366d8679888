"""`curate synth` (format curate-synth/2): determinism, the kinds' counts and defining properties, every phenomenon's
truth fields (long tail, specificity, partial mismatch, semantic groups, the target family, planted target images),
labels, the target set, the world's digest and the tar layout."""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from curate.errors import CurateError
from curate.stages.synth import CORRUPTION_KINDS, FORMAT, PARTNER_FIELD, TRUTH_KINDS, WORLD, world_digest
from curate.stages.synth.captions import caption_for, caption_text
from curate.stages.synth.entry import corruption_counts, planted_count, semantic_group_sizes
from conftest import synth_corpus

N, SHARD, SEED, F, TARGET = 420, 100, 7, 0.35, 100


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


def pixels(jpg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), dtype=float)


def true_captions(attributes: dict, mentions) -> set[str]:
    """Every wording of a caption naming `mentions` of `attributes` truthfully."""
    return {caption_for(attributes, mentions, t) for t in range(len(WORLD.caption_templates))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    summary = synth_corpus(root / "a", samples=N, shard_size=SHARD, seed=SEED, corrupt=F, target_samples=TARGET)
    synth_corpus(root / "b", samples=N, shard_size=SHARD, seed=SEED, corrupt=F, target_samples=TARGET)
    synth_corpus(root / "c", samples=N, shard_size=SHARD, seed=SEED + 1, corrupt=F, target_samples=TARGET)
    samples = read_corpus(root / "a")
    by_uid = {s["json"]["uid"]: s for s in samples.values()}
    target = read_corpus(root / "a" / "target")
    return {"root": root, "summary": summary, "samples": samples, "by_uid": by_uid, "target": target,
            "target_by_uid": {s["json"]["uid"]: s for s in target.values()}}


def of_kind(corpus, kind):
    found = [s for s in corpus["samples"].values() if s["json"]["truth"] == kind]
    assert found, kind
    return found


# ---------------------------------------------------------------- layout and determinism

def test_same_seed_gives_identical_bytes_and_other_seed_differs(corpus):
    root = corpus["root"]
    names = sorted(p.relative_to(root / "a") for p in (root / "a").rglob("*") if p.is_file())
    assert [str(n) for n in names if n.suffix == ".tar"] == \
        ["00000.tar", "00001.tar", "00002.tar", "00003.tar", "00004.tar", "target/00000.tar"]
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
    assert index == N
    assert len(read_tar(root / "a" / "00004.tar")[0]) == 3 * (N - 4 * SHARD)


def test_uids_are_unique_lowercase_hex_and_keys_match(corpus):
    uids = [s["json"]["uid"] for s in corpus["samples"].values()]
    assert all(re.fullmatch(r"[0-9a-f]{32}", u) for u in uids)
    assert len(set(uids)) == N
    assert all(s["json"]["key"] == key for key, s in corpus["samples"].items())


def test_manifest_records_the_format_and_the_world(corpus):
    manifest = json.loads((corpus["root"] / "a" / "manifest.json").read_text())
    assert manifest["format"] == FORMAT == "curate-synth/2"
    assert manifest["world"] == {"version": WORLD.version, "digest": world_digest()}
    assert manifest["label_names"] == list(WORLD.label_names) and manifest["complete"] is True
    # a changed parameter is another world
    assert world_digest(replace(WORLD, zipf_exponent=1.2)) != world_digest()
    assert world_digest(replace(WORLD)) == world_digest()


# ---------------------------------------------------------------- kinds

def test_kind_counts(corpus):
    expected = corruption_counts(N, F)
    expected["clean"] -= planted_count(TARGET)
    expected["planted"] = planted_count(TARGET)
    seen = dict.fromkeys(TRUTH_KINDS, 0)
    for s in corpus["samples"].values():
        seen[s["json"]["truth"]] += 1
    assert seen == expected
    manifest = json.loads((corpus["root"] / "a" / "manifest.json").read_text())
    assert manifest["truth_counts"] == expected == corpus["summary"].truth_counts


def test_corruption_counts_hand_checked():
    assert corruption_counts(10, 0.0) == {"clean": 10, **dict.fromkeys(CORRUPTION_KINDS, 0)}
    # floor(0.37 * 20 + 0.5) = 7 corrupted: one of each of the seven kinds
    assert corruption_counts(20, 0.37) == {"clean": 13, **dict.fromkeys(CORRUPTION_KINDS, 1)}
    # floor(0.5 * 30 + 0.5) = 15: 2 each, the first kind (swapped) one more
    assert corruption_counts(30, 0.5) == {"clean": 15, "swapped": 3, **dict.fromkeys(CORRUPTION_KINDS[1:], 2)}
    assert planted_count(100) == 10 and planted_count(15) == 2 and planted_count(0) == 0  # 1.5 rounds half up


def test_duplicate_is_an_exact_copy_with_a_new_uid(corpus):
    for s in of_kind(corpus, "duplicate"):
        original = corpus["by_uid"][s["json"]["duplicate_of"]]
        assert original["json"]["truth"] == "clean"
        assert s["jpg"] == original["jpg"] and s["txt"] == original["txt"]
        assert s["json"]["uid"] != original["json"]["uid"]
        for field in ("attributes", "family", "semantic_group", "mentions"):
            assert s["json"][field] == original["json"][field], field


def test_swapped_caption_states_attributes_the_picture_does_not_have(corpus):
    for s in of_kind(corpus, "swapped"):
        donor = corpus["by_uid"][s["json"]["caption_from"]]
        own, stated = s["json"]["attributes"], s["json"]["caption_attributes"]
        assert s["txt"] == donor["txt"] and stated == donor["json"]["caption_attributes"]
        assert sum(stated[a] != own[a] for a in stated) >= WORLD.swap_min_wrong
        assert s["jpg"] != donor["jpg"]


def test_partial_mismatch_is_wrong_in_exactly_the_recorded_attribute(corpus):
    for s in of_kind(corpus, "partial_mismatch"):
        meta = s["json"]
        own, stated = meta["attributes"], meta["caption_attributes"]
        wrong = [a for a in stated if stated[a] != own[a]]
        assert wrong == [meta["wrong_attribute"]]
        assert meta["specificity"] == len(meta["mentions"]) == len(stated) >= WORLD.partial_min_mentions
        assert sorted(meta["mentions"]) == sorted(stated)
        assert s["txt"] in {caption_text(stated, own["count"], t) for t in range(len(WORLD.caption_templates))}
        assert s["txt"] not in true_captions(own, meta["mentions"])


def test_clone_is_a_near_duplicate_with_a_reworded_caption(corpus):
    for s in of_kind(corpus, "clone"):
        original = corpus["by_uid"][s["json"]["clone_of"]]
        attrs = s["json"]["attributes"]
        assert attrs == original["json"]["attributes"]
        assert s["json"]["semantic_group"] == original["json"]["semantic_group"]
        assert s["jpg"] != original["jpg"] and s["txt"] != original["txt"]
        assert s["txt"] in true_captions(attrs, s["json"]["mentions"])
        # near-duplicate: a shift of 1-2 px leaves most pixels alike
        assert np.mean(np.abs(pixels(s["jpg"]) - pixels(original["jpg"])).max(axis=2) < 30) > 0.8


def test_semantic_twin_has_the_meaning_of_its_partner_in_another_picture(corpus):
    for s in of_kind(corpus, "semantic_twin"):
        partner = corpus["by_uid"][s["json"]["twin_of"]]
        for field in ("attributes", "family", "semantic_group"):
            assert s["json"][field] == partner["json"][field], field
        assert s["txt"] in true_captions(s["json"]["attributes"], s["json"]["mentions"])
        # a new layout: the pictures differ far more than a clone's shift
        assert np.mean(np.abs(pixels(s["jpg"]) - pixels(partner["jpg"])).max(axis=2) < 30) < 0.98


def test_generic_and_noise_image(corpus):
    for s in of_kind(corpus, "generic"):
        assert s["txt"] in WORLD.generic_captions
        assert s["json"]["mentions"] == [] and s["json"]["specificity"] == 0
    clean_grey = [grey_fraction(s["jpg"]) for s in of_kind(corpus, "clean") if s["json"]["family"] == "rest"]
    for s in of_kind(corpus, "noise_image"):
        assert s["txt"] in true_captions(s["json"]["attributes"], s["json"]["mentions"])
        assert s["json"]["semantic_group"] is None
        assert grey_fraction(s["jpg"]) < 0.2 < min(clean_grey)


def test_partners_are_clean_samples(corpus):
    for kind, field in PARTNER_FIELD.items():
        if kind == "planted":
            continue
        for s in of_kind(corpus, kind):
            assert corpus["by_uid"][s["json"][field]]["json"]["truth"] == "clean"


# ---------------------------------------------------------------- phenomena

def test_clean_captions_name_their_mentions_truthfully(corpus):
    for s in of_kind(corpus, "clean"):
        meta = s["json"]
        assert meta["mentions"][0] == "concept" and meta["specificity"] == len(meta["mentions"])
        assert 1 <= meta["specificity"] <= len(WORLD.attribute_values)
        assert meta["caption_attributes"] == {a: meta["attributes"][a] for a in meta["mentions"]}
        assert s["txt"] in true_captions(meta["attributes"], meta["mentions"])
    specificities = {s["json"]["specificity"] for s in of_kind(corpus, "clean")}
    assert specificities == set(WORLD.specificity)


def test_caption_wording_hand_checked():
    attrs = {"concept": "star", "colour": "red", "size": "small", "count": 2, "texture": "striped", "tone": "dark",
             "style": "hollow"}
    assert caption_for(attrs, ("concept",), 0) == "stars"
    assert caption_for(attrs, ("concept", "colour", "count"), 1) == "a photo of two red stars"
    assert caption_for(attrs, list(WORLD.attribute_values), 4) == \
        "there are two small hollow red stars on a dark striped background"
    one = {**attrs, "count": 1, "colour": "orange"}
    assert caption_for(one, ("concept", "colour", "texture"), 2) == "an image of an orange star on a striped background"
    # the article follows the first letter, as the zero-shot prompts do ("a hourglass.")
    assert caption_for({**one, "concept": "hourglass"}, ("concept",), 4) == "there is a hourglass"


def test_long_tail_concepts(corpus):
    rest = [s["json"] for s in corpus["samples"].values() if s["json"]["family"] == "rest"
            and s["json"]["truth"] == "clean"]
    for meta in rest:
        assert meta["concept_id"] == WORLD.concepts.index(meta["attributes"]["concept"])
        assert meta["concept_rank"] == meta["concept_id"] + 1
    ranks = np.bincount([m["concept_rank"] for m in rest], minlength=len(WORLD.concepts) + 1)
    assert ranks[1] > ranks[2] > ranks[6] and ranks[1] > 0.15 * len(rest)  # Zipf: p(1) = 1 / H(24, 1.1) = 0.26
    p = WORLD.zipf_probabilities
    assert math.isclose(sum(p), 1.0) and math.isclose(p[0] / p[1], 2 ** WORLD.zipf_exponent)


def test_semantic_group_is_meaning(corpus):
    metas = [s["json"] for s in corpus["samples"].values() if s["json"]["semantic_group"] is not None]
    by_group: dict[int, set] = {}
    for meta in metas:
        assert meta["semantic_group"] == WORLD.semantic_group(meta["family"], meta["attributes"])
        by_group.setdefault(meta["semantic_group"], set()).add(
            (meta["family"], json.dumps(meta["attributes"], sort_keys=True)))
    assert all(len(meanings) == 1 for meanings in by_group.values())
    # hand-checked id: the first value of every attribute, rest family, is group 0; the last ones the largest id
    first = {a: v[0] for a, v in WORLD.attribute_values.items()}
    last = {a: v[-1] for a, v in WORLD.attribute_values.items()}
    assert WORLD.semantic_group("rest", first) == 0
    assert WORLD.semantic_group("target", last) == 2 * math.prod(len(v) for v in WORLD.attribute_values.values()) - 1
    manifest = json.loads((corpus["root"] / "a" / "manifest.json").read_text())
    assert manifest["semantic_groups"] == semantic_group_sizes(
        [s["json"]["semantic_group"] for s in corpus["samples"].values()],
        [s["json"]["truth"] for s in corpus["samples"].values()])
    assert manifest["semantic_groups"]["median_size_of_clean"] == 1.0


def test_semantic_group_sizes_hand_checked():
    sizes = semantic_group_sizes([5, 5, 7, None, 9, 5], ["clean", "clone", "clean", "noise_image", "clean", "clean"])
    # clean samples' groups: 5 (size 3), 7 (1), 9 (1), 5 (3) -> median 2, half of them have a twin
    assert sizes == {"groups": 3, "median_size_of_clean": 2.0, "clean_with_twin_share": 0.5, "largest": 3}


def test_target_family_is_a_minority_with_its_own_look(corpus):
    metas = [s["json"] for s in corpus["samples"].values() if s["json"]["truth"] in ("clean", "partial_mismatch")]
    family = [m for m in metas if m["family"] == "target"]
    assert 0.04 * len(metas) < len(family) < 0.25 * len(metas)
    for meta in family:
        assert meta["attributes"]["concept"] in WORLD.target_classes and meta["attributes"]["count"] == 1
    for s in of_kind(corpus, "clean"):
        if s["json"]["family"] == "target":  # the badge: its class's colour at the centre
            centre = pixels(s["jpg"])[32, 32 - 20:32 + 20]
            badge = np.array(WORLD.badge_rgb(s["json"]["attributes"]["concept"]))
            assert (np.abs(centre - badge).max(axis=1) < 25).any()


def test_target_set(corpus):
    target_dir = corpus["root"] / "a" / "target"
    classes = json.loads((target_dir / "classes.json").read_text())
    assert classes["classes"] == list(WORLD.target_classes) and classes["task"] == "concept"
    assert all("{}" in t for t in classes["templates"])
    samples = corpus["target"]
    assert len(samples) == TARGET == classes["samples"]
    counts = dict.fromkeys(WORLD.target_classes, 0)
    for s in samples.values():
        meta = s["json"]
        assert meta["class_name"] == WORLD.target_classes[meta["label"]] == meta["attributes"]["concept"]
        assert meta["family"] == "target" and meta["truth"] == "clean"
        assert re.fullmatch(r"[0-9a-f]{32}", meta["uid"])
        assert meta["class_name"] in s["txt"]
        counts[meta["class_name"]] += 1
    assert counts == classes["class_counts"] and max(counts.values()) - min(counts.values()) <= 1
    assert not set(corpus["target_by_uid"]) & set(corpus["by_uid"])


def test_planted_samples_are_target_images(corpus):
    planted = of_kind(corpus, "planted")
    assert len(planted) == planted_count(TARGET)
    assert len({s["json"]["planted_from"] for s in planted}) == len(planted)
    copies = {"exact": 0, "near": 0}
    for s in planted:
        source = corpus["target_by_uid"][s["json"]["planted_from"]]
        assert s["json"]["attributes"] == source["json"]["attributes"] and s["json"]["family"] == "target"
        copies[s["json"]["planted_copy"]] += 1
        if s["json"]["planted_copy"] == "exact":
            assert s["jpg"] == source["jpg"]
        else:
            assert s["jpg"] != source["jpg"]
            assert np.mean(np.abs(pixels(s["jpg"]) - pixels(source["jpg"])).max(axis=2) < 40) > 0.7
        assert s["txt"] in true_captions(s["json"]["attributes"], s["json"]["mentions"])
    assert copies["exact"] and copies["near"]


def test_labels_are_multi_hot_of_attributes(corpus):
    assert len(WORLD.label_names) == sum(len(v) for v in WORLD.attribute_values.values()) == len(set(WORLD.label_names))
    for s in corpus["samples"].values():
        labels, attrs = s["json"]["labels"], s["json"]["attributes"]
        assert len(labels) == len(WORLD.label_names) and set(labels) <= {0, 1}
        on = {WORLD.label_names[i] for i, v in enumerate(labels) if v}
        assert on == {f"{attr}:{attrs[attr]}" for attr in WORLD.attribute_values}


# ---------------------------------------------------------------- options and errors

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
    synth_corpus(out, samples=12, shard_size=5, seed=1, corrupt=0.5, target_samples=6)  # same: regenerated identically
    assert (out / "00000.tar").read_bytes() == before
    with pytest.raises(CurateError, match="other parameters"):
        synth_corpus(out, samples=12, shard_size=5, seed=2, corrupt=0.5, target_samples=6)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["world"]["digest"] = "0" * 12  # made in another world
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CurateError, match="another world"):
        synth_corpus(out, samples=12, shard_size=5, seed=1, corrupt=0.5, target_samples=6)
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
