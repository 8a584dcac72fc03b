"""Images drawn here, for built-in datasets that know other things than digits: letters in the font
Pillow ships, filled or outlined shapes, gratings, dot counts. Each ``draw_*`` takes the labels
(N,) and a seeded generator and returns uint8 images (N, 1, 28, 28): the same label sequence and
seed give the same images. Nuisances (pose, size, stroke, contrast, noise) vary within a class, so
that the tasks are not trivial.

Repeatable across CPUs: transcendental functions run in float64 (a last-bit difference between
math libraries would have to fall within ~1e-13 of a rounding boundary to change a uint8 pixel),
angles through ``math``, and glyphs and polygons are rasterized by Pillow's C code (the digests the
tests pin hold for one Pillow: its bundled font and rasterizer draw them).
"""

from __future__ import annotations

import math
from functools import cache, lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 28  # the side of every image (the MNIST family's)
CANVAS = 2 * SIZE  # glyphs and polygons are drawn at twice the size, then box-filtered down

LETTERS = tuple(chr(c) for c in range(ord("A"), ord("Z") + 1))
SHAPES = ("circle", "triangle", "square", "pentagon", "hexagon", "star", "cross", "arrow", "half-disc", "heart")
ORIENTATIONS = (0, 30, 60, 90, 120, 150)  # degrees
FREQUENCIES = {"coarse": 3.0, "medium": 4.5, "fine": 6.5}  # cycles across the image
TEXTURES = tuple(f"{o}deg-{f}" for o in ORIENTATIONS for f in FREQUENCIES)
DOTS = tuple(str(n) for n in range(1, 10))


def _finish(ink: np.ndarray, fg: np.ndarray, bg: np.ndarray, noise: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Coverage ``ink`` (N, H, W) in [0, 1] painted ``fg`` over ``bg`` (N,), plus Gaussian noise of
    standard deviation ``noise`` (N,): uint8 (N, 1, H, W)."""
    img = bg[:, None, None] + ink * (fg - bg)[:, None, None]  # (N, H, W) float64
    img = img + rng.standard_normal(ink.shape) * noise[:, None, None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)[:, None]  # (N, 1, H, W)


def _levels(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image foreground, background and noise: the figure always brighter, contrast varying."""
    bg = rng.uniform(0, 70, n)
    fg = bg + rng.uniform(80, 255 - 70, n)
    return fg, bg, rng.uniform(0, 18, n)


def _from_canvas(canvas: Image.Image) -> np.ndarray:
    return np.frombuffer(canvas.reduce(2).tobytes(), np.uint8).reshape(SIZE, SIZE) / 255.0  # (28, 28) coverage


# -- letters ----------------------------------------------------------------------------------


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font (Pillow >= 10.1)


def _affine(angle: float, shear: float, scale: float, dx: float, dy: float) -> tuple[float, ...]:
    """Pillow's AFFINE data (output pixel -> input pixel) for rotate, shear and scale about the
    image's centre, then shift by (dx, dy)."""
    c, s = math.cos(angle), math.sin(angle)
    a, b = scale * c, scale * (c * shear - s)  # forward 2x2: rotation @ shear @ scale
    d, e = scale * s, scale * (s * shear + c)
    det = a * e - b * d
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det  # its inverse
    mid = SIZE / 2
    ox, oy = mid + dx, mid + dy  # where the centre goes
    return (ia, ib, mid - ia * ox - ib * oy, id_, ie, mid - id_ * ox - ie * oy)


@cache
def _glyph(ch: str, size: int, stroke: int) -> Image.Image:
    """``ch`` drawn centred at twice the size and box-filtered down to 28 x 28 (26 letters x 15 sizes
    x 4 strokes at most: each rendered once)."""
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    ImageDraw.Draw(canvas).text(
        (CANVAS / 2, CANVAS / 2), ch, fill=255, font=_font(size), anchor="mm", stroke_width=stroke, stroke_fill=255
    )
    return canvas.reduce(2)


def _letter(ch: str, size: int, stroke: int, pose: tuple[float, ...]) -> np.ndarray:
    moved = _glyph(ch, size, stroke).transform((SIZE, SIZE), Image.Transform.AFFINE, pose, Image.Resampling.BILINEAR)
    return np.frombuffer(moved.tobytes(), np.uint8).reshape(SIZE, SIZE) / 255.0  # (28, 28) coverage


def draw_letters(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Capital letters (y indexes LETTERS): font size, stroke width, rotation (+-25 deg), shear,
    scale, shift, contrast and noise drawn per image."""
    n = len(y)
    sizes, strokes = rng.integers(30, 45, n), rng.integers(0, 4, n)
    angles, shears = rng.uniform(-25, 25, n) * (math.pi / 180), rng.uniform(-0.3, 0.3, n)
    scales, shifts = rng.uniform(0.8, 1.15, n), rng.uniform(-3, 3, (n, 2))
    ink = np.stack(
        [
            _letter(LETTERS[y[i]], int(sizes[i]), int(strokes[i]), _affine(*map(float, (a, sh, sc, *d))))
            for i, (a, sh, sc, d) in enumerate(zip(angles, shears, scales, shifts, strict=True))
        ]
    )  # (N, 28, 28)
    return _finish(ink, *_levels(n, rng), rng)


# -- shapes -----------------------------------------------------------------------------------


def _ngon(k: int, inner: float | None = None) -> np.ndarray:
    """k points on the unit circle (every other one at radius ``inner`` when given): (k, 2)."""
    t = np.arange(k) * (2 * math.pi / k) - math.pi / 2
    r = np.ones(k) if inner is None else np.where(np.arange(k) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    x, y = 16 * np.sin(t) ** 3, 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, 2.5 - y], axis=1) / 16.5  # (48, 2), point down, about unit size


def _half_disc() -> np.ndarray:
    t = np.linspace(0, math.pi, 25)
    return np.stack([np.cos(t), 0.45 - np.sin(t)], axis=1)  # (25, 2): the arc and its chord


@lru_cache(maxsize=1)
def _outlines() -> tuple[np.ndarray, ...]:
    """Each of SHAPES as a polygon about the origin, about unit radius: (K_i, 2) each."""
    arm = 0.34
    cross = [(arm, -1), (arm, -arm), (1, -arm), (1, arm), (arm, arm), (arm, 1)]
    cross += [(-x, -y) for x, y in cross]
    arrow = [(-1, -0.25), (0.15, -0.25), (0.15, -0.7), (1, 0), (0.15, 0.7), (0.15, 0.25), (-1, 0.25)]
    return (
        _ngon(64),
        _ngon(3),
        _ngon(4),
        _ngon(5),
        _ngon(6),
        _ngon(10, inner=0.45),
        np.array(cross, dtype=np.float64),
        np.array(arrow, dtype=np.float64),
        _half_disc(),
        _heart(),
    )


def _shape(points: np.ndarray, filled: bool, width: int) -> np.ndarray:
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    xy = [(float(x), float(y)) for x, y in points]
    if filled:
        ImageDraw.Draw(canvas).polygon(xy, fill=255)
    else:
        ImageDraw.Draw(canvas).polygon(xy, outline=255, width=width)
    return _from_canvas(canvas)  # (28, 28)


def draw_shapes(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """SHAPES (y indexes them): position, radius, rotation, filled or outlined (line width),
    contrast and noise drawn per image."""
    n, outlines = len(y), _outlines()
    radius, angle = rng.uniform(8, 20, n), rng.uniform(0, 2 * math.pi, n)
    margin = radius + 2
    cx, cy = rng.uniform(margin, CANVAS - margin), rng.uniform(margin, CANVAS - margin)
    filled, width = rng.random(n) < 0.5, rng.integers(2, 6, n)
    ink = []
    for i in range(n):
        c, s = math.cos(float(angle[i])), math.sin(float(angle[i]))
        rot = np.array([[c, s], [-s, c]]) * radius[i]  # (2, 2): rotate, scale (row vectors)
        pts = outlines[y[i]] @ rot + np.array([cx[i], cy[i]])  # (K, 2)
        ink.append(_shape(pts, bool(filled[i]), int(width[i])))
    return _finish(np.stack(ink), *_levels(n, rng), rng)  # (N, 1, 28, 28)


# -- textures ---------------------------------------------------------------------------------


def _grating(theta: np.ndarray, cycles: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """cos gratings (N, 28, 28) of orientation ``theta`` (radians) and ``cycles`` across the image."""
    u = np.arange(SIZE, dtype=np.float64) / SIZE - 0.5  # (28,)
    along = np.cos(theta)[:, None, None] * u[None, None, :] + np.sin(theta)[:, None, None] * u[None, :, None]
    return np.cos(2 * math.pi * cycles[:, None, None] * along + phase[:, None, None])  # (N, 28, 28)


def _aperture(n: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian windows (N, 28, 28) in [0, 1]: centre 8-20 px, sigma 4-12 px, drawn per image."""
    p = np.arange(SIZE, dtype=np.float64) + 0.5
    cx, cy, sigma = rng.uniform(8, 20, n), rng.uniform(8, 20, n), rng.uniform(4, 12, n)
    d2 = (p[None, None, :] - cx[:, None, None]) ** 2 + (p[None, :, None] - cy[:, None, None]) ** 2  # (N, 28, 28)
    return np.exp(-d2 / (2 * sigma[:, None, None] ** 2))


def draw_textures(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gratings (y indexes TEXTURES: orientation x frequency) seen through a Gaussian window of
    random place and size: orientation jittered +-10 deg, frequency +-13 %, random phase, a
    sine-to-square waveform, a weaker distractor grating of any orientation and frequency,
    contrast and noise."""
    n = len(y)
    deg = np.array(ORIENTATIONS, dtype=np.float64)[y // len(FREQUENCIES)] + rng.uniform(-10, 10, n)
    cycles = np.array(list(FREQUENCIES.values()))[y % len(FREQUENCIES)] * rng.uniform(0.87, 1.13, n)
    wave = _grating(deg * (math.pi / 180), cycles, rng.uniform(0, 2 * math.pi, n))  # (N, 28, 28) in [-1, 1]
    sharp = rng.uniform(0.5, 4, n)[:, None, None]
    wave = np.tanh(sharp * wave) / np.tanh(sharp)  # sine (soft) to nearly square (sharp)
    other = _grating(rng.uniform(0, math.pi, n), rng.uniform(1.5, 8, n), rng.uniform(0, 2 * math.pi, n))
    mix = wave + rng.uniform(0, 0.7, n)[:, None, None] * other  # (N, 28, 28)
    ink = 0.5 + 0.5 * _aperture(n, rng) * mix / np.abs(mix).max(axis=(1, 2), keepdims=True)  # (N, 28, 28) in [0, 1]
    return _finish(ink, *_levels(n, rng), rng)


# -- dots -------------------------------------------------------------------------------------

GRID = 4  # dots sit in distinct cells of a GRID x GRID grid, so that they never overlap
CELL = SIZE / GRID


def _discs(cx: np.ndarray, cy: np.ndarray, r: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Anti-aliased discs: centres, radii and brightness (0: not drawn) (N, D); coverage (N, 28, 28)."""
    p = np.arange(SIZE, dtype=np.float64) + 0.5  # pixel centres
    dist = np.sqrt(
        (p[None, None, None, :] - cx[..., None, None]) ** 2 + (p[None, None, :, None] - cy[..., None, None]) ** 2
    )
    cover = np.clip(r[..., None, None] + 0.5 - dist, 0, 1) * weight[..., None, None]  # (N, D, 28, 28)
    return cover.max(axis=1)


def draw_dots(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """1-9 dots (y indexes DOTS): cells, radii (1.2-2.8 px), positions within the cell, brightness
    per dot, contrast and noise drawn per image; dots never touch."""
    n, most = len(y), len(DOTS)
    cells = rng.random((n, GRID * GRID)).argsort(axis=1)[:, :most]  # (N, 9) distinct cells
    r = rng.uniform(1.2, 2.8, (n, most))
    room = CELL / 2 - r - 0.5  # (N, 9) how far a dot may leave its cell's centre
    cx = (cells % GRID + 0.5) * CELL + rng.uniform(-1, 1, (n, most)) * room
    cy = (cells // GRID + 0.5) * CELL + rng.uniform(-1, 1, (n, most)) * room
    on = np.arange(most)[None, :] <= y[:, None]  # (N, 9): the first y + 1 dots
    weight = on * rng.uniform(0.6, 1.0, (n, most))  # (N, 9)
    chunks = [slice(i, i + 512) for i in range(0, n, 512)]  # (512, 9, 28, 28) float64 at a time
    ink = np.concatenate([_discs(cx[c], cy[c], r[c], weight[c]) for c in chunks])  # (N, 28, 28)
    return _finish(ink, *_levels(n, rng), rng)
