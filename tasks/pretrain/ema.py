"""Exponential moving average of parameters for momentum (key / teacher) encoders."""
from __future__ import annotations

import copy

import torch
from torch import nn


@torch.no_grad()
def update_ema(online: nn.Module, target: nn.Module, m: float) -> None:
    """``target <- m * target + (1 - m) * online`` over parameters (not buffers).

    One fused ``lerp`` per tensor list (``t + (1-m)(o - t)``): a single pass over memory instead of a
    multiply pass followed by an add pass. BN statistics of the target come from its own forward passes,
    as in MoCo.
    """
    tgt = list(target.parameters())
    src = list(online.parameters())
    if len(tgt) != len(src):
        raise ValueError(f"online has {len(src)} parameters, target {len(tgt)}")
    if m == 1.0:
        return
    torch._foreach_lerp_(tgt, src, 1.0 - m)


def copy_and_freeze(module: nn.Module) -> nn.Module:
    """Deep copy with ``requires_grad=False`` everywhere (stays in the same train/eval mode)."""
    twin = copy.deepcopy(module)
    twin.requires_grad_(False)
    return twin
