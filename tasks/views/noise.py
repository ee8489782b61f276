"""GenView's adaptive noise policy: foreground ratio -> unCLIP noise_level by right-closed bins."""
from __future__ import annotations

import bisect
from typing import Sequence


def noise_level(fg_ratio: float, bins: Sequence[float] = (0.2, 0.4, 0.6, 0.8, 1.0),
                levels: Sequence[int] = (0, 100, 200, 300, 400)) -> int:
    """``p <= bins[0]`` -> levels[0]; ``bins[i-1] < p <= bins[i]`` -> levels[i] (METHODS.md 1.2)."""
    if len(bins) != len(levels):
        raise ValueError("one noise level per bin")
    i = bisect.bisect_left(list(bins), float(fg_ratio))
    return int(levels[min(i, len(levels) - 1)])
