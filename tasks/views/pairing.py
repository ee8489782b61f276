"""GenView's view pairing (METHODS.md 1.2, "How views are formed during SSL"): for every sample, pick one of
the two view slots uniformly at random; with probability ``prob`` that slot is cropped from a generated
variation, the other from the original image. Every other view (multi-crop's local crops) comes from the
original. The augmentation then runs per view as usual, so the variation gets its slot's recipe.
"""
from __future__ import annotations

import numpy as np


def pick_variation_slots(num_variations: np.ndarray, prob: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per image: (slot in {0, 1} that shows a variation, or -1 for none; which variation, uniformly).

    ``num_variations[i]`` is how many variations image i has; an image with none keeps both originals.
    """
    n = len(num_variations)
    slot = np.where(rng.random(n) < prob, rng.integers(0, 2, n), -1)
    slot[np.asarray(num_variations) == 0] = -1
    which = (rng.random(n) * np.maximum(np.asarray(num_variations), 1)).astype(int)
    return slot, which


def view_sources(originals: list, variations: list, slot: np.ndarray, which: np.ndarray, num_views: int) -> list[list]:
    """Per view, the list of images to augment: ``variations[i][which[i]]`` in view ``slot[i]``, else the original."""
    return [[variations[i][which[i]] if slot[i] == v else im for i, im in enumerate(originals)]
            for v in range(num_views)]
