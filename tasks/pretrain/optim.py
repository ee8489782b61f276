"""Optimisers: SGD, LARS and AdamW over two parameter groups (weights; biases and norm parameters).

Biases and normalisation parameters (tensors with ndim <= 1) get no weight decay and, under LARS, no
trust-ratio adaptation -- the exclusion BYOL, MoCo v3, MAE, I-JEPA and DINOv2 use. A method whose reference
code decays every parameter (MoCo v2's ``main_moco.py``: ``SGD(model.parameters(), weight_decay=1e-4)``;
DenseCL's mmselfsup configs) says so with ``decay_norm_and_bias = True``; ``build_optimizer`` reads it.
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


def param_groups(model: nn.Module, weight_decay: float, exclude_norm_bias: bool = True) -> list[dict]:
    """[weights, biases + norm parameters]; with ``exclude_norm_bias=False`` one group, all decayed.

    A method whose recipe trains its backbone at a fraction of the heads' learning rate (NeCo: backbone
    1e-5, head 1e-4) says so with ``backbone_lr_scale``; the backbone's parameters then form their own
    groups carrying ``lr_scale`` (``train_step`` sets each group's lr to ``lr * lr_scale``)."""
    from tasks.pretrain.loop import unwrap  # loop imports this module

    inner = unwrap(model)
    scale = float(getattr(inner, "backbone_lr_scale", 1.0))
    params = [p for p in model.parameters() if p.requires_grad]
    parts = [(params, 1.0)]
    if scale != 1.0:
        in_backbone = {id(p) for p in inner.backbone.parameters()}
        parts = [([p for p in params if id(p) not in in_backbone], 1.0),
                 ([p for p in params if id(p) in in_backbone], scale)]
    groups = []
    for part, lr_scale in parts:
        if not exclude_norm_bias:
            split = [{"params": part, "weight_decay": weight_decay}]
        else:
            split = [{"params": [p for p in part if p.ndim > 1], "weight_decay": weight_decay},
                     {"params": [p for p in part if p.ndim <= 1], "weight_decay": 0.0, "lars": False}]
        groups += [dict(g, lr_scale=lr_scale) if lr_scale != 1.0 else g for g in split]
    return groups


def excludes_norm_bias(model: nn.Module, setting: str = "auto") -> bool:
    """``pretrain.decay_norm_and_bias`` -> whether biases and norm parameters are left out of weight decay:
    ``auto`` follows the method's reference recipe (its ``decay_norm_and_bias`` attribute, default False),
    ``yes`` decays them, ``no`` excludes them."""
    if setting == "auto":
        from tasks.pretrain.loop import unwrap  # loop imports this module

        return not getattr(unwrap(model), "decay_norm_and_bias", False)
    if setting in ("yes", "no"):
        return setting == "no"
    raise ValueError(f"decay_norm_and_bias: expected auto, yes or no, got {setting!r}")


OPTIMIZERS = ("sgd", "lars", "adamw")


def build_optimizer(model: nn.Module, name: str = "sgd", lr: float = 0.03, momentum: float = 0.9,
                    weight_decay: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                    trust_coefficient: float = 1e-3, decay_norm_and_bias: str = "auto") -> torch.optim.Optimizer:
    """``sgd`` (momentum), ``lars`` or ``adamw`` over :func:`param_groups`; ``decay_norm_and_bias`` as in
    :func:`excludes_norm_bias` (``auto``: the method's own recipe)."""
    groups = param_groups(model, weight_decay, excludes_norm_bias(model, decay_norm_and_bias))
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
