"""InfoNCE against a queue of negatives (MoCo) and the FIFO queue itself."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tasks.pretrain.distributed import all_gather_nograd


class InfoNCEQueueLoss(nn.Module):
    """MoCo's InfoNCE (He et al. 2020, arXiv 1911.05722, eq. 1):

    ``l_i = -log( exp(q_i.k_i/t) / (exp(q_i.k_i/t) + sum_j exp(q_i.n_j/t)) )``

    with q, k ``[B, D]`` and queue ``[K, D]`` all L2-normalised. Same value as cross-entropy over the
    logits ``[q.k, q.N^T] / t`` with target 0, computed without materialising that concatenation:
    ``l_i = logaddexp(pos_i, logsumexp(neg_i)) - pos_i``. ``reduction="none"`` returns ``[B]``
    per-sample losses (for per-pair weighting such as GenView's).
    """

    def __init__(self, temperature: float = 0.2, reduction: str = "mean"):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be mean|sum|none, got {reduction!r}")
        self.temperature = temperature
        self.reduction = reduction

    def forward(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, reduction: str | None = None) -> torch.Tensor:
        # Logits in at least fp32 with autocast off: in bf16 the 1/t-scaled logits keep ~3 significant
        # digits, too few for a softmax over thousands of negatives (the queue matmul is a small part of a step).
        dtype = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            qs = q.to(dtype) / self.temperature  # scale B*D values instead of B*(K+1) logits
            pos = (qs * k.to(dtype)).sum(dim=1)
            neg = qs @ queue.detach().to(dtype).t()
            loss = torch.logaddexp(pos, torch.logsumexp(neg, dim=1)) - pos
        reduction = reduction or self.reduction
        if reduction == "mean":
            return loss.mean()
        if reduction == "sum":
            return loss.sum()
        return loss


class MemoryQueue(nn.Module):
    """FIFO queue of ``size`` keys of ``dim`` (MoCo's dictionary), initialised with random unit vectors.

    ``enqueue`` gathers keys from all ranks first (so every rank holds the same queue) and writes them at
    the pointer, wrapping around; any batch size works, including sizes not dividing ``size`` and
    batches larger than the queue (only the newest ``size`` keys are kept).
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"queue size and dim must be > 0, got {size}, {dim}")
        self.size, self.dim = size, dim
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, gather: bool = True) -> None:
        if gather:
            keys = all_gather_nograd(keys)
        n = keys.shape[0]
        keys = keys[-self.size:].to(self.queue.dtype)
        m = keys.shape[0]
        start = (int(self.ptr) + n - m) % self.size
        first = min(m, self.size - start)
        self.queue[start:start + first] = keys[:first]
        if first < m:
            self.queue[:m - first] = keys[first:]
        self.ptr.fill_((start + m) % self.size)
