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

Files: this module holds the options, the result and the corpus's vocabulary (light: the command line imports
it); entry.py writes the corpus (`run`); render.py draws the pictures.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from curate.config import Check, option

# Object colours: saturated and far apart in RGB, and none of them grey, so that they never blend
# into the grey backgrounds (render.py).
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 0),
    "yellow": (240, 220, 0),
    "green": (30, 160, 40),
    "cyan": (0, 190, 210),
    "blue": (30, 60, 220),
    "purple": (130, 40, 180),
    "pink": (240, 110, 190),
}
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


def whole_number(low: int, high: int, what: str) -> Check:
    """An integer in [low, high] (`what` says why the bounds)."""
    def check(value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
            return f"must be {what}"
        return None
    return check


def corrupted_fraction(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        return "is the corrupted fraction and must be in [0, 1)"
    return None


@dataclass(frozen=True)
class SynthConfig:
    samples: int = option(2000, "Number of image-caption pairs in the main corpus.",
                          check=whole_number(1, 10**9 - 1, "a positive integer (keys have 9 digits, so at most "
                                             "999,999,999 samples)"))
    shard_size: int = option(1000, "Samples per tar shard.", "--shard-size",
                             check=whole_number(1, 2**63, "a positive integer"))
    seed: int = option(0, "Seed; the same seed gives byte-identical shards.",
                       check=whole_number(0, 2**63, "a non-negative integer"))
    corrupt: float = option(0.2, "Fraction of corrupted samples, in [0, 1).", check=corrupted_fraction)
    target_samples: int = option(1000, "Size of the target set in OUT/target/ (0: none).", "--target-samples",
                                 check=whole_number(0, 2**63, "a non-negative integer"))
    image_size: int = option(64, "Image side in pixels.", "--image-size",
                             check=whole_number(*IMAGE_SIZE_RANGE, f"an integer in [{IMAGE_SIZE_RANGE[0]}, "
                                                f"{IMAGE_SIZE_RANGE[1]}] pixels"))


@dataclass
class SynthResult:
    out: str
    samples: int
    shards: int
    truth_counts: dict[str, int]  # samples per truth kind ("clean" and each of CORRUPTION_KINDS)
    target_samples: int
    target_shards: int
    seconds: float
