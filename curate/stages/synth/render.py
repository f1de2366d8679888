"""Drawing for `curate synth`: a `Picture` (attributes plus an exact layout) -> deterministic PIL image.

Everything here is a pure function of its arguments: no randomness, no I/O. Coordinates in a `Picture`
are fractions of the image side, so the same layout renders at any `--image-size`. Shapes are drawn on
a canvas twice the output size and box-filtered down, which anti-aliases edges so that small shapes
still read as circles, stars or crosses at 64 px.
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

# The texture pattern is drawn this much darker than the background's grey level.
TEXTURE_CONTRAST = 45
# How far the drawn shape reaches beyond its radius (star tips, rotated square corners), as a factor;
# layouts keep centre +- EXTENT * radius inside the image and inside their grid cell.
SHAPE_EXTENT = 1.12


@dataclass(frozen=True)
class PlacedObject:
    """One shape: centre (cx, cy) and radius as fractions of the image side, rotation in degrees,
    fill colour as RGB (the named colour with a small per-object jitter)."""

    cx: float
    cy: float
    radius: float
    rotation: float
    fill: tuple[int, int, int]


@dataclass(frozen=True)
class Background:
    """Background grey level and texture geometry (`period` and `phase` are fractions of the side;
    `orientation` is used by stripes: 0 horizontal, 1 vertical, 2 diagonal)."""

    texture: str
    grey: int
    period: float
    phase: float
    orientation: int


@dataclass(frozen=True)
class Picture:
    shape: str
    objects: tuple[PlacedObject, ...]
    background: Background


def shape_points(shape: str, cx: float, cy: float, r: float, rotation_deg: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape centred at (cx, cy) with radius r (pixels), rotated clockwise."""
    if shape == "square":
        h = 0.82 * r
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "diamond":
        pts = [(0.0, -1.05 * r), (0.72 * r, 0.0), (0.0, 1.05 * r), (-0.72 * r, 0.0)]
    elif shape == "triangle":
        # Equilateral, pointing up, centroid on the centre.
        pts = [(1.08 * r * math.cos(math.radians(a)), 1.08 * r * math.sin(math.radians(a))) for a in (-90, 30, 150)]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = 1.1 * r if k % 2 == 0 else 0.45 * r
            a = math.radians(-90 + 36 * k)
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif shape == "cross":
        a = 0.34 * r
        pts = [(-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r), (-a, r), (-a, a), (-r, a), (-r, -a), (-a, -a)]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    c, s = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _draw_background(draw: ImageDraw.ImageDraw, bg: Background, side: int) -> None:
    ink = (bg.grey - TEXTURE_CONTRAST,) * 3
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
                # A diagonal band: the parallelogram between x + y = p and x + y = p + 2*width
                # (2*width on the x+y axis gives the same perpendicular width as the straight stripes).
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
    else:
        raise ValueError(f"unknown texture {bg.texture!r}")


def render_picture(picture: Picture, image_size: int) -> Image.Image:
    """Draw `picture` as an RGB image of image_size x image_size pixels (deterministic)."""
    side = image_size * SUPERSAMPLE
    bg = picture.background
    img = Image.new("RGB", (side, side), (bg.grey,) * 3)
    draw = ImageDraw.Draw(img)
    _draw_background(draw, bg, side)
    outline_width = SUPERSAMPLE
    for obj in picture.objects:
        cx, cy, r = obj.cx * side, obj.cy * side, obj.radius * side
        # A darker rim of the fill colour: a clear edge against any background without a new colour.
        outline = tuple(int(v * 0.55) for v in obj.fill)
        if picture.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=obj.fill, outline=outline, width=outline_width)
        else:
            pts = shape_points(picture.shape, cx, cy, r, obj.rotation)
            draw.polygon(pts, fill=obj.fill, outline=outline, width=outline_width)
    return img.reduce(SUPERSAMPLE)


def render_noise(rng: np.random.Generator, image_size: int) -> Image.Image:
    """A picture of pure noise: a coarse random colour field (bilinear) plus per-pixel Gaussian noise,
    so it has image-like blobs but no shape, no texture and no grey background."""
    cells = int(rng.integers(3, 9))
    coarse = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse, "RGB").resize((image_size, image_size), Image.BILINEAR), dtype=np.float32)
    field += rng.normal(0.0, 28.0, size=field.shape).astype(np.float32)
    return Image.fromarray(np.clip(field, 0, 255).astype(np.uint8), "RGB")


def encode_jpeg(img: Image.Image) -> bytes:
    """JPEG bytes with fixed settings (quality, chroma subsampling, no optimisation pass), so the
    same image always gives the same bytes."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING, optimize=False)
    return buf.getvalue()
