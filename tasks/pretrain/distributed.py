"""Thin helpers around torch.distributed that are no-ops when it is not initialised (single process).

All gathers assume every rank contributes a tensor of the same shape (equal per-rank batches; use
``drop_last=True`` in the data side).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


@torch.no_grad()
def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 (rank order); no gradient flows back."""
    ws = world_size()
    if ws == 1:
        return x
    x = x.contiguous()
    out = torch.empty((ws * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x)
    return out


@torch.no_grad()
def all_reduce_sum_nograd(x: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``x`` over all ranks (e.g. SwAV's Sinkhorn marginals); no gradient flows back.

    Returns a new tensor when distributed, ``x`` itself in a single process: do not modify the result in place.
    """
    if world_size() == 1:
        return x
    x = x.detach().clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.batch = x.shape[0]
        return all_gather_nograd(x)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss depends on this rank's slice, so its gradient is the sum over ranks.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        r = rank()
        return grad[r * ctx.batch:(r + 1) * ctx.batch]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Like :func:`all_gather_nograd` but gradients reach the local slice from every rank's loss."""
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shuffle a batch across ranks (MoCo's shuffle-BN); returns (local shuffled part, unshuffle index).

    BN in the key encoder would otherwise see exactly the same sub-batch as the query, letting the model
    cheat through batch statistics. With one worker there is nothing to shuffle across: this returns
    ``(x, None)`` and the key branch sees the same BN batch as the query branch (a known weakness of
    single-process MoCo; shuffling within one batch would not change BN statistics).
    """
    ws = world_size()
    if ws == 1:
        return x, None
    full = all_gather_nograd(x)
    perm = torch.randperm(full.shape[0], device=full.device)
    dist.broadcast(perm, src=0)
    local = perm.view(ws, -1)[rank()]
    return full[local], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, idx_unshuffle: torch.Tensor | None) -> torch.Tensor:
    """Undo :func:`batch_shuffle` on the encoder outputs (no-op when ``idx_unshuffle`` is None)."""
    if idx_unshuffle is None:
        return x
    full = all_gather_nograd(x)
    local = idx_unshuffle.view(world_size(), -1)[rank()]
    return full[local]
