"""`curate synth`: an offline image-caption corpus whose ground truth is known (format curate-synth/2).

No real image-text data and no pretrained CLIP weights reach our machines, so the project makes its own corpus:
small procedural pictures (glyphs of a concept with colour, size, count, style on a textured background of a
tone) with captions that name some of what is drawn, and the phenomena of web data that curation methods answer
(long-tail concepts, captions of every specificity, hard and easy mismatches, duplicates, clones and semantic
twins, a minority target family, target images planted into the pool). Every parameter of that world is in
world.py (`WORLD`, with its changelog); the manifest records its version and digest.

Layout (img2dataset's): OUT/00000.tar, 00001.tar, ... each holding, per sample and in this order, KEY.jpg,
KEY.txt, KEY.json, where KEY is the sample's global index as 9 digits (shard-major order). Tar members are
deterministic: mtime 0, uid/gid 0, empty uname/gname, mode 0o644, USTAR format. The same seed and options give
byte-identical shards.

`.json` fields of every sample (the ground truth):
  uid            32 lowercase hex: sha256(f"{seed}:{index}") (target set: sha256(f"{seed}:target:{index}"))
  key            the member key
  truth          "clean", one of CORRUPTION_KINDS, or "planted"
  family         "target" (one object on a white badge, a target class) or "rest"
  attributes     {concept, colour, size, count, texture, tone, style} of the picture; for noise_image (whose
                 picture is noise) the attributes its caption describes
  labels         multi-hot 0/1 list over WORLD.label_names ("concept:circle", ..., "style:hollow")
  concept_id, concept_rank   the concept's index in WORLD.concepts and its rank (id + 1) in the rest's Zipf law
  semantic_group the id of (family, attributes) (WORLD.semantic_group); null for noise_image
  mentions, specificity      the attributes the caption names and how many (0 for generic)
  caption_attributes         what the caption states, attribute -> value (differs from `attributes` where the
                             caption is wrong)
  caption_from / clone_of / duplicate_of / twin_of / planted_from   the partner's uid (PARTNER_FIELD)
  wrong_attribute            partial_mismatch: the one attribute the caption gets wrong
  planted_copy               planted: "exact" (the target's JPEG bytes) or "near" (shifted, re-encoded)

Kinds: n = floor(F*N + 0.5) samples are corrupted, chosen by a seeded permutation, split over CORRUPTION_KINDS
as evenly as possible (the first n mod 7 kinds get one more; `corruption_counts`); then
round(WORLD.plant_fraction * target samples) of the remaining clean samples are replaced by planted target
images. Partners are clean samples drawn uniformly with replacement.
  swapped           the own picture with the caption of a clean partner that states at least
                    WORLD.swap_min_wrong attributes this picture does not have (best of WORLD.swap_draws draws)
  generic           the own picture with a caption from WORLD.generic_captions
  noise_image       a noise picture with a caption describing the sampled attributes
  partial_mismatch  the own picture with a caption naming >= WORLD.partial_min_mentions attributes, exactly one
                    of them wrong (another value of that attribute)
  clone             the partner's layout with every object moved by 1-2 px, the same attributes named with
                    another template: AdaCL's clone negative, a near duplicate
  duplicate         the partner's exact image bytes and caption under a new uid
  semantic_twin     the partner's family and attributes with a new layout and a new caption
  planted           an image of the target set (exact bytes, or shifted by 1-2 px and re-encoded) with a true
                    caption: what decontamination must find

OUT/target/ holds a separate set of the target family only, classes balanced over WORLD.target_classes, with
OUT/target/classes.json giving the zero-shot prompt templates.

Files: this module holds the options, the result and the kinds (light: the command line imports it); world.py
the world's parameters; entry.py writes the corpus (`run`); captions.py words a caption; render.py draws.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

from curate.config import Check, option
from curate.stages.synth.world import WORLD, world_digest  # noqa: F401 - the world's value, exported here

FORMAT = "curate-synth/2"

CORRUPTION_KINDS = ("swapped", "generic", "noise_image", "partial_mismatch", "clone", "duplicate", "semantic_twin")
PLANTED = "planted"
TRUTH_KINDS = ("clean",) + CORRUPTION_KINDS + (PLANTED,)
# Kinds whose caption does not describe the picture; the redundant kinds are correct pairs that repeat another.
MISMATCHED_KINDS = ("swapped", "generic", "noise_image", "partial_mismatch")
REDUNDANT_KINDS = ("clone", "duplicate", "semantic_twin")
PARTNER_FIELD = {"swapped": "caption_from", "clone": "clone_of", "duplicate": "duplicate_of",
                 "semantic_twin": "twin_of", PLANTED: "planted_from"}
TARGET_TASK = "concept"
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
    target_samples: int = option(1000, "Size of the target set in OUT/target/ (0: none); a share of it is planted "
                                 "into the pool.", "--target-samples",
                                 check=whole_number(0, 2**63, "a non-negative integer"))
    image_size: int = option(64, "Image side in pixels.", "--image-size",
                             check=whole_number(*IMAGE_SIZE_RANGE, f"an integer in [{IMAGE_SIZE_RANGE[0]}, "
                                                f"{IMAGE_SIZE_RANGE[1]}] pixels"))


@dataclass
class SynthResult:
    out: str
    samples: int
    shards: int
    truth_counts: dict[str, int]  # samples per truth kind ("clean", each of CORRUPTION_KINDS, "planted")
    target_samples: int
    target_shards: int
    seconds: float
    families: dict[str, int] = field(default_factory=dict)  # samples per family (target, rest)
    semantic_groups: dict = field(default_factory=dict)  # group sizes (see entry.semantic_group_sizes)
