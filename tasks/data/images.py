"""Decoded image bytes -> fixed-size uint8 batches (resize short side, centre crop), for every stage."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image


def to_square(data: bytes, resolution: int) -> np.ndarray:
    """Decode, resize the short side to ``resolution`` (bicubic) and centre-crop: uint8 HxWx3."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        return np.asarray(im.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)


def batch_to_array(images: Sequence[bytes], resolution: int) -> np.ndarray:
    """``N`` image byte strings -> ``N x res x res x 3`` uint8."""
    if not len(images):
        return np.zeros((0, resolution, resolution, 3), np.uint8)
    return np.stack([to_square(b, resolution) for b in images])


def mask_to_png(mask: np.ndarray) -> bytes:
    """Binary mask (HxW, bool/0-1) -> 8-bit PNG bytes with values 0/255."""
    buf = io.BytesIO()
    Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def png_to_mask(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L")) > 127
