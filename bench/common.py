"""Timing helpers shared by the benchmarks."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import contextlib
import os

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


def env_positive(name: str, default: float, kind: type = float) -> float:
    """A positive ``kind`` (float: a budget in seconds; int: a count) from the environment variable ``name``
    (``default`` when unset); anything else exits naming the variable."""
    raw = os.environ.get(name)
    if raw is None:
        return kind(default)
    try:
        value = kind(raw) if kind is not int or raw.isdigit() else None  # an integer: digits only
    except ValueError:
        value = None
    if value is None or not value > 0:
        raise SystemExit(f"{name}: expected a positive {'integer' if kind is int else 'number'}, got {raw!r}")
    return value


def report(name: str, value: float, goal: str) -> None:
    print(f"BENCH {name} {value:.3f} {goal}")


def train_for_budget(step, augments, images, budget_s: float, batch: int, seed: int = 0, overlap=None,
                     before=None) -> int:
    """Calls ``step(views, steps, inputs)`` on random batches of ``images`` (numpy, drawn without replacement,
    views from ``augments`` with one seeded generator) until ``budget_s`` seconds of step time; returns the
    number of steps. Only the step is timed, and not the first one: it builds oneDNN's kernels for every
    shape (seconds), on every side of a comparison alike. ``before(idx, steps)``, if given, returns the
    step's extra inputs (the data side's token masks, cluster ids), untimed; with ``overlap`` each image's
    crops are drawn to overlap and ``inputs["boxes"]`` carries their geometry (NeCo's ROI-Align)."""
    import numpy as np

    from tasks.data.transforms import MultiView, geometry_tensor

    mv = MultiView(augments, seed=seed, overlap=overlap)
    rng = np.random.default_rng(seed)
    spent, steps = 0.0, 0
    while spent < budget_s:
        idx = rng.choice(len(images), batch, replace=False)
        views, geoms = mv([images[i] for i in idx], with_geometry=True)
        inputs = dict(before(idx, steps)) if before is not None else {}
        if overlap is not None:
            inputs["boxes"] = geometry_tensor(geoms)
        t0 = time.perf_counter()
        step(views, steps, inputs)
        if steps:
            spent += time.perf_counter() - t0
        steps += 1
    return steps


def method_stepper(method, optimizer: str, lr: float, wd: float, betas=(0.9, 0.999), warmup: int = 10):
    """``step(views, s, inputs)`` for :func:`train_for_budget`: our ``train_step`` at the pretrain stage's
    precision (``AUTOCAST``), lr warmed up linearly over ``warmup`` steps then constant (a budget of
    minutes has no schedule horizon to anneal to)."""
    from tasks.pretrain.loop import build_optimizer, train_step

    opt = build_optimizer(method, optimizer, lr, 0.9, wd, betas=betas)

    def step(views, s, inputs):
        return train_step(method, opt, views, s, 10 ** 6, lr * min(1.0, (s + 1) / warmup), autocast_dtype=AUTOCAST,
                          **inputs)
    return step
