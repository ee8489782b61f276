"""Optimisers: SGD, LARS and AdamW over two parameter groups (weights; biases and norm parameters).

Biases and normalisation parameters (tensors with ndim <= 1) get no weight decay and, under LARS, no
trust-ratio adaptation -- the exclusion BYOL, MoCo v3 and SwAV use.
"""
from __future__ import annotations

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017) on top of SGD with momentum.

    For each tensor of a group with ``lars=True``: ``ratio = eta * |w| / (|g| + wd * |w| + eps)`` (the
    paper's form; 1 where either norm is 0), ``g <- ratio * (g + wd * w)``; ``v <- momentum * v + g``; ``w <- w - lr * v`` (torch SGD's convention). Groups with ``lars=False``
    use plain SGD with momentum (and their own weight decay, 0 for the excluded parameters).
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 1e-3, eps: float = 1e-8):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError("LARS: lr, momentum, weight_decay must be >= 0 and trust_coefficient > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, wd = p.grad, group["weight_decay"]
                if group["lars"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    ratio = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"]),
                                        torch.ones_like(w_norm))
                    g = g.add(p, alpha=wd) * ratio if wd else g * ratio
                elif wd:
                    g = g.add(p, alpha=wd)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.zeros_like(p)
                buf.mul_(group["momentum"]).add_(g)
                p.sub_(buf, alpha=group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0, "lars": False}]


OPTIMIZERS = ("sgd", "lars", "adamw")


def build_optimizer(model: nn.Module, name: str = "sgd", lr: float = 0.03, momentum: float = 0.9,
                    weight_decay: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                    trust_coefficient: float = 1e-3) -> torch.optim.Optimizer:
    """``sgd`` (momentum), ``lars`` or ``adamw`` over :func:`param_groups`."""
    groups = param_groups(model, weight_decay)
    name = name.lower()
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, trust_coefficient=trust_coefficient)
    for g in groups:
        g.pop("lars", None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    raise ValueError(f"unknown optimizer {name!r} ({'|'.join(OPTIMIZERS)})")
