"""A picture of segmentation results: per row, image | ground truth over the image | prediction over it."""
from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image


def palette(num_classes: int) -> np.ndarray:
    """Fixed colours ``[C, 3]`` uint8: hues a golden angle apart, so neighbouring ids differ clearly."""
    return np.array([[round(255 * v) for v in colorsys.hsv_to_rgb((0.61803398875 * c) % 1.0,
                                                                  0.85 - 0.3 * (c // 12 % 2), 0.95)]
                     for c in range(num_classes)], dtype=np.uint8).reshape(num_classes, 3)


def _to_size(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    if mask.shape == (h, w):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((w, h), Image.NEAREST))


def colorize(image: np.ndarray, mask: np.ndarray, colors: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """``image`` with each labelled pixel blended toward its class colour; ids outside the palette (the
    ignore index) leave the image's own colour. A mask of another size is resized (nearest) to the image."""
    mask = _to_size(np.asarray(mask), *image.shape[:2]).astype(np.int64)
    out = image.astype(np.float32).copy()
    hit = (mask >= 0) & (mask < len(colors))
    out[hit] = (1 - alpha) * out[hit] + alpha * colors[mask[hit]].astype(np.float32)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    out[~hit] = image[~hit]  # exactly the input, not a float round trip
    return out


def overlay_grid(images_uint8: np.ndarray, gt_masks: np.ndarray, pred_masks: np.ndarray, num_classes: int,
                 ignore_index: int = 255, max_images: int = 4, gap: int = 2) -> np.ndarray:
    """RGB uint8 ``[R*H + (R-1)*gap, 3*W + 2*gap, 3]`` for the first ``R = min(N, max_images)`` images:
    each row is the image, its ground truth and its prediction blended over it (colours of
    :func:`palette`; ``ignore_index`` pixels keep the image's colours), separated by white ``gap`` lines.
    Masks may be at another resolution than the images (e.g. linear-segmentation predictions at 100x100)."""
    images = np.asarray(images_uint8)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
    n = min(len(images), max_images)
    if n == 0:
        raise ValueError("overlay_grid got no images")
    if ignore_index < num_classes:
        raise ValueError(f"ignore_index {ignore_index} must lie outside the classes 0..{num_classes - 1}")
    colors = palette(num_classes)
    h, w = images.shape[1:3]
    grid = np.full((n * h + (n - 1) * gap, 3 * w + 2 * gap, 3), 255, np.uint8)
    for r in range(n):
        y = r * (h + gap)
        panels = (images[r], colorize(images[r], np.asarray(gt_masks[r]), colors),
                  colorize(images[r], np.asarray(pred_masks[r]), colors))
        for c, panel in enumerate(panels):
            grid[y:y + h, c * (w + gap):c * (w + gap) + w] = panel
    return grid
