"""The pieces of one optimisation step; the Ray trainer in pipelines/ only adds data and logging."""
from __future__ import annotations

import math

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP/FSDP-style wrappers (``.module``), else the model itself."""
    return getattr(model, "module", model)


def build_optimizer(model: nn.Module, name: str = "sgd", lr: float = 0.03, momentum: float = 0.9,
                    weight_decay: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over trainable parameters; biases and norm weights (ndim <= 1) get no wd."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    name = name.lower()
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    raise ValueError(f"unknown optimizer {name!r} (sgd|adamw)")


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, views: list[torch.Tensor],
               step: int, max_steps: int, lr: float) -> dict[str, float]:
    """Set lr, forward (through DDP if wrapped), backward, step, then the method's ``after_step``.

    Raises ``FloatingPointError`` on a non-finite loss before the weights are touched.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    optimizer.zero_grad(set_to_none=True)
    out = model(views, step, max_steps)
    loss = out["loss"]
    loss.backward()
    metrics = {k: float(v.detach()) for k, v in out.items()}
    if not math.isfinite(metrics["loss"]):
        raise FloatingPointError(f"non-finite loss {metrics['loss']} at step {step}")
    optimizer.step()
    unwrap(model).after_step(step, max_steps)
    metrics["lr"] = lr
    return metrics
