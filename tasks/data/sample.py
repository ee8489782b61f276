"""Built-in procedural sample ("shapes"): labelled images with exact foreground masks, no downloads.

The class is the *shape* (circle, square, triangle, star, ring, cross). Everything else is drawn
independently of the class: object and background grey levels, background gradient and noise, position,
rotation and scale (object area 16-36 % of the image for every class). A randomly initialised CNN gives
close-to-chance kNN accuracy on it; MoCo v2 has to learn shape and pose to tell the images apart, and
its kNN accuracy climbs well above random init within the quickstart's few hundred steps.

Why grey levels (v3): with uniformly random colours (v1/v2) colour is by far the cheapest cue for
instance discrimination -- MoCo v2's hue jitter of 0.1 leaves it intact -- so a few hundred MoCo steps
learned colour, not shape, and kNN on shape stayed at chance. Colour is also what a random CNN encodes,
so it is the one nuisance that must not identify an image. (Measured on 1200 images, 48 px, resnet10t,
400 steps, crop scale 0.6-1, kNN top-1 before -> after: v2 colours 0.18 -> 0.18, grey levels 0.21 -> 0.49.)

Each image ``idx`` is generated from its own RNG seeded by (seed, idx), so image ``idx`` is identical
for every ``n``; classes are assigned round-robin (balanced).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
_SUPERSAMPLE = 4
# Object pixel area / image area, drawn from the same range for every class so that size is no class
# cue (the object's bounding box then covers roughly 15-60 % of the image); radii are capped to fit.
_MIN_AREA, _MAX_AREA = 0.16, 0.36
_MAX_RADIUS = 0.48  # circumradius / image side
_RING_INNER = 0.55


def _unit_polygon(name: str) -> np.ndarray:
    """Outline of a shape with circumradius 1, centred at the origin, as (K, 2)."""
    if name in ("circle", "ring"):
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if name == "square":
        t = np.pi / 4 + np.arange(4) * np.pi / 2
        return np.stack([np.cos(t), np.sin(t)], 1)
    if name == "triangle":
        t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(t), np.sin(t)], 1)
    if name == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.5)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if name == "cross":
        h = 0.34  # arm half-width; arm tips (L, h) lie on the unit circle
        L = float(np.sqrt(1 - h * h))
        pts = [(h, L), (h, h), (L, h), (L, -h), (h, -h), (h, -L),
               (-h, -L), (-h, -h), (-L, -h), (-L, h), (-h, h), (-h, L)]
        return np.asarray(pts, dtype=np.float64)
    raise ValueError(f"unknown shape {name!r}")


_POLYGONS = {name: _unit_polygon(name) for name in CLASSES}


def _polygon_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


# area of each shape at circumradius 1
_UNIT_AREA = {name: _polygon_area(p) * ((1 - _RING_INNER**2) if name == "ring" else 1.0) for name, p in _POLYGONS.items()}


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A grey level as an RGB triple (see the module docstring for why not a colour)."""
    return np.full(3, rng.uniform(0, 255))


def _background(rng: np.random.Generator, res: int) -> np.ndarray:
    """Float (res, res, 3) background in [0, 255]: a grey level with a gentle, faintly tinted gradient and noise.

    Deliberately low in information: with busy textured backgrounds (tried first) the background holds most
    of an image's pixels and its unique texture, so instance discrimination (MoCo) learns to tell images
    apart by their backgrounds -- which says nothing about the shape class -- and kNN after a few hundred
    steps fell below random init. With a quiet background the object is what makes an image unique.
    """
    c1 = _random_colour(rng)
    c2 = np.clip(c1 + rng.uniform(-40, 40, size=3), 0, 255)
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float64) / max(res - 1, 1)
    a = rng.uniform(0, 2 * np.pi)
    t = (np.cos(a) * (xx - 0.5) + np.sin(a) * (yy - 0.5)) / np.sqrt(0.5) + 0.5
    img = c1 + np.clip(t, 0, 1)[..., None] * (c2 - c1) + rng.normal(0, 3, (res, res, 3))
    return np.clip(img, 0, 255)


def _foreground_colour(rng: np.random.Generator, bg: np.ndarray) -> np.ndarray:
    """A random grey level that stays visibly different from the mean background."""
    mean = bg.reshape(-1, 3).mean(0)
    best, best_d = None, -1.0
    for _ in range(16):
        c = _random_colour(rng)
        d = float(np.linalg.norm(c - mean))
        if d > 110:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _alpha(rng: np.random.Generator, name: str, res: int) -> np.ndarray:
    """Anti-aliased coverage (res, res) in [0, 1] of a randomly placed/rotated/scaled shape."""
    s = res * _SUPERSAMPLE
    area = rng.uniform(_MIN_AREA, _MAX_AREA)
    radius = s * min(np.sqrt(area / _UNIT_AREA[name]), _MAX_RADIUS)
    cx = rng.uniform(radius, s - radius)
    cy = rng.uniform(radius, s - radius)
    theta = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    canvas = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(canvas)
    pts = _POLYGONS[name] @ rot.T * radius + (cx, cy)
    draw.polygon([tuple(p) for p in pts], fill=255)
    if name == "ring":
        inner = _POLYGONS[name] * radius * _RING_INNER + (cx, cy)
        draw.polygon([tuple(p) for p in inner], fill=0)
    small = canvas.resize((res, res), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def _one(idx: int, res: int, seed: int) -> dict:
    name = CLASSES[idx % len(CLASSES)]
    rng = np.random.default_rng([int(seed), int(idx)])
    bg = _background(rng, res)
    fg_colour = _foreground_colour(rng, bg)
    fg = fg_colour + rng.normal(0, rng.uniform(2, 12), (res, res, 3))
    # mild shading across the object so it is not perfectly flat
    yy, xx = np.mgrid[0:res, 0:res] / max(res - 1, 1)
    fg = fg + (rng.uniform(-30, 30) * (xx - 0.5) + rng.uniform(-30, 30) * (yy - 0.5))[..., None]
    alpha = _alpha(rng, name, res)
    img = bg * (1 - alpha[..., None]) + np.clip(fg, 0, 255) * alpha[..., None]
    return {
        "class": name,
        "image": np.clip(np.rint(img), 0, 255).astype(np.uint8),
        "mask": (alpha >= 0.5).astype(np.uint8),
        "name": f"{name}/{idx:05d}.png",
    }


def generate_sample(n: int, resolution: int = 64, seed: int = 0) -> list[dict]:
    """``n`` labelled images: {"class", "image" uint8 HxWx3, "mask" uint8 HxW (1 = fg), "name"}."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8, got {resolution}")
    return [_one(i, int(resolution), int(seed)) for i in range(int(n))]


def _params(n: int, resolution: int, seed: int) -> dict:
    return {"generator": "shapes-v3", "n": int(n), "resolution": int(resolution), "seed": int(seed)}


def _is_done(folder: str, params: dict) -> bool:
    try:
        with open(os.path.join(folder, "DONE")) as fh:
            return json.load(fh) == params
    except (OSError, ValueError):
        return False


def write_sample(folder: str, n: int, resolution: int = 64, seed: int = 0) -> str:
    """Write ``images/<class>/<idx:05d>.png`` and ``masks/<class>/<idx:05d>.png`` (0/255) under folder.

    Idempotent: returns at once when ``folder/DONE`` records the same parameters. Otherwise the sample
    is written into a temporary sibling folder and renamed into place (replacing stale content).
    """
    folder = os.path.abspath(os.fspath(folder))
    params = _params(n, resolution, seed)
    if _is_done(folder, params):
        return folder
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-", dir=parent)
    try:
        for rec in generate_sample(n, resolution, seed):
            for sub, arr in (("images", rec["image"]), ("masks", rec["mask"] * 255)):
                path = os.path.join(tmp, sub, rec["name"])
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(arr).save(path, format="PNG", compress_level=1)
        with open(os.path.join(tmp, "DONE"), "w") as fh:
            json.dump(params, fh)
        if os.path.lexists(folder):
            if _is_done(folder, params):  # a concurrent writer finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return folder
            stale = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.old-", dir=parent)
            os.replace(folder, os.path.join(stale, "old"))
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _is_done(folder, params):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
