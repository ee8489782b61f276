"""How far two copies of a network have parted, for the step-for-step comparisons with lightly's recipes."""
from __future__ import annotations

import torch


@torch.no_grad()
def gap(ours, ref, start) -> tuple[float, float]:
    """(||ours - ref||, ||ref - start||) over parameter lists: how far the two sides are apart, and how far the
    reference has moved from where both began."""
    def dist(xs, ys):
        return sum(float((x - y).norm() ** 2) for x, y in zip(xs, ys, strict=True)) ** 0.5
    ref = list(ref)
    return dist(ours, ref), dist(ref, start)
