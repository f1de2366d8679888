"""`curate synth`'s entry: plan the corruptions, render every sample, write the shards, the target set and the
manifest (`run`)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from curate.config import check_config
from curate.errors import CurateError
from curate.io import tar_blocks
from curate.io.atomic import write_text_atomic
from curate.stages.synth import (
    ATTRIBUTE_VALUES,
    CAPTION_TEMPLATES,
    CLONE_SHIFT_PX,
    COLOUR_RGB,
    CORRUPTION_KINDS,
    COUNT_WORDS,
    FORMAT,
    GENERIC_CAPTIONS,
    LABEL_NAMES,
    PARTNER_FIELD,
    SHAPE_PLURALS,
    SIZE_RADIUS,
    SWAP_DRAWS,
    SWAP_MIN_DIFFERENT_ATTRIBUTES,
    TARGET_CLASSES,
    TARGET_FAMILY_FRACTION,
    TARGET_TASK,
    TRUTH_KINDS,
    ZERO_SHOT_TEMPLATES,
    SynthConfig,
    SynthResult,
)
from curate.stages.synth.render import (
    SHAPE_EXTENT,
    Background,
    Picture,
    PlacedObject,
    encode_jpeg,
    render_noise,
    render_picture,
)

# Independent random streams, keyed by (seed, stream, index): any sample can be regenerated alone.
_STREAM_SAMPLE, _STREAM_CORRUPT_SAMPLE, _STREAM_PLAN, _STREAM_TARGET, _STREAM_TARGET_CLASSES = range(5)


# ---------------------------------------------------------------- small pure helpers

def synth_uid(seed: int, index: int, namespace: str = "") -> str:
    """uid = first 32 hex of sha256(f"{seed}:{index}"), or of f"{seed}:{namespace}:{index}"."""
    text = f"{seed}:{namespace}:{index}" if namespace else f"{seed}:{index}"
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:32]


def sample_key(index: int) -> str:
    return f"{index:09d}"


def label_vector(attributes: dict) -> list[int]:
    """Multi-hot 0/1 list over LABEL_NAMES for an attribute dict."""
    on = {f"{attr}:{attributes[attr]}" for attr in ATTRIBUTE_VALUES}
    return [int(name in on) for name in LABEL_NAMES]


def caption_for(attributes: dict, template: int) -> str:
    """The caption of `attributes` in template number `template` (of CAPTION_TEMPLATES)."""
    count = attributes["count"]
    shape = attributes["shape"] if count == 1 else SHAPE_PLURALS[attributes["shape"]]
    obj = f"{COUNT_WORDS[count]} {attributes['size']} {attributes['colour']} {shape}"
    return CAPTION_TEMPLATES[template].format(obj=obj, texture=attributes["texture"], be="is" if count == 1 else "are")


def corruption_counts(samples: int, corrupt: float) -> dict[str, int]:
    """Exact number of samples per truth kind: floor(F*N + 0.5) corrupted, split evenly over the kinds."""
    n_corrupt = math.floor(corrupt * samples + 0.5)
    base, extra = divmod(n_corrupt, len(CORRUPTION_KINDS))
    counts = {kind: base + (1 if k < extra else 0) for k, kind in enumerate(CORRUPTION_KINDS)}
    return {"clean": samples - n_corrupt, **counts}


def _differing_attributes(a: dict, b: dict) -> int:
    return sum(a[k] != b[k] for k in ATTRIBUTE_VALUES)


# ---------------------------------------------------------------- sampling pictures

def _sample_attributes(rng: np.random.Generator, target_family: bool) -> dict:
    attrs = {attr: values[int(rng.integers(len(values)))] for attr, values in ATTRIBUTE_VALUES.items()}
    if target_family:
        attrs["count"], attrs["texture"] = 1, "plain"
    return attrs


def _sample_layout(rng: np.random.Generator, attrs: dict) -> Picture:
    """Positions, radii, rotations, colour jitter and background geometry for `attrs`.

    One object goes anywhere inside the image; several go into distinct cells of a 2x2 grid with a
    jitter that keeps them apart, leaving room for a clone's extra shift."""
    count = attrs["count"]
    base_rgb = np.array(COLOUR_RGB[attrs["colour"]])
    radii = SIZE_RADIUS[attrs["size"]] * rng.uniform(0.94, 1.06, size=count)
    clone_room = max(CLONE_SHIFT_PX) / 64
    if count == 1:
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
        rotation = float(rng.uniform(-12, 12))
        fill = tuple(int(v) for v in np.clip(base_rgb + rng.integers(-12, 13, size=3), 0, 255))
        objects.append(PlacedObject(float(cx), float(cy), float(r), rotation, fill))
    background = Background(
        texture=attrs["texture"],
        grey=int(rng.integers(190, 216)),
        period=float(rng.uniform(6, 10)) / 64,
        phase=float(rng.uniform(0, 6)) / 64,
        orientation=int(rng.integers(3)),
    )
    return Picture(attrs["shape"], tuple(objects), background)


class _Sample:
    """A main-corpus sample as planned before corruption: attributes, layout and caption template."""

    __slots__ = ("attributes", "picture", "template")

    def __init__(self, seed: int, index: int):
        rng = np.random.default_rng([seed, _STREAM_SAMPLE, index])
        self.attributes = _sample_attributes(rng, bool(rng.random() < TARGET_FAMILY_FRACTION))
        self.picture = _sample_layout(rng, self.attributes)
        self.template = int(rng.integers(len(CAPTION_TEMPLATES)))

    @property
    def caption(self) -> str:
        return caption_for(self.attributes, self.template)


def _jitter(picture: Picture, rng: np.random.Generator) -> Picture:
    """The same picture with every object moved by 1-2 px (in 64-px units) along each axis."""
    moved = []
    for obj in picture.objects:
        dx, dy = (rng.choice(CLONE_SHIFT_PX, size=2) * rng.choice((-1, 1), size=2)) / 64
        moved.append(replace(obj, cx=obj.cx + float(dx), cy=obj.cy + float(dy)))
    return replace(picture, objects=tuple(moved))


# ---------------------------------------------------------------- corruption plan

def plan_corruptions(samples: int, seed: int, corrupt: float) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: truth code (index into TRUTH_KINDS) and partner index (-1 when none). O(N) memory."""
    counts = corruption_counts(samples, corrupt)
    rng = np.random.default_rng([seed, _STREAM_PLAN])
    truth = np.zeros(samples, dtype=np.int8)
    partner = np.full(samples, -1, dtype=np.int64)
    order = rng.permutation(samples)
    start = 0
    for code, kind in enumerate(CORRUPTION_KINDS, start=1):
        truth[order[start:start + counts[kind]]] = code
        start += counts[kind]
    clean = np.flatnonzero(truth == 0)
    for code, kind in enumerate(CORRUPTION_KINDS, start=1):
        if kind not in PARTNER_FIELD:
            continue
        members = np.flatnonzero(truth == code)
        if len(members) and not len(clean):
            raise CurateError(f"--corrupt {corrupt} leaves no clean sample among {samples} to copy from; "
                              "lower --corrupt or raise --samples")
        if kind != "swapped":
            partner[members] = clean[rng.integers(len(clean), size=len(members))]
            continue
        for i in members:
            own = _Sample(seed, int(i)).attributes
            best, best_diff = -1, -1
            for _ in range(SWAP_DRAWS):
                cand = int(clean[rng.integers(len(clean))])
                diff = _differing_attributes(own, _Sample(seed, cand).attributes)
                if diff > best_diff:
                    best, best_diff = cand, diff
                if diff >= SWAP_MIN_DIFFERENT_ATTRIBUTES:
                    break
            partner[i] = best
    return truth, partner


# ---------------------------------------------------------------- samples -> members

def _json_bytes(meta: dict) -> bytes:
    return json.dumps(meta, separators=(",", ":"), ensure_ascii=True).encode("utf-8")


def _main_sample(seed: int, index: int, truth_code: int, partner: int, image_size: int) -> tuple[str, dict[str, bytes], str]:
    """(key, members, truth kind) of main-corpus sample `index`."""
    kind = TRUTH_KINDS[truth_code]
    own = _Sample(seed, index)
    rng = np.random.default_rng([seed, _STREAM_CORRUPT_SAMPLE, index])
    attributes = own.attributes
    extra: dict[str, str] = {}
    if kind == "clean":
        image, caption = encode_jpeg(render_picture(own.picture, image_size)), own.caption
    elif kind == "generic":
        image = encode_jpeg(render_picture(own.picture, image_size))
        caption = GENERIC_CAPTIONS[int(rng.integers(len(GENERIC_CAPTIONS)))]
    elif kind == "noise_image":
        image, caption = encode_jpeg(render_noise(rng, image_size)), own.caption
    else:
        other = _Sample(seed, partner)
        extra[PARTNER_FIELD[kind]] = synth_uid(seed, partner)
        if kind == "swapped":
            image, caption = encode_jpeg(render_picture(own.picture, image_size)), other.caption
        elif kind == "duplicate":
            attributes = other.attributes
            image, caption = encode_jpeg(render_picture(other.picture, image_size)), other.caption
        else:  # clone
            attributes = other.attributes
            template = (other.template + 1 + int(rng.integers(len(CAPTION_TEMPLATES) - 1))) % len(CAPTION_TEMPLATES)
            image = encode_jpeg(render_picture(_jitter(other.picture, rng), image_size))
            caption = caption_for(attributes, template)
    key = sample_key(index)
    meta = {"uid": synth_uid(seed, index), "key": key, "truth": kind, "attributes": attributes,
            "labels": label_vector(attributes), **extra}
    return key, {"jpg": image, "txt": caption.encode("utf-8"), "json": _json_bytes(meta)}, kind


def _target_sample(seed: int, index: int, class_index: int, image_size: int) -> tuple[str, dict[str, bytes]]:
    rng = np.random.default_rng([seed, _STREAM_TARGET, index])
    attributes = _sample_attributes(rng, target_family=True)
    attributes["shape"] = TARGET_CLASSES[class_index]
    picture = _sample_layout(rng, attributes)
    caption = caption_for(attributes, int(rng.integers(len(CAPTION_TEMPLATES))))
    key = sample_key(index)
    meta = {"uid": synth_uid(seed, index, "target"), "key": key, "truth": "clean", "label": class_index,
            "class_name": TARGET_CLASSES[class_index], "attributes": attributes, "labels": label_vector(attributes)}
    image = encode_jpeg(render_picture(picture, image_size))
    return key, {"jpg": image, "txt": caption.encode("utf-8"), "json": _json_bytes(meta)}


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
    if previous != parameters:
        diff = ", ".join(f"{k} {previous.get(k)!r} -> {v!r}" for k, v in parameters.items() if previous.get(k) != v)
        raise CurateError(f"{out}: holds a synth corpus made with other parameters ({diff}); "
                          "choose another OUT directory or delete this one")


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
    write_text_atomic(out / "manifest.json", json.dumps({"format": FORMAT, "complete": False, "parameters": parameters},
                                                        indent=2) + "\n")

    truth, partner = plan_corruptions(samples, seed, corrupt)
    truth_counts = dict.fromkeys(TRUTH_KINDS, 0)
    shards = []
    for shard_index, indices in enumerate(_shard_ranges(samples, shard_size)):
        rows = []
        for i in indices:
            key, members, kind = _main_sample(seed, i, int(truth[i]), int(partner[i]), image_size)
            truth_counts[kind] += 1
            rows.append((key, members))
        name = f"{shard_index:05d}.tar"
        tar_blocks.write_tar_atomic(out / name, rows)
        shards.append(name)
        if progress is not None:
            progress(len(rows))

    target_shards = []
    class_counts = dict.fromkeys(TARGET_CLASSES, 0)
    if target_samples:
        # Balanced classes in a seeded order.
        classes = np.random.default_rng([seed, _STREAM_TARGET_CLASSES]).permutation(
            np.arange(target_samples) % len(TARGET_CLASSES))
        for shard_index, indices in enumerate(_shard_ranges(target_samples, shard_size)):
            rows = [_target_sample(seed, i, int(classes[i]), image_size) for i in indices]
            name = f"{shard_index:05d}.tar"
            tar_blocks.write_tar_atomic(out / "target" / name, rows)
            target_shards.append(name)
            if progress is not None:
                progress(len(rows))
        for c in classes:
            class_counts[TARGET_CLASSES[c]] += 1
        write_text_atomic(out / "target" / "classes.json", json.dumps({
            "task": TARGET_TASK,
            "description": "one object on a plain background; the class is its shape",
            "label_field": "label",
            "classes": list(TARGET_CLASSES),
            "templates": list(ZERO_SHOT_TEMPLATES),
            "samples": int(target_samples),
            "class_counts": class_counts,
            "shards": target_shards,
        }, indent=2) + "\n")

    manifest = {
        "format": FORMAT,
        "complete": True,
        "parameters": parameters,
        "samples": int(samples),
        "shards": shards,
        "seed": int(seed),
        "corrupt": float(corrupt),
        "truth_counts": truth_counts,
        "corruption_kinds": list(CORRUPTION_KINDS),
        "label_names": list(LABEL_NAMES),
        "attribute_values": {k: list(v) for k, v in ATTRIBUTE_VALUES.items()},
        "generic_captions": list(GENERIC_CAPTIONS),
        "target_family_fraction": TARGET_FAMILY_FRACTION,
        "key_rule": "9-digit global sample index, shard-major",
        "uid_rule": "first 32 hex of sha256(f'{seed}:{index}'); target set: sha256(f'{seed}:target:{index}')",
        "target": {"dir": "target", "samples": int(target_samples), "shards": target_shards, "task": TARGET_TASK,
                   "classes": list(TARGET_CLASSES)} if target_samples else None,
    }
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return SynthResult(out=str(out), samples=int(samples), shards=len(shards), truth_counts=truth_counts,
                       target_samples=int(target_samples), target_shards=len(target_shards),
                       seconds=time.perf_counter() - started)
