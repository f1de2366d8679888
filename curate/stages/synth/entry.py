"""`curate synth`'s entry: plan the kinds, render every sample, write the shards, the target set and the manifest
(`run`)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from curate.config import check_config
from curate.errors import CurateError
from curate.io import tar_blocks
from curate.io.atomic import write_text_atomic
from curate.stages.synth import (
    CORRUPTION_KINDS,
    FORMAT,
    PARTNER_FIELD,
    PLANTED,
    TARGET_TASK,
    TRUTH_KINDS,
    WORLD,
    SynthConfig,
    SynthResult,
    world_digest,
)
from curate.stages.synth.captions import caption_for, caption_text, stated_attributes
from curate.stages.synth.render import (
    SHAPE_EXTENT,
    Background,
    Badge,
    Picture,
    PlacedObject,
    encode_jpeg,
    render_noise,
    render_picture,
)

# Independent random streams, keyed by (seed, stream, index): any sample can be regenerated alone.
_STREAM_SAMPLE, _STREAM_CORRUPT_SAMPLE, _STREAM_PLAN, _STREAM_TARGET, _STREAM_TARGET_CLASSES = range(5)
NO_PARTNER = -1


# ---------------------------------------------------------------- small pure helpers

def synth_uid(seed: int, index: int, namespace: str = "") -> str:
    """uid = first 32 hex of sha256(f"{seed}:{index}"), or of f"{seed}:{namespace}:{index}"."""
    text = f"{seed}:{namespace}:{index}" if namespace else f"{seed}:{index}"
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:32]


def sample_key(index: int) -> str:
    return f"{index:09d}"


def label_vector(attributes: dict) -> list[int]:
    """Multi-hot 0/1 list over WORLD.label_names for an attribute dict."""
    on = {f"{attr}:{attributes[attr]}" for attr in WORLD.attribute_values}
    return [int(name in on) for name in WORLD.label_names]


def corruption_counts(samples: int, corrupt: float) -> dict[str, int]:
    """Exact number of samples per kind before planting: floor(F*N + 0.5) corrupted, split evenly over the kinds
    (the first n mod 7 kinds in CORRUPTION_KINDS order get one more)."""
    n_corrupt = math.floor(corrupt * samples + 0.5)
    base, extra = divmod(n_corrupt, len(CORRUPTION_KINDS))
    counts = {kind: base + (1 if k < extra else 0) for k, kind in enumerate(CORRUPTION_KINDS)}
    return {"clean": samples - n_corrupt, **counts}


def planted_count(target_samples: int) -> int:
    """round(WORLD.plant_fraction x target samples), half up: how many target images are planted in the pool."""
    return math.floor(WORLD.plant_fraction * target_samples + 0.5)


def wrong_statements(stated: dict, attributes: dict) -> int:
    """How many of the stated attribute values the picture (`attributes`) does not have."""
    return sum(stated[a] != attributes[a] for a in stated)


# ---------------------------------------------------------------- sampling pictures and captions

def sample_attributes(rng: np.random.Generator, family: str) -> dict:
    """The attributes of a new picture: the rest's concept from the Zipf law, the target family's uniform over
    the target classes with one object; every other attribute uniform."""
    values = WORLD.attribute_values
    if family == "target":
        concept = WORLD.target_classes[int(rng.integers(len(WORLD.target_classes)))]
    else:
        concept = WORLD.concepts[int(rng.choice(len(WORLD.concepts), p=WORLD.zipf_probabilities))]
    attrs = {"concept": concept}
    for attr in ("colour", "size", "count", "texture", "tone", "style"):
        attrs[attr] = values[attr][int(rng.integers(len(values[attr])))]
    if family == "target":
        attrs["count"] = 1
    return attrs


def sample_mentions(rng: np.random.Generator, k: int) -> tuple[str, ...]:
    """The concept and k - 1 other attributes drawn uniformly, in WORLD.attribute_values order."""
    others = [a for a in WORLD.attribute_values if a != "concept"]
    chosen = set(rng.choice(len(others), size=k - 1, replace=False).tolist()) if k > 1 else set()
    return ("concept",) + tuple(a for i, a in enumerate(others) if i in chosen)


def sample_background(rng: np.random.Generator, attrs: dict) -> Background:
    low, high = WORLD.tone_range(attrs["tone"])
    grey = int(rng.integers(low, high))
    ink = grey - WORLD.texture_contrast if attrs["tone"] == "light" else grey + WORLD.texture_contrast
    return Background(texture=attrs["texture"], grey=grey, ink=ink, period=float(rng.uniform(6, 10)) / 64,
                      phase=float(rng.uniform(0, 6)) / 64, orientation=int(rng.integers(3)))


def sample_layout(rng: np.random.Generator, attrs: dict, family: str) -> Picture:
    """Positions, radii, rotations, colour jitter, background geometry and (target family) the badge.

    The rest: one object goes anywhere inside the image; several go into distinct cells of a 2x2 grid with a
    jitter that keeps them apart, leaving room for a clone's extra shift. The target family: one larger object
    on a white badge near the centre."""
    count = attrs["count"]
    base_rgb = np.array(WORLD.colour_rgb(attrs["colour"]))
    scale = WORLD.target_scale if family == "target" else 1.0
    radii = WORLD.radius(attrs["size"]) * scale * rng.uniform(0.94, 1.06, size=count)
    clone_room = max(WORLD.clone_shift_px) / 64
    badge = None
    if family == "target":
        jitter = WORLD.target_centre_jitter
        centres = [tuple(0.5 + rng.uniform(-jitter, jitter, size=2))]
        badge = Badge(float(centres[0][0]), float(centres[0][1]), float(WORLD.badge_scale * radii[0]),
                      WORLD.badge_rgb(attrs["concept"]))
    elif count == 1:
        lo = SHAPE_EXTENT * radii[0] + 0.02 + clone_room
        centres = [tuple(rng.uniform(lo, 1 - lo, size=2))]
    else:
        cells = rng.choice(4, size=count, replace=False)
        centres = []
        for cell, r in zip(cells, radii):
            room = max(0.25 - SHAPE_EXTENT * r - clone_room, 0.0)
            dx, dy = rng.uniform(-room, room, size=2)
            centres.append((0.25 + 0.5 * (cell % 2) + dx, 0.25 + 0.5 * (cell // 2) + dy))
    objects = []
    for (cx, cy), r in zip(centres, radii):
        rotation = float(rng.uniform(-WORLD.rotation_degrees, WORLD.rotation_degrees))
        jitter = rng.integers(-WORLD.object_jitter, WORLD.object_jitter + 1, size=3)
        fill = tuple(int(v) for v in np.clip(base_rgb + jitter, 0, 255))
        objects.append(PlacedObject(float(cx), float(cy), float(r), rotation, fill))
    return Picture(attrs["concept"], attrs["style"], tuple(objects), sample_background(rng, attrs), badge)


@dataclass(frozen=True)
class Planned:
    """A sample as planned before its kind is applied: family, attributes, layout, mentions, caption template."""

    family: str
    attributes: dict
    picture: Picture
    mentions: tuple[str, ...]
    template: int

    @property
    def caption(self) -> str:
        return caption_for(self.attributes, self.mentions, self.template)

    @property
    def stated(self) -> dict:
        return stated_attributes(self.attributes, self.mentions)


def draw_wording(rng: np.random.Generator) -> tuple[tuple[str, ...], int]:
    """A caption's mentions (k uniform over WORLD.specificity) and template."""
    k = int(WORLD.specificity[int(rng.integers(len(WORLD.specificity)))])
    return sample_mentions(rng, k), int(rng.integers(len(WORLD.caption_templates)))


def draw_planned(rng: np.random.Generator, family: str, concept: str | None = None) -> Planned:
    attributes = sample_attributes(rng, family)
    if concept is not None:
        attributes["concept"] = concept
    picture = sample_layout(rng, attributes, family)
    return Planned(family, attributes, picture, *draw_wording(rng))


def planned_sample(seed: int, index: int) -> Planned:
    """Main-corpus sample `index` as planned (its own stream: regenerated alone)."""
    rng = np.random.default_rng([seed, _STREAM_SAMPLE, index])
    family = "target" if rng.random() < WORLD.target_family_fraction else "rest"
    return draw_planned(rng, family)


def planned_target(seed: int, index: int, class_index: int) -> Planned:
    """Target-set sample `index` of class `class_index`."""
    rng = np.random.default_rng([seed, _STREAM_TARGET, index])
    return draw_planned(rng, "target", WORLD.target_classes[class_index])


def target_class_order(seed: int, target_samples: int) -> np.ndarray:
    """The class index of every target sample: balanced, in a seeded order."""
    classes = np.arange(target_samples) % len(WORLD.target_classes)
    return np.random.default_rng([seed, _STREAM_TARGET_CLASSES]).permutation(classes)


def jittered(picture: Picture, rng: np.random.Generator) -> Picture:
    """The same picture with every object (and the badge with it) moved by 1-2 px (in 64-px units) per axis."""
    moved = []
    for obj in picture.objects:
        dx, dy = (rng.choice(WORLD.clone_shift_px, size=2) * rng.choice((-1, 1), size=2)) / 64
        moved.append(replace(obj, cx=obj.cx + float(dx), cy=obj.cy + float(dy)))
    badge = picture.badge
    if badge is not None:
        badge = replace(badge, cx=moved[0].cx, cy=moved[0].cy)
    return replace(picture, objects=tuple(moved), badge=badge)


# ---------------------------------------------------------------- the plan of kinds

@dataclass
class KindPlan:
    """Per sample: kind code (index into TRUTH_KINDS), partner index and, for planted samples, the target index
    (NO_PARTNER when none)."""

    kind: np.ndarray
    partner: np.ndarray
    target: np.ndarray


def best_swap_donor(rng: np.random.Generator, own: dict, seed: int, clean: np.ndarray) -> int:
    """A clean donor whose caption states >= WORLD.swap_min_wrong wrong attributes for `own` (the first drawn that
    does, else the most wrong of WORLD.swap_draws draws)."""
    best, best_wrong = -1, -1
    for _ in range(WORLD.swap_draws):
        candidate = int(clean[rng.integers(len(clean))])
        wrong = wrong_statements(planned_sample(seed, candidate).stated, own)
        if wrong > best_wrong:
            best, best_wrong = candidate, wrong
        if wrong >= WORLD.swap_min_wrong:
            break
    return best


def plan_kinds(samples: int, seed: int, corrupt: float, target_samples: int) -> KindPlan:
    """The kind, partner and planted target of every sample. O(N) memory."""
    counts = corruption_counts(samples, corrupt)
    rng = np.random.default_rng([seed, _STREAM_PLAN])
    kind = np.zeros(samples, dtype=np.int8)
    partner = np.full(samples, NO_PARTNER, dtype=np.int64)
    target = np.full(samples, NO_PARTNER, dtype=np.int64)
    order = rng.permutation(samples)
    start = 0
    for code, name in enumerate(CORRUPTION_KINDS, start=1):
        kind[order[start:start + counts[name]]] = code
        start += counts[name]
    clean = np.flatnonzero(kind == 0)
    for code, name in enumerate(CORRUPTION_KINDS, start=1):
        if name not in PARTNER_FIELD:
            continue
        members = np.flatnonzero(kind == code)
        if len(members) and not len(clean):
            raise CurateError(f"--corrupt {corrupt} leaves no clean sample among {samples} to copy from; "
                              "lower --corrupt or raise --samples")
        if name != "swapped":
            partner[members] = clean[rng.integers(len(clean), size=len(members))]
            continue
        for i in members:
            partner[i] = best_swap_donor(rng, planned_sample(seed, int(i)).attributes, seed, clean)
    # planted target images replace clean samples that no other sample points to
    free = np.setdiff1d(clean, partner[partner >= 0])
    n_plant = min(planted_count(target_samples), len(free), target_samples)
    if n_plant:
        chosen = np.sort(rng.choice(free, size=n_plant, replace=False))
        kind[chosen] = TRUTH_KINDS.index(PLANTED)
        target[chosen] = rng.choice(target_samples, size=n_plant, replace=False)
    return KindPlan(kind, partner, target)


# ---------------------------------------------------------------- samples -> members

def _json_bytes(meta: dict) -> bytes:
    return json.dumps(meta, separators=(",", ":"), ensure_ascii=True).encode("utf-8")


def describe(planned: Planned, attributes: dict | None = None, family: str | None = None) -> dict:
    """The truth fields of a picture (its family and attributes; `planned`'s unless given)."""
    attributes = planned.attributes if attributes is None else attributes
    family = planned.family if family is None else family
    concept_id = WORLD.concepts.index(attributes["concept"])
    return {"family": family, "attributes": attributes, "labels": label_vector(attributes), "concept_id": concept_id,
            "concept_rank": concept_id + 1, "semantic_group": WORLD.semantic_group(family, attributes)}


def caption_fields(mentions, stated: dict) -> dict:
    return {"mentions": list(mentions), "specificity": len(mentions), "caption_attributes": stated}


def main_sample(seed: int, index: int, plan: KindPlan, target_classes: np.ndarray, image_size: int
                ) -> tuple[str, dict[str, bytes], dict]:
    """(key, members, truth json) of main-corpus sample `index`."""
    kind = TRUTH_KINDS[int(plan.kind[index])]
    partner = int(plan.partner[index])
    own = planned_sample(seed, index)
    rng = np.random.default_rng([seed, _STREAM_CORRUPT_SAMPLE, index])
    truth = describe(own)
    extra: dict = {}
    if kind in ("clean", "swapped", "generic", "partial_mismatch"):
        image = encode_jpeg(render_picture(own.picture, image_size))
    if kind == "clean":
        caption, captioned = own.caption, caption_fields(own.mentions, own.stated)
    elif kind == "generic":
        caption = WORLD.generic_captions[int(rng.integers(len(WORLD.generic_captions)))]
        captioned = caption_fields((), {})
    elif kind == "noise_image":
        image, caption = encode_jpeg(render_noise(rng, image_size)), own.caption
        captioned = caption_fields(own.mentions, own.stated)
        truth["semantic_group"] = None  # noise means nothing
    elif kind == "partial_mismatch":
        mentions = list(own.mentions)
        unnamed = [a for a in WORLD.attribute_values if a not in mentions]
        missing = max(0, WORLD.partial_min_mentions - len(mentions))
        added = set(rng.choice(len(unnamed), size=missing, replace=False).tolist()) if missing else set()
        mentions = tuple(a for a in WORLD.attribute_values if a in mentions or
                         (a in unnamed and unnamed.index(a) in added))
        wrong = mentions[int(rng.integers(len(mentions)))]
        others = [v for v in WORLD.attribute_values[wrong] if v != own.attributes[wrong]]
        stated = stated_attributes(own.attributes, mentions)
        stated[wrong] = others[int(rng.integers(len(others)))]
        caption = caption_text(stated, own.attributes["count"], own.template)
        captioned = caption_fields(mentions, stated)
        extra["wrong_attribute"] = wrong
    elif kind == PLANTED:
        target_index = int(plan.target[index])
        source = planned_target(seed, target_index, int(target_classes[target_index]))
        truth = describe(source)
        near = bool(rng.random() < WORLD.plant_near_share)
        if near:
            image = encode_jpeg(render_picture(jittered(source.picture, rng), image_size), WORLD.plant_near_quality)
        else:
            image = encode_jpeg(render_picture(source.picture, image_size))
        mentions, template = draw_wording(rng)  # a new caption of the same picture
        caption = caption_for(source.attributes, mentions, template)
        captioned = caption_fields(mentions, stated_attributes(source.attributes, mentions))
        extra = {PARTNER_FIELD[PLANTED]: synth_uid(seed, target_index, "target"),
                 "planted_copy": "near" if near else "exact"}
    else:
        other = planned_sample(seed, partner)
        extra[PARTNER_FIELD[kind]] = synth_uid(seed, partner)
        if kind == "swapped":
            caption, captioned = other.caption, caption_fields(other.mentions, other.stated)
        else:
            truth = describe(other)
            if kind == "duplicate":
                image, caption = encode_jpeg(render_picture(other.picture, image_size)), other.caption
                captioned = caption_fields(other.mentions, other.stated)
            elif kind == "clone":
                n_templates = len(WORLD.caption_templates)
                template = (other.template + 1 + int(rng.integers(n_templates - 1))) % n_templates
                image = encode_jpeg(render_picture(jittered(other.picture, rng), image_size))
                caption = caption_for(other.attributes, other.mentions, template)
                captioned = caption_fields(other.mentions, other.stated)
            else:  # semantic_twin: the same meaning, drawn and worded anew
                picture = sample_layout(rng, other.attributes, other.family)
                mentions, template = draw_wording(rng)
                image = encode_jpeg(render_picture(picture, image_size))
                caption = caption_for(other.attributes, mentions, template)
                captioned = caption_fields(mentions, stated_attributes(other.attributes, mentions))
    key = sample_key(index)
    meta = {"uid": synth_uid(seed, index), "key": key, "truth": kind, **truth, **captioned, **extra}
    return key, {"jpg": image, "txt": caption.encode("utf-8"), "json": _json_bytes(meta)}, meta


def target_sample(seed: int, index: int, class_index: int, image_size: int) -> tuple[str, dict[str, bytes]]:
    planned = planned_target(seed, index, class_index)
    key = sample_key(index)
    meta = {"uid": synth_uid(seed, index, "target"), "key": key, "truth": "clean", "label": class_index,
            "class_name": WORLD.target_classes[class_index], **describe(planned),
            **caption_fields(planned.mentions, planned.stated)}
    image = encode_jpeg(render_picture(planned.picture, image_size))
    return key, {"jpg": image, "txt": planned.caption.encode("utf-8"), "json": _json_bytes(meta)}


def semantic_group_sizes(groups: list[int | None], kinds: list[str]) -> dict:
    """How redundant the pool is in meaning: the number of groups, the median size of a clean sample's group,
    the share of clean samples with a twin in the pool (group size >= 2) and the largest group."""
    sizes: dict[int, int] = {}
    for g in groups:
        if g is not None:
            sizes[g] = sizes.get(g, 0) + 1
    clean = [sizes[g] for g, k in zip(groups, kinds) if k == "clean" and g is not None]
    return {"groups": len(sizes), "median_size_of_clean": float(np.median(clean)) if clean else None,
            "clean_with_twin_share": float(np.mean([s >= 2 for s in clean])) if clean else None,
            "largest": max(sizes.values(), default=0)}


# ---------------------------------------------------------------- the stage

def check_corpus_dir(out: Path, parameters: dict) -> None:
    """OUT must be new, empty, or a corpus made with the same parameters (then it is regenerated)."""
    if out.exists() and not out.is_dir():
        raise CurateError(f"{out}: exists and is not a directory; choose another OUT")
    if not out.exists() or not any(out.iterdir()):
        return
    manifest_path = out / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        previous = manifest["parameters"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CurateError(f"{out}: directory is not empty and holds no synth manifest.json; "
                          "choose a new or empty OUT directory") from None
    if previous != parameters or manifest.get("format") != FORMAT or manifest.get("world") != world_identity():
        diff = ", ".join(f"{k} {previous.get(k)!r} -> {v!r}" for k, v in parameters.items() if previous.get(k) != v)
        raise CurateError(f"{out}: holds a synth corpus made with other parameters or another world "
                          f"({diff or manifest.get('format')}); choose another OUT directory or delete this one")


def world_identity() -> dict:
    return {"version": WORLD.version, "digest": world_digest()}


def _shard_ranges(n: int, shard_size: int) -> list[range]:
    return [range(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def run(out_dir: str | Path, cfg: SynthConfig = SynthConfig(), progress=None) -> SynthResult:
    """Write the synthetic corpus, its target set and manifest under `out_dir`. `progress(n)`: n more samples
    written (main corpus, then target set)."""
    started = time.perf_counter()
    check_config(cfg)
    samples, shard_size, seed, corrupt = cfg.samples, cfg.shard_size, cfg.seed, cfg.corrupt
    target_samples, image_size = cfg.target_samples, cfg.image_size
    out = Path(out_dir)
    parameters = {"samples": int(samples), "shard_size": int(shard_size), "seed": int(seed), "corrupt": float(corrupt),
                  "target_samples": int(target_samples), "image_size": int(image_size)}
    check_corpus_dir(out, parameters)
    out.mkdir(parents=True, exist_ok=True)
    # Written first, so that a rerun after an interruption recognises the directory and regenerates it.
    write_text_atomic(out / "manifest.json", json.dumps({"format": FORMAT, "world": world_identity(),
                                                         "complete": False, "parameters": parameters}, indent=2) + "\n")

    plan = plan_kinds(samples, seed, corrupt, target_samples)
    classes = target_class_order(seed, target_samples)
    truth_counts = dict.fromkeys(TRUTH_KINDS, 0)
    families = {"target": 0, "rest": 0}
    groups, kinds = [], []
    shards = []
    for shard_index, indices in enumerate(_shard_ranges(samples, shard_size)):
        rows = []
        for i in indices:
            key, members, meta = main_sample(seed, i, plan, classes, image_size)
            truth_counts[meta["truth"]] += 1
            families[meta["family"]] += 1
            groups.append(meta["semantic_group"])
            kinds.append(meta["truth"])
            rows.append((key, members))
        name = f"{shard_index:05d}.tar"
        tar_blocks.write_tar_atomic(out / name, rows)
        shards.append(name)
        if progress is not None:
            progress(len(rows))

    target_shards = []
    class_counts = dict.fromkeys(WORLD.target_classes, 0)
    if target_samples:
        for shard_index, indices in enumerate(_shard_ranges(target_samples, shard_size)):
            rows = [target_sample(seed, i, int(classes[i]), image_size) for i in indices]
            name = f"{shard_index:05d}.tar"
            tar_blocks.write_tar_atomic(out / "target" / name, rows)
            target_shards.append(name)
            if progress is not None:
                progress(len(rows))
        for c in classes:
            class_counts[WORLD.target_classes[c]] += 1
        write_text_atomic(out / "target" / "classes.json", json.dumps({
            "task": TARGET_TASK,
            "description": "the target family (one object on a white badge); the class is its concept",
            "label_field": "label",
            "classes": list(WORLD.target_classes),
            "templates": list(WORLD.zero_shot_templates),
            "samples": int(target_samples),
            "class_counts": class_counts,
            "shards": target_shards,
        }, indent=2) + "\n")

    group_sizes = semantic_group_sizes(groups, kinds)
    manifest = {
        "format": FORMAT,
        "world": world_identity(),
        "complete": True,
        "parameters": parameters,
        "samples": int(samples),
        "shards": shards,
        "seed": int(seed),
        "corrupt": float(corrupt),
        "truth_counts": truth_counts,
        "corruption_kinds": list(CORRUPTION_KINDS),
        "families": families,
        "semantic_groups": group_sizes,
        "label_names": list(WORLD.label_names),
        "attribute_values": {k: list(v) for k, v in WORLD.attribute_values.items()},
        "generic_captions": list(WORLD.generic_captions),
        "target_family_fraction": WORLD.target_family_fraction,
        "key_rule": "9-digit global sample index, shard-major",
        "uid_rule": "first 32 hex of sha256(f'{seed}:{index}'); target set: sha256(f'{seed}:target:{index}')",
        "target": {"dir": "target", "samples": int(target_samples), "shards": target_shards, "task": TARGET_TASK,
                   "classes": list(WORLD.target_classes), "planted": truth_counts[PLANTED]}
        if target_samples else None,
    }
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return SynthResult(out=str(out), samples=int(samples), shards=len(shards), truth_counts=truth_counts,
                       target_samples=int(target_samples), target_shards=len(target_shards),
                       seconds=time.perf_counter() - started, families=families, semantic_groups=group_sizes)
