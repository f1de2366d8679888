"""Drawing for `curate synth`: a `Picture` (a concept, an exact layout, a background) -> deterministic PIL image.

Everything here is a pure function of its arguments: no randomness, no I/O. Coordinates in a `Picture` are
fractions of the image side, so the same layout renders at any `--image-size`. Shapes are drawn on a canvas twice
the output size and box-filtered down, which anti-aliases edges so that small glyphs still read at 64 px.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 2
JPEG_QUALITY = 90
# 4:4:4 chroma: at 64 px the default 4:2:0 subsampling smears the colour of small shapes.
JPEG_SUBSAMPLING = 0
# How far a glyph reaches beyond its radius (star tips, house corners), as a factor; layouts keep
# centre +- EXTENT * radius inside the image and inside their grid cell.
SHAPE_EXTENT = 1.12
ROUND_POINTS = 48  # vertices of the round glyphs' polygons


@dataclass(frozen=True)
class PlacedObject:
    """One glyph: centre (cx, cy) and radius as fractions of the image side, rotation in degrees, fill colour as
    RGB (the named colour with a small per-object jitter)."""

    cx: float
    cy: float
    radius: float
    rotation: float
    fill: tuple[int, int, int]


@dataclass(frozen=True)
class Background:
    """Background grey level and texture geometry (`period` and `phase` are fractions of the side; `orientation`
    is used by stripes and waves: 0 horizontal, 1 vertical, 2 diagonal); `ink` is the texture's grey level."""

    texture: str
    grey: int
    ink: int
    period: float
    phase: float
    orientation: int


@dataclass(frozen=True)
class Badge:
    """The target family's pale disc behind its object (centre and radius as fractions of the side)."""

    cx: float
    cy: float
    radius: float
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Picture:
    concept: str
    style: str  # solid or hollow
    objects: tuple[PlacedObject, ...]
    background: Background
    badge: Badge | None = None


def _round(rx: float, ry: float, cy: float = 0.0, start: float = 0.0, stop: float = 360.0,
           n: int = ROUND_POINTS) -> list[tuple[float, float]]:
    """Points of an elliptic arc (degrees, y down), both ends included."""
    return [(rx * math.cos(math.radians(a)), cy + ry * math.sin(math.radians(a)))
            for a in np.linspace(start, stop, n, endpoint=stop - start < 360.0)]


def _regular(sides: int, radius: float, offset_deg: float) -> list[tuple[float, float]]:
    return [(radius * math.cos(math.radians(offset_deg + 360.0 * k / sides)),
             radius * math.sin(math.radians(offset_deg + 360.0 * k / sides))) for k in range(sides)]


def _crescent() -> list[tuple[float, float]]:
    """Outer unit circle minus a circle of radius 0.85 centred at (0.5, 0), moved right to centre it."""
    outer = _round(1.0, 1.0, start=58.2, stop=301.8, n=36)
    inner = [(0.5 + 0.85 * math.cos(math.radians(a)), 0.85 * math.sin(math.radians(a)))
             for a in np.linspace(271.9, 88.1, 30)]
    return [(x + 0.2, y) for x, y in outer + inner]


def _heart() -> list[tuple[float, float]]:
    pts = []
    for t in np.linspace(0.0, 2 * math.pi, 60, endpoint=False):
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        pts.append((x / 16.0, (y + 2.5) / 15.0))
    return pts


def _flower() -> list[tuple[float, float]]:
    pts = []
    for t in np.linspace(0.0, 2 * math.pi, 90, endpoint=False):
        r = 0.62 + 0.42 * math.cos(5 * t)
        pts.append((r * math.cos(t - math.pi / 2), r * math.sin(t - math.pi / 2)))
    return pts


def _drop() -> list[tuple[float, float]]:
    return [(0.0, -1.05)] + _round(0.68, 0.68, cy=0.3, start=-20.0, stop=200.0, n=40)


# Unit glyphs: radius 1, centred on (0, 0), y pointing down. The ring is drawn as a thick circle (render_picture).
GLYPHS: dict[str, list[tuple[float, float]]] = {
    "circle": _round(1.0, 1.0),
    "square": [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)],
    "triangle": [(1.08 * math.cos(math.radians(a)), 1.08 * math.sin(math.radians(a)) + 0.1) for a in (-90, 30, 150)],
    "diamond": [(0.0, -1.05), (0.72, 0.0), (0.0, 1.05), (-0.72, 0.0)],
    "cross": [(-0.34, -1), (0.34, -1), (0.34, -0.34), (1, -0.34), (1, 0.34), (0.34, 0.34), (0.34, 1), (-0.34, 1),
              (-0.34, 0.34), (-1, 0.34), (-1, -0.34), (-0.34, -0.34)],
    "hexagon": _regular(6, 1.0, 0.0),
    "ring": _round(1.0, 1.0),
    "pentagon": _regular(5, 1.05, -90.0),
    "semicircle": _round(1.05, 1.05, cy=0.45, start=180.0, stop=360.0, n=30),
    "octagon": _regular(8, 1.0, 22.5),
    "trapezoid": [(-0.55, -0.6), (0.55, -0.6), (1.0, 0.6), (-1.0, 0.6)],
    "chevron": [(-1.0, -0.6), (0.0, 0.2), (1.0, -0.6), (1.0, 0.1), (0.0, 0.9), (-1.0, 0.1)],
    "rectangle": [(-1.05, -0.5), (1.05, -0.5), (1.05, 0.5), (-1.05, 0.5)],
    "drop": _drop(),
    "arrow": [(-1.0, -0.25), (0.2, -0.25), (0.2, -0.65), (1.05, 0.0), (0.2, 0.65), (0.2, 0.25), (-1.0, 0.25)],
    "oval": _round(1.05, 0.6),
    "star": [((1.1 if k % 2 == 0 else 0.45) * math.cos(math.radians(-90 + 36 * k)),
              (1.1 if k % 2 == 0 else 0.45) * math.sin(math.radians(-90 + 36 * k)) + 0.08) for k in range(10)],
    "heart": _heart(),
    "moon": _crescent(),
    "bolt": [(0.2, -1.05), (-0.6, 0.15), (-0.05, 0.15), (-0.3, 1.05), (0.6, -0.2), (0.08, -0.2), (0.5, -1.05)],
    "house": [(-0.8, 1.0), (-0.8, -0.1), (0.0, -0.95), (0.8, -0.1), (0.8, 1.0)],
    "flower": _flower(),
    "tree": [(0.0, -1.05), (0.78, 0.35), (0.16, 0.35), (0.16, 1.0), (-0.16, 1.0), (-0.16, 0.35), (-0.78, 0.35)],
    "hourglass": [(-0.75, -1.0), (0.75, -1.0), (0.1, 0.0), (0.75, 1.0), (-0.75, 1.0), (-0.1, 0.0)],
}


def glyph_points(concept: str, cx: float, cy: float, r: float, rotation_deg: float) -> list[tuple[float, float]]:
    """Polygon vertices of a glyph centred at (cx, cy) with radius r (pixels), rotated clockwise."""
    if concept not in GLYPHS:
        raise ValueError(f"no glyph for concept {concept!r}")
    c, s = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in GLYPHS[concept]]


def _draw_texture(draw: ImageDraw.ImageDraw, bg: Background, side: int) -> None:
    ink = (bg.ink,) * 3
    period = bg.period * side
    offset = bg.phase * side
    if bg.texture == "plain":
        return
    if bg.texture == "striped":
        width = period / 2
        steps = int(2 * side / period) + 2
        for k in range(-steps, steps + 1):
            p = offset + k * period
            if bg.orientation == 0:
                draw.rectangle([0, p, side, p + width - 1], fill=ink)
            elif bg.orientation == 1:
                draw.rectangle([p, 0, p + width - 1, side], fill=ink)
            else:
                # a diagonal band between x + y = p and x + y = p + 2·width·cos 45°: the straight stripes' width
                q = p + 2 * width * 0.7071
                draw.polygon([(p, 0), (q, 0), (q - side, side), (p - side, side)], fill=ink)
    elif bg.texture == "dotted":
        dot = max(period * 0.28, 2.0)
        n = int(side / period) + 2
        for i in range(-1, n):
            for j in range(-1, n):
                x, y = offset + i * period, offset + j * period
                draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=ink)
    elif bg.texture == "checkered":
        n = int(side / period) + 2
        for i in range(-1, n):
            for j in range(-1, n):
                if (i + j) % 2 == 0:
                    x, y = offset + i * period, offset + j * period
                    draw.rectangle([x, y, x + period - 1, y + period - 1], fill=ink)
    elif bg.texture == "wavy":
        amplitude, width = period * 0.3, max(int(period * 0.22), 2)
        xs = np.linspace(0, side, 33)
        for k in range(-1, int(side / period) + 2):
            base = offset + k * period
            line = [(x, base + amplitude * math.sin(2 * math.pi * x / (2 * period))) for x in xs]
            if bg.orientation == 1:
                line = [(y, x) for x, y in line]
            draw.line(line, fill=ink, width=width)
    else:
        raise ValueError(f"unknown texture {bg.texture!r}")


def render_picture(picture: Picture, image_size: int) -> Image.Image:
    """Draw `picture` as an RGB image of image_size x image_size pixels (deterministic)."""
    side = image_size * SUPERSAMPLE
    bg = picture.background
    img = Image.new("RGB", (side, side), (bg.grey,) * 3)
    draw = ImageDraw.Draw(img)
    _draw_texture(draw, bg, side)
    if picture.badge is not None:
        b = picture.badge
        cx, cy, r = b.cx * side, b.cy * side, b.radius * side
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=b.rgb)
    for obj in picture.objects:
        cx, cy, r = obj.cx * side, obj.cy * side, obj.radius * side
        # a darker rim of the fill colour: a clear edge on any background without a new colour
        rim = tuple(int(v * 0.55) for v in obj.fill)
        pts = glyph_points(picture.concept, cx, cy, r, obj.rotation)
        if picture.concept == "ring":
            thick = max(0.36 * r, 2.0) if picture.style == "solid" else max(0.16 * r, 2.0)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=obj.fill, width=int(round(thick)))
        elif picture.style == "solid":
            draw.polygon(pts, fill=obj.fill, outline=rim, width=SUPERSAMPLE)
        else:
            draw.line(pts + pts[:1], fill=obj.fill, width=int(round(max(0.2 * r, 2.0))), joint="curve")
    return img.reduce(SUPERSAMPLE)


def render_noise(rng: np.random.Generator, image_size: int) -> Image.Image:
    """A picture of pure noise: a coarse random colour field (bilinear) plus per-pixel Gaussian noise, so it has
    image-like blobs but no glyph, no texture and no grey background."""
    cells = int(rng.integers(3, 9))
    coarse = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse, "RGB").resize((image_size, image_size), Image.BILINEAR),
                       dtype=np.float32)
    field += rng.normal(0.0, 28.0, size=field.shape).astype(np.float32)
    return Image.fromarray(np.clip(field, 0, 255).astype(np.uint8), "RGB")


def encode_jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes with fixed settings (quality, chroma subsampling, no optimisation pass), so the same image
    always gives the same bytes."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, subsampling=JPEG_SUBSAMPLING, optimize=False)
    return buf.getvalue()
