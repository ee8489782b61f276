"""Cost of the MoCo v2 aug+ pipeline per image view on one CPU thread (64 px output)."""
from __future__ import annotations

import time

import numpy as np
import torch

from bench.common import report
from tasks.data.transforms import MoCoV2Augment, TwoViews


def run(quick: bool = False) -> None:
    torch.set_num_threads(1)
    print("# aug: 1 torch thread (a data-loading worker), 96x80 uint8 inputs -> 64 px views")
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (80, 96, 3), dtype=np.uint8) for _ in range(64)]
    two = TwoViews(MoCoV2Augment(size=64), seed=0)
    two(imgs[:8])
    best = float("inf")
    for _ in range(3 if quick else 10):
        t0 = time.perf_counter()
        two(imgs)
        best = min(best, (time.perf_counter() - t0) / (2 * len(imgs)))
    report("aug.mocov2_ms_per_view", best * 1e3, "<=2.0")
