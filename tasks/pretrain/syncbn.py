"""Batch norm whose statistics span every rank's batch, on any device (torch's SyncBatchNorm is GPU-only).

Used for the SyncBN option on CPU (gloo) and by the distributed-equivalence tests: with it, N ranks with
batch B/N compute exactly what one rank with batch B computes. On a GPU, :func:`convert_sync_bn` returns
torch's own ``nn.SyncBatchNorm`` instead.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from tasks.pretrain.distributed import world_size


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; each rank's input receives the sum over ranks of the output gradients."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``x`` over ranks (identity in a single process)."""
    return _AllReduceSum.apply(x) if world_size() > 1 else x


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over (N, C, *) whose training statistics are sums over all ranks (one all-reduce of
    ``[sum, sum of squares, count]`` per layer); running statistics use the unbiased global variance, as
    ``nn.BatchNorm`` does. Eval mode and single-process use are ordinary batch norm."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        n_local = x.numel() // c
        xf = x.float()
        # Sums in float64: E[x^2] - mean^2 cancels badly in fp32 when |mean| >> std (a head's first BN
        # over post-ReLU features), enough to break 2 ranks x B/2 == 1 rank x B at rtol 1e-4.
        xd = x.double()
        stats = torch.cat([xd.sum(dims), (xd * xd).sum(dims), xd.new_full((1,), float(n_local))])
        stats = all_reduce_sum(stats)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
                self.num_batches_tracked += 1
        shape = [1, c] + [1] * (x.dim() - 2)
        mean, var = mean.to(xf.dtype), var.to(xf.dtype)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_bn(module: nn.Module, gpu: bool | None = None) -> nn.Module:
    """Replace every ``BatchNorm{1,2,3}d`` by a cross-rank one (torch's on GPU, :class:`GlobalBatchNorm`
    otherwise), keeping parameters and running statistics."""
    if gpu is None:
        gpu = any(p.is_cuda for p in module.parameters())
    if gpu:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        if module.track_running_stats:
            new.running_mean.copy_(module.running_mean)
            new.running_var.copy_(module.running_var)
            new.num_batches_tracked.copy_(module.num_batches_tracked)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_sync_bn(child, gpu=False)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
