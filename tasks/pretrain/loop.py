"""The pieces of one optimisation step; the Ray trainer in pipelines/ only adds data and logging."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from tasks.pretrain.optim import build_optimizer

__all__ = ["build_optimizer", "train_step", "unwrap"]  # the trainer's one import


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP/FSDP-style wrappers (``.module``), else the model itself."""
    return getattr(model, "module", model)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, views: list[torch.Tensor],
               step: int, max_steps: int, lr: float, *, clip_grad: float = 0.0,
               autocast_dtype: torch.dtype | None = None, **forward_kwargs) -> dict[str, float]:
    """Set lr, forward (through DDP if wrapped), backward, optional gradient-norm clipping, step, then the
    method's ``after_step``. ``autocast_dtype`` (e.g. ``torch.bfloat16`` on a GPU) runs the forward under
    autocast; ``forward_kwargs`` go to the method (e.g. ``pair_weights``).

    Raises ``FloatingPointError`` on a non-finite loss before the weights are touched.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    optimizer.zero_grad(set_to_none=True)
    device_type = views[0].device.type if views else "cpu"
    ctx = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    with ctx:
        out = model(views, step, max_steps, **forward_kwargs)
    loss = out["loss"]
    loss.backward()
    metrics = {k: float(v.detach()) for k, v in out.items()}
    if not math.isfinite(metrics["loss"]):
        raise FloatingPointError(f"non-finite loss {metrics['loss']} at step {step}")
    if clip_grad > 0:
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], clip_grad))
    optimizer.step()
    unwrap(model).after_step(step, max_steps)
    metrics["lr"] = lr
    return metrics
