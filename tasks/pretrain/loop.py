"""The pieces of one optimisation step; the Ray trainer in pipelines/ only adds data and logging."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from tasks.pretrain.optim import build_optimizer

__all__ = ["autocast_dtype", "build_optimizer", "train_step", "unwrap"]  # the trainer's one import


def cpu_has_bf16_matmul() -> bool:
    """True on CPUs with bf16 matrix units (Intel AMX): there oneDNN runs bf16 convolutions and matmuls
    several times faster than fp32 (resnet18 fwd+bwd at 64 px: 3.5x measured on a 2-core Sapphire Rapids
    slice). Elsewhere bf16 on CPU is emulated or barely faster, so ``auto`` stays fp32."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe and probe() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """``pretrain.precision`` -> the autocast dtype of the forward (None: plain fp32).

    ``auto``: bf16 autocast on a GPU and on a CPU with bf16 matrix units, fp32 otherwise. Under autocast
    only convolutions and matmuls run in bf16 (weights, optimizer state and gradients stay fp32; every loss
    here upcasts its logits to fp32), which is how SSL methods are trained on accelerators anyway.
    """
    device_type = torch.device(device).type
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision: expected auto, fp32 or bf16, got {precision!r}")
    if device_type == "cuda" or (device_type == "cpu" and cpu_has_bf16_matmul()):
        return torch.bfloat16
    return None


@contextlib.contextmanager
def cpu_attention(model: nn.Module):
    """Attention for a training step on a CPU: timm's explicit ``softmax(q k^T) v`` instead of
    scaled-dot-product attention (each timm ``Attention`` has a ``fused_attn`` switch; it is turned off for
    the forward and restored after -- the backward follows the graph the forward recorded), and SDPA's math
    kernel for any other module that calls SDPA itself.

    Measured on a 2-core Sapphire Rapids slice under bf16 autocast, fwd+bwd of one attention
    ``[8, 6, 196, 64]``: fused (flash) kernel 21.7 ms, math kernel 20.8 ms (it computes in fp32), explicit
    8.5 ms (bf16 matmuls on AMX); ``[32, 6, 49, 64]``: 29.6 / 9.9 / 5.8 ms. The fused CPU kernel's backward
    is the slow part (about 10x its forward). GPUs keep the default. Inference (kNN, embedding) keeps the
    fused kernel, whose forward is fast.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    switched = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
    for m in switched:
        m.fused_attn = False
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        for m in switched:
            m.fused_attn = True


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
    with contextlib.ExitStack() as stack:
        if autocast_dtype is not None:
            stack.enter_context(torch.autocast(device_type, dtype=autocast_dtype))
        if device_type == "cpu":
            stack.enter_context(cpu_attention(model))
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
