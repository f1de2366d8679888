"""`curate synth`: an offline image-caption corpus whose ground truth is known.

No real image-text data and no pretrained CLIP weights reach our machines, so the project makes its own
corpus: small procedural pictures (shapes with colour, size, count, position and a background texture)
with captions that describe them in words, plus injected corruptions whose kind and partner are recorded.

Layout (img2dataset's): OUT/00000.tar, 00001.tar, ... each holding, per sample and in this order,
KEY.jpg, KEY.txt, KEY.json, where KEY is the sample's global index as 9 digits (shard-major order).
Tar members are deterministic: mtime 0, uid/gid 0, empty uname/gname, mode 0o644, USTAR format.

`.json` fields:
  uid         32 lowercase hex: sha256(f"{seed}:{index}") (target set: sha256(f"{seed}:target:{index}"))
  key         the member key
  truth       "clean" or one of CORRUPTION_KINDS
  attributes  {"shape", "colour", "size", "count", "texture"} of the picture; for `noise_image` (whose
              picture is noise) they are the attributes its caption describes
  labels      multi-hot list over LABEL_NAMES ("shape:circle", ..., "texture:checkered"), 0/1 ints
  caption_from / clone_of / duplicate_of   uid of the partner sample for swapped / clone / duplicate

Corruptions: n = floor(F*N + 0.5) samples are corrupted, chosen by a seeded permutation; n is split over
CORRUPTION_KINDS as evenly as possible, the first n mod 5 kinds (in CORRUPTION_KINDS order) getting one
more (see `corruption_counts`). Partners are clean samples drawn uniformly with replacement.
  swapped      the sample's own picture with the caption of a clean partner whose attributes differ in
               at least SWAP_MIN_DIFFERENT_ATTRIBUTES of the five (best of SWAP_DRAWS draws)
  generic      the own picture with a caption from GENERIC_CAPTIONS
  noise_image  a noise picture with a caption describing the sampled attributes
  clone        the partner's layout with every object moved by 1-2 px and a caption with another
               template (same words, other phrasing): AdaCL's clone negative
  duplicate    the partner's exact image bytes and caption under a new uid

Families: with probability TARGET_FAMILY_FRACTION a sample belongs to the target family (one object on a
plain background), otherwise every attribute is uniform. OUT/target/ holds a separate set of that family
only, labelled by shape (TARGET_CLASSES), with OUT/target/classes.json giving zero-shot prompt templates.
"""

from __future__ import annotations

import hashlib
import json
import math
import tarfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterable

import numpy as np

from curate.errors import CurateError
from curate.io import tar_blocks
from curate.io.atomic import write_text_atomic
from curate.stages.synth_render import (
    COLOUR_RGB,
    SHAPE_EXTENT,
    Background,
    Picture,
    PlacedObject,
    encode_jpeg,
    render_noise,
    render_picture,
)

FORMAT = "curate-synth/1"

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
                 "cross": "crosses", "diamond": "diamonds"}
COLOURS = tuple(COLOUR_RGB)
SIZES = ("small", "large")
COUNTS = (1, 2, 3, 4)
COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
TEXTURES = ("plain", "striped", "dotted", "checkered")
ATTRIBUTE_VALUES: dict[str, tuple] = {
    "shape": SHAPES, "colour": COLOURS, "size": SIZES, "count": COUNTS, "texture": TEXTURES,
}
# The multi-hot label vocabulary: one entry per attribute value, attributes in ATTRIBUTE_VALUES order.
LABEL_NAMES = tuple(f"{attr}:{value}" for attr, values in ATTRIBUTE_VALUES.items() for value in values)

CORRUPTION_KINDS = ("swapped", "generic", "noise_image", "clone", "duplicate")
TRUTH_KINDS = ("clean",) + CORRUPTION_KINDS
PARTNER_FIELD = {"swapped": "caption_from", "clone": "clone_of", "duplicate": "duplicate_of"}
GENERIC_CAPTIONS = ("an image", "image", "photo", "a photo", "a picture", "picture", "img",
                    "a photograph", "untitled", "thumbnail", "view", "an image of something")

# Caption templates; {obj} is "<count> <size> <colour> <shape(s)>", {be} is "is"/"are".
CAPTION_TEMPLATES = (
    "{obj} on a {texture} background",
    "a photo of {obj} on a {texture} background",
    "a {texture} background with {obj}",
    "{obj} against a {texture} backdrop",
    "there {be} {obj} on a {texture} background",
    "{obj}, {texture} background",
)

TARGET_FAMILY_FRACTION = 0.2
TARGET_TASK = "shape"
TARGET_CLASSES = SHAPES
ZERO_SHOT_TEMPLATES = ("a {}.", "a photo of a {}.", "a picture of a {}.", "a {} shape.",
                       "a {} on a plain background.", "there is a {} on a plain background.")

SWAP_MIN_DIFFERENT_ATTRIBUTES = 2
SWAP_DRAWS = 64
SIZE_RADIUS = {"small": 0.12, "large": 0.20}   # fraction of the image side
CLONE_SHIFT_PX = (1, 2)                         # per-axis shift of each object in a clone, in 64-px pixels
IMAGE_SIZE_RANGE = (32, 1024)

# Independent random streams, keyed by (seed, stream, index): any sample can be regenerated alone.
_STREAM_SAMPLE, _STREAM_CORRUPT_SAMPLE, _STREAM_PLAN, _STREAM_TARGET, _STREAM_TARGET_CLASSES = range(5)


# ---------------------------------------------------------------- small pure helpers

def sample_uid(seed: int, index: int, namespace: str = "") -> str:
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
        extra[PARTNER_FIELD[kind]] = sample_uid(seed, partner)
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
    meta = {"uid": sample_uid(seed, index), "key": key, "truth": kind, "attributes": attributes,
            "labels": label_vector(attributes), **extra}
    return key, {"jpg": image, "txt": caption.encode("utf-8"), "json": _json_bytes(meta)}, kind


def _target_sample(seed: int, index: int, class_index: int, image_size: int) -> tuple[str, dict[str, bytes]]:
    rng = np.random.default_rng([seed, _STREAM_TARGET, index])
    attributes = _sample_attributes(rng, target_family=True)
    attributes["shape"] = TARGET_CLASSES[class_index]
    picture = _sample_layout(rng, attributes)
    caption = caption_for(attributes, int(rng.integers(len(CAPTION_TEMPLATES))))
    key = sample_key(index)
    meta = {"uid": sample_uid(seed, index, "target"), "key": key, "truth": "clean", "label": class_index,
            "class_name": TARGET_CLASSES[class_index], "attributes": attributes, "labels": label_vector(attributes)}
    image = encode_jpeg(render_picture(picture, image_size))
    return key, {"jpg": image, "txt": caption.encode("utf-8"), "json": _json_bytes(meta)}


# ---------------------------------------------------------------- tar writing

def write_tar_atomic(path: str | Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> None:
    """Write (key, {ext: bytes}) samples as a deterministic tar: members KEY.ext in the given order,
    mtime 0, uid/gid 0, empty owner names, mode 0o644, USTAR headers; renamed into place when complete."""
    tar_blocks.write_tar_atomic(path, samples, tarfile.USTAR_FORMAT)


# ---------------------------------------------------------------- the stage

def _validate(samples, shard_size, seed, corrupt, target_samples, image_size) -> None:
    def is_int(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not is_int(samples) or samples <= 0:
        raise CurateError(f"--samples must be a positive integer, got {samples!r}")
    if samples >= 10**9:
        raise CurateError(f"--samples {samples}: keys have 9 digits, so at most 999,999,999 samples")
    if not is_int(shard_size) or shard_size <= 0:
        raise CurateError(f"--shard-size must be a positive integer, got {shard_size!r}")
    if not is_int(seed) or seed < 0:
        raise CurateError(f"--seed must be a non-negative integer, got {seed!r}")
    if not isinstance(corrupt, (int, float)) or not 0 <= corrupt < 1:
        raise CurateError(f"--corrupt is the corrupted fraction and must be in [0, 1), got {corrupt!r}")
    if not is_int(target_samples) or target_samples < 0:
        raise CurateError(f"--target-samples must be a non-negative integer, got {target_samples!r}")
    lo, hi = IMAGE_SIZE_RANGE
    if not is_int(image_size) or not lo <= image_size <= hi:
        raise CurateError(f"--image-size must be an integer in [{lo}, {hi}] pixels, got {image_size!r}")


def _check_out_dir(out: Path, parameters: dict) -> None:
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


def make_corpus(out_dir: str | Path, samples: int, shard_size: int = 1000, seed: int = 0, corrupt: float = 0.2,
                target_samples: int = 1000, image_size: int = 64) -> dict:
    """Write the synthetic corpus, its target set and manifest under `out_dir`; return a summary dict
    (out, samples, shards, truth_counts, target_samples, target_shards, seconds)."""
    started = time.perf_counter()
    _validate(samples, shard_size, seed, corrupt, target_samples, image_size)
    out = Path(out_dir)
    parameters = {"samples": int(samples), "shard_size": int(shard_size), "seed": int(seed), "corrupt": float(corrupt),
                  "target_samples": int(target_samples), "image_size": int(image_size)}
    _check_out_dir(out, parameters)
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
        write_tar_atomic(out / name, rows)
        shards.append(name)

    target_shards = []
    class_counts = dict.fromkeys(TARGET_CLASSES, 0)
    if target_samples:
        # Balanced classes in a seeded order.
        classes = np.random.default_rng([seed, _STREAM_TARGET_CLASSES]).permutation(
            np.arange(target_samples) % len(TARGET_CLASSES))
        for shard_index, indices in enumerate(_shard_ranges(target_samples, shard_size)):
            rows = [_target_sample(seed, i, int(classes[i]), image_size) for i in indices]
            name = f"{shard_index:05d}.tar"
            write_tar_atomic(out / "target" / name, rows)
            target_shards.append(name)
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
    return {"out": str(out), "samples": int(samples), "shards": len(shards), "truth_counts": truth_counts,
            "target_samples": int(target_samples), "target_shards": len(target_shards),
            "seconds": time.perf_counter() - started}
