"""Labelled segmentation splits (image + class-id mask) from a ``manifest.csv``, and paired augmentation.

The manifest has the columns ``image,mask,split``; paths are relative to the dataset root (CamVid in
``../shared/data/camvid``: 11 classes 0..10, value 11 = void). Images are decoded to RGB (some CamVid JPEGs
are grayscale) and resized bilinearly; masks are read as class ids (8-bit ``L``/``P`` PNGs, never through a
colour conversion) and resized with nearest neighbour, so no new class ids appear at region borders.

A missing root or manifest raises; one unreadable image or mask is reported with its reason and skipped.
"""
from __future__ import annotations

import csv
import os
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageEnhance

IGNORE_INDEX = 255
CAMVID_CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "sign", "fence", "car", "pedestrian",
                  "bicyclist")
_MASK_MODES = {"L", "P", "I", "I;16", "I;16B", "I;16L", "1"}


class SegmentationSplit(NamedTuple):
    images: np.ndarray            # uint8 [N, H, W, 3], RGB
    masks: np.ndarray             # uint8 [N, H, W], class ids, ``ignore_index`` for ignored pixels
    names: list[str]              # manifest ``image`` path of each loaded pair
    skipped: list[tuple[str, str]]  # (manifest image path, reason) of each pair not loaded


def hw_size(size: int | Sequence[int]) -> tuple[int, int]:
    """``S`` -> ``(S, S)``; ``(H, W)`` -> ``(H, W)``."""
    if isinstance(size, int):
        return size, size
    h, w = (int(s) for s in size)
    return h, w


def read_manifest(root: str, manifest: str = "manifest.csv") -> list[dict[str, str]]:
    """Rows of ``root/manifest`` as dicts; raises naming the missing root, file or columns."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"segmentation dataset root {root!r} does not exist or is not a folder")
    path = os.path.join(root, manifest)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"segmentation manifest {path!r} not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"image", "mask", "split"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"manifest {path!r} lacks the column(s) {sorted(missing)} (has {reader.fieldnames})")
        return list(reader)


def _load_pair(root: str, row: dict[str, str], hw: tuple[int, int], ignore_values: Sequence[int],
               ignore_index: int, num_classes: int | None) -> tuple[np.ndarray, np.ndarray]:
    h, w = hw
    with Image.open(os.path.join(root, row["image"])) as im:
        im = im.convert("RGB")
        size = im.size
        image = np.asarray(im.resize((w, h), Image.BILINEAR) if im.size != (w, h) else im, dtype=np.uint8)
    with Image.open(os.path.join(root, row["mask"])) as m:
        if m.mode not in _MASK_MODES:
            raise ValueError(f"mask mode {m.mode} is not single-channel class ids")
        if m.size != size:
            raise ValueError(f"mask is {m.size[0]}x{m.size[1]} but the image is {size[0]}x{size[1]}")
        ids = np.asarray(m)
        if ids.max(initial=0) > 255:
            raise ValueError(f"mask value {int(ids.max())} does not fit uint8")
    ids = ids.astype(np.uint8)  # a copy: PIL's buffer stays read-only
    if len(ignore_values):
        ids[np.isin(ids, np.asarray(ignore_values, dtype=np.uint8))] = ignore_index
    if num_classes is not None:  # checked at full resolution, before resizing can drop a stray pixel
        bad = np.unique(ids[(ids >= num_classes) & (ids != ignore_index)])
        if bad.size:
            raise ValueError(f"mask values {bad.tolist()} are outside 0..{num_classes - 1} and not ignored")
    if ids.shape != (h, w):
        ids = np.asarray(Image.fromarray(ids).resize((w, h), Image.NEAREST), dtype=np.uint8)
    return image, ids


def load_segmentation_split(root: str, split: str, size: int | Sequence[int], limit: int | None = None, *,
                            ignore_values: Sequence[int] = (11,), ignore_index: int = IGNORE_INDEX,
                            num_classes: int | None = None, manifest: str = "manifest.csv") -> SegmentationSplit:
    """The ``split`` rows of ``root/manifest`` -> images uint8 ``[N, H, W, 3]`` and masks uint8 ``[N, H, W]``.

    ``size`` is ``S`` (square ``S x S``) or ``(H, W)``; the whole frame is resized, without cropping, so a
    480x360 CamVid frame at ``S x S`` is stretched vertically. Mask values in ``ignore_values`` (CamVid's void
    11) become ``ignore_index``; with ``num_classes`` a mask holding any other value ``>= num_classes`` is
    skipped as bad data. ``limit`` stops after that many pairs loaded (manifest order). A pair whose image
    or mask is missing or unreadable is recorded in ``skipped`` as ``(image path, reason)``.
    """
    rows = read_manifest(root, manifest)
    chosen = [r for r in rows if r["split"] == split]
    if not chosen:
        raise ValueError(f"manifest {os.path.join(root, manifest)!r} has no {split!r} rows "
                         f"(splits: {sorted({r['split'] for r in rows})})")
    hw = hw_size(size)
    images, masks, names, skipped = [], [], [], []
    for row in chosen:
        if limit is not None and len(images) >= limit:
            break
        try:
            image, mask = _load_pair(root, row, hw, ignore_values, ignore_index, num_classes)
        except Exception as err:  # one bad file must not end the evaluation; it is reported instead
            skipped.append((row["image"], f"{type(err).__name__}: {err}"))
            continue
        images.append(image)
        masks.append(mask)
        names.append(row["image"])
    h, w = hw
    return SegmentationSplit(np.stack(images) if images else np.zeros((0, h, w, 3), np.uint8),
                             np.stack(masks) if masks else np.zeros((0, h, w), np.uint8), names, skipped)


# -- paired augmentation for the Hummingbird memory (METHODS.md 8.4 step 1)

def _crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
              rng: np.random.Generator) -> tuple[int, int, int, int]:
    area = width * height
    for _ in range(10):
        a = area * rng.uniform(*scale)
        r = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        w, h = int(round(np.sqrt(a * r))), int(round(np.sqrt(a / r)))
        if 0 < w <= width and 0 < h <= height:
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return x, y, x + w, y + h
    return 0, 0, width, height  # no sampled box fits (e.g. a scale above 1): the whole frame


def _jitter(im: Image.Image, strength: float, p: float, rng: np.random.Generator) -> Image.Image:
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        if rng.random() < p:
            im = enhance(im).enhance(rng.uniform(1 - strength, 1 + strength))
    if rng.random() < p:
        h, s, v = im.convert("HSV").split()
        shift = int(round(rng.uniform(-strength, strength) * 255))
        h = Image.fromarray(((np.asarray(h).astype(np.int16) + shift) % 256).astype(np.uint8))
        im = Image.merge("HSV", (h, s, v)).convert("RGB")
    return im


def paired_random_resized_crop(image: np.ndarray, mask: np.ndarray, size: int | Sequence[int],
                               rng: np.random.Generator, *, scale: tuple[float, float] = (0.5, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3), jitter: float = 0.1,
                               jitter_p: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """One random box (area fraction in ``scale``, aspect in ``ratio``) cut from both image and mask, resized
    to ``size`` (image bilinear, mask nearest); then brightness, contrast, saturation and hue jitter of
    ``jitter`` each with probability ``jitter_p`` on the image only. Pure given ``rng``."""
    h, w = hw_size(size)
    box = _crop_box(image.shape[1], image.shape[0], scale, ratio, rng)
    im = Image.fromarray(image).crop(box).resize((w, h), Image.BILINEAR)
    m = Image.fromarray(mask).crop(box).resize((w, h), Image.NEAREST)
    if jitter > 0:
        im = _jitter(im, jitter, jitter_p, rng)
    return np.asarray(im, dtype=np.uint8), np.asarray(m, dtype=np.uint8)


def memory_views(images: np.ndarray, masks: np.ndarray, augment_epochs: int, seed: int = 0,
                 **crop_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """The Hummingbird memory's images: with ``augment_epochs == 0`` the inputs unchanged, otherwise
    ``augment_epochs`` passes of :func:`paired_random_resized_crop` at the input size (``[E * N, ...]``).

    The open implementation writes the crop scale as (0.5, 2.0); a box larger than the frame cannot be cut,
    so such draws are redrawn (up to 10 tries, then the whole frame), which leaves mostly (0.5, 1.0): our
    default states that range directly.
    """
    if augment_epochs <= 0:
        return images, masks
    rng = np.random.default_rng(seed)
    size = images.shape[1:3]
    out = [paired_random_resized_crop(im, m, size, rng, **crop_kwargs)
           for _ in range(augment_epochs) for im, m in zip(images, masks)]
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])
