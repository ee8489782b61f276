"""Timing helpers shared by the benchmarks."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import contextlib

import torch

from tasks.pretrain.loop import autocast_dtype

# The precision the pretrain stage runs at by default (``pretrain.precision: auto``) on this machine's CPU:
# bf16 autocast where the CPU has bf16 matrix units (AMX), else fp32. Ours and the bare backbone work use it;
# lightly's recipes run as its examples do (fp32), and once more "matched" to our layout and precision.
AUTOCAST = autocast_dtype("auto", "cpu")


def precision_name() -> str:
    return "bf16 autocast" if AUTOCAST is not None else "fp32"


def autocast(enabled: bool = True):
    """The forward context of ``AUTOCAST`` (a no-op when it is fp32 or ``enabled`` is False)."""
    if AUTOCAST is None or not enabled:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=AUTOCAST)


def setup_threads(n: int = 2) -> None:
    torch.set_num_threads(n)
    print(f"# torch threads: {torch.get_num_threads()} (torch {torch.__version__}); pretrain.precision auto "
          f"on this CPU = {precision_name()}")


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                        ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Seconds per call of each fn, calling them in turn each round with the order rotated every round
    (drift and "who runs after whom" hit all alike). Returns (medians, per-round times)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            fns[name]()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}, times


def median_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of num/den measured in the same round (robust to slow drift in load)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def report(name: str, value: float, goal: str) -> None:
    print(f"BENCH {name} {value:.3f} {goal}")
