"""The world of `curate synth` (format curate-synth/2): every parameter of what the corpus contains, in one frozen
value, `WORLD`, fixed before any curation method was run on it.

A parameter changes only with an entry in the changelog below saying why; never to make a method win. The
manifest of every corpus records `WORLD.version` and `world_digest()`, and the tiny teacher's cache key holds the
digest, so a changed world never reuses a teacher trained on the old one.

Phenomena (each recorded per sample in its `.json`; entry.py draws them, render.py draws the pictures):
  long tail      concepts of the rest of the pool follow Zipf(`zipf_exponent`) over `concepts` (listed in rank
                 order: rank 1 is the head); truth `concept_id`, `concept_rank`.
  specificity    a caption names the concept and k - 1 of the other attributes, k uniform in 1..7 (0 for
                 generic captions); truth `mentions` (attribute names), `specificity` (= k).
  mismatches     swapped (another sample's caption), generic, noise_image, and partial_mismatch: a caption
                 naming >= `partial_min_mentions` attributes, exactly one of them wrong; truth `wrong_attribute`.
  redundancy     duplicate (exact bytes), clone (the layout moved by 1-2 px, caption reworded), semantic_twin
                 (same attributes, a new layout and caption); truth `semantic_group` (the same id for every
                 sample whose family and attributes are equal, injected or natural) and the partner's uid.
  target task    the target family, `target_family_fraction` of the pool: one object on a white badge at the
                 centre, its concept uniform over `target_classes`, which are the tail of the rest's Zipf order;
                 OUT/target/ holds a separate set of it, and `plant_fraction` of that set is planted into the pool
                 (truth `planted`, `planted_from` = the target uid) for decontamination.

Changelog (newest last; docs/world.md has the reasons in full):
  2.0  the world of issue "A world where curation matters", fixed before any method ran on it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cached_property


@dataclass(frozen=True)
class World:
    version: str = "2.0"
    # Rank order of the rest of the pool (rank 1 first): the eight target classes are its tail.
    concepts: tuple[str, ...] = (
        "circle", "square", "triangle", "diamond", "cross", "hexagon", "ring", "pentagon",
        "semicircle", "octagon", "trapezoid", "chevron", "rectangle", "drop", "arrow", "oval",
        "star", "heart", "moon", "bolt", "house", "flower", "tree", "hourglass")
    plurals: tuple[tuple[str, str], ...] = (("cross", "crosses"), ("hourglass", "hourglasses"))
    zipf_exponent: float = 1.1
    # Object colours: saturated, far apart in RGB and none grey, so they stand out on both background tones.
    colours: tuple[tuple[str, tuple[int, int, int]], ...] = (
        ("red", (220, 30, 30)), ("orange", (245, 140, 0)), ("yellow", (240, 220, 0)), ("green", (30, 160, 40)),
        ("cyan", (0, 190, 210)), ("blue", (30, 60, 220)), ("purple", (130, 40, 180)), ("pink", (240, 110, 190)),
        ("brown", (140, 85, 35)), ("black", (20, 20, 20)))
    # Object radius as a fraction of the image side (the target family's single object: times target_scale).
    sizes: tuple[tuple[str, float], ...] = (("small", 0.10), ("medium", 0.14), ("large", 0.19))
    counts: tuple[int, ...] = (1, 2, 3, 4)
    textures: tuple[str, ...] = ("plain", "striped", "dotted", "checkered", "wavy")
    # Background grey level range per tone; the texture is drawn `texture_contrast` towards the middle grey.
    tones: tuple[tuple[str, tuple[int, int]], ...] = (("light", (190, 216)), ("dark", (60, 90)))
    styles: tuple[str, ...] = ("solid", "hollow")
    texture_contrast: int = 40
    object_jitter: int = 12  # per-channel jitter of an object's colour, in RGB levels
    rotation_degrees: float = 12.0  # objects are rotated uniformly within +- this

    target_family_fraction: float = 0.12
    target_classes: tuple[str, ...] = ("star", "heart", "moon", "bolt", "house", "flower", "tree", "hourglass")
    target_scale: float = 1.35  # the target family's object is this much larger than its size's radius
    badge_scale: float = 1.45  # radius of the badge behind it, in object radii
    # The badge's colour is the class's cue in the target family (pale, so that every object colour shows on it)
    badge_colours: tuple[tuple[str, tuple[int, int, int]], ...] = (
        ("star", (250, 215, 110)), ("heart", (250, 160, 170)), ("moon", (150, 185, 250)), ("bolt", (165, 230, 160)),
        ("house", (205, 165, 240)), ("flower", (250, 190, 130)), ("tree", (130, 220, 215)),
        ("hourglass", (245, 245, 245)))
    target_centre_jitter: float = 0.05  # the badge's centre moves at most this far from the image centre

    specificity: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7)  # k, drawn uniformly; the concept is always named
    partial_min_mentions: int = 3
    swap_min_wrong: int = 2  # a swapped caption states >= this many attributes the picture does not have
    swap_draws: int = 64
    clone_shift_px: tuple[int, ...] = (1, 2)  # per-axis shift of each object of a clone, in 64-px pixels
    plant_fraction: float = 0.1  # share of the target set planted into the pool
    plant_near_share: float = 0.5  # of the planted, re-rendered with a shift and re-encoded (the rest: exact bytes)
    plant_near_quality: int = 75

    generic_captions: tuple[str, ...] = (
        "an image", "image", "photo", "a photo", "a picture", "picture", "img", "a photograph", "untitled",
        "thumbnail", "view", "an image of something")
    # {np}: the noun phrase ("two small red stars"), {bg}: " on a dark striped background" or "", {be}: is/are
    caption_templates: tuple[str, ...] = (
        "{np}{bg}", "a photo of {np}{bg}", "an image of {np}{bg}", "a drawing of {np}{bg}", "there {be} {np}{bg}")
    zero_shot_templates: tuple[str, ...] = (
        "a {}.", "a photo of a {}.", "an image of a {}.", "a drawing of a {}.", "there is a {}.")

    # ---------------------------------------------------------------- derived vocabulary

    @cached_property
    def attribute_values(self) -> dict[str, tuple]:
        """Attribute -> its values, in the order captions name them and labels list them."""
        return {"concept": self.concepts, "colour": tuple(name for name, _ in self.colours),
                "size": tuple(name for name, _ in self.sizes), "count": self.counts, "texture": self.textures,
                "tone": tuple(name for name, _ in self.tones), "style": self.styles}

    @cached_property
    def label_names(self) -> tuple[str, ...]:
        """The multi-hot label vocabulary: one entry per attribute value ("concept:star", ...)."""
        return tuple(f"{attr}:{value}" for attr, values in self.attribute_values.items() for value in values)

    @cached_property
    def zipf_probabilities(self) -> tuple[float, ...]:
        """p(rank r) ∝ r^-s over the concepts of the rest of the pool (rank r = position r in `concepts`)."""
        weights = [r ** -self.zipf_exponent for r in range(1, len(self.concepts) + 1)]
        total = sum(weights)
        return tuple(w / total for w in weights)

    def plural(self, concept: str) -> str:
        return dict(self.plurals).get(concept, concept + "s")

    def colour_rgb(self, name: str) -> tuple[int, int, int]:
        return dict(self.colours)[name]

    def radius(self, size: str) -> float:
        return dict(self.sizes)[size]

    def badge_rgb(self, concept: str) -> tuple[int, int, int]:
        return dict(self.badge_colours)[concept]

    def tone_range(self, tone: str) -> tuple[int, int]:
        return dict(self.tones)[tone]

    def semantic_group(self, family: str, attributes: dict) -> int:
        """One id per (family, attribute values): the mixed-radix number of their indices, so equal meaning gives
        an equal id in any corpus of this world."""
        group = int(family == "target")
        for attr, values in self.attribute_values.items():
            group = group * len(values) + values.index(attributes[attr])
        return group

    def check(self) -> None:
        """The world's own consistency (a ValueError names what is wrong)."""
        if len(set(self.concepts)) != len(self.concepts):
            raise ValueError("concepts must be distinct")
        tail = self.concepts[len(self.concepts) - len(self.target_classes):]
        if tuple(tail) != self.target_classes:
            raise ValueError("the target classes must be the tail of the concepts' rank order")
        if tuple(name for name, _ in self.badge_colours) != self.target_classes:
            raise ValueError("every target class needs one badge colour, in target_classes order")
        if not 0 < self.target_family_fraction < 1 or not 0 <= self.plant_fraction <= 1:
            raise ValueError("fractions must be in (0, 1)")
        if max(self.specificity) > len(self.attribute_values) or min(self.specificity) < 1:
            raise ValueError("specificity k must be in 1..number of attributes")


WORLD = World()
WORLD.check()


def world_digest(world: World = WORLD) -> str:
    """12 hex digits of the sha256 of every parameter (sorted JSON): what a corpus and a teacher were made in."""
    data = json.dumps(asdict(world), sort_keys=True, default=list)
    return hashlib.sha256(data.encode()).hexdigest()[:12]
