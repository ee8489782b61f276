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

    On CPU the negatives go through one fused kernel (:class:`_QueueInfoNCE`); elsewhere through the plain
    expression. Both keep logits, logsumexp and the positive in (at least) fp32. Under a bf16 CPU autocast
    the fused kernel reads q and the queue rounded to bf16 (its matmuls accumulate in fp32): q is the output
    of a bf16 head there anyway, so this adds the same ~0.4 % relative rounding a second time (measured on
    the DenseCL shape: loss within 2e-4, gradient within 1e-4 of its norm), for 4.6 ms instead of 16.5.
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
        # Logits in at least fp32 with autocast off: *rounded* to bf16 the 1/t-scaled logits keep ~3
        # significant digits, too few for a softmax over thousands of negatives.
        dtype = torch.promote_types(q.dtype, torch.float32)
        bf16_operands = (q.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                         and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        with torch.autocast(q.device.type, enabled=False):
            qs = q.to(dtype) / self.temperature  # scale B*D values instead of B*(K+1) logits
            k, queue = k.to(dtype), queue.detach().to(dtype)
            if _fused(qs, queue):
                loss = _QueueInfoNCE.apply(qs, k, queue, torch.bfloat16 if bf16_operands else dtype)
            else:
                pos = (qs * k).sum(dim=1)
                loss = torch.logaddexp(pos, torch.logsumexp(qs @ queue.t(), dim=1)) - pos
        reduction = reduction or self.reduction
        if reduction == "mean":
            return loss.mean()
        if reduction == "sum":
            return loss.sum()
        return loss


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _fused(qs: torch.Tensor, queue: torch.Tensor) -> bool:
    return (_FLASH_CPU is not None and qs.device.type == "cpu" and qs.dtype in (torch.float32, torch.float64)
            and qs.ndim == 2 and qs.shape[0] > 0 and queue.shape[0] > 0)


class _QueueInfoNCE(torch.autograd.Function):
    """``l_i = logaddexp(p_i, lse_j n_ij) - p_i`` with ``p_i = qs_i . k_i``, ``n_ij = qs_i . N_j`` (qs already
    divided by the temperature), negatives through CPU flash attention with the queue as keys *and* values.

    Why: the plain expression materialises the ``[B, K]`` logits (DenseCL: 2,048 locations x 4,096 keys =
    8.4 M fp32) and autograd walks them five more times (logsumexp's amax/sub/exp/sum, then sub/exp/mul and a
    second matmul backward): 81 ms fwd+bwd on 2 cores. The attention kernel tiles the same two matmuls in cache
    and returns what the loss needs: ``lse_i`` (fp32) and ``o_i = sum_j softmax_j(n_ij) N_j``. The backward is
    then elementwise, with ``s_i = exp(p_i - z_i)`` (the positive's softmax weight, ``z = logaddexp(p, lse)``)::

        dl_i/dqs_i = (s_i - 1) k_i + sum_j exp(n_ij - z_i) N_j = (1 - s_i) (o_i - k_i)
        dl_i/dk_i  = (s_i - 1) qs_i

    since ``sum_j exp(n_ij - z_i) = 1 - s_i``. Same FLOPs as the forward alone: 16 ms instead of 81 for the
    DenseCL shape (fp32 in, fp32 out, equal to the plain expression to ~1e-6).
    """

    @staticmethod
    def forward(ctx, qs: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, operands: torch.dtype) -> torch.Tensor:
        kv = queue.to(operands)[None, None]
        out, lse = _FLASH_CPU(qs.to(operands)[None, None], kv, kv, scale=1.0)
        pos = (qs * k).sum(dim=1)
        z = torch.logaddexp(pos, lse[0, 0].to(pos.dtype))
        ctx.save_for_backward(qs, k, out[0, 0].to(qs.dtype), torch.exp(pos - z))
        return z - pos

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qs, k, out, s = ctx.saved_tensors
        w = (grad * (1.0 - s)).unsqueeze(1)
        grad_qs = w * (out - k) if ctx.needs_input_grad[0] else None
        grad_k = -w * qs if ctx.needs_input_grad[1] else None
        return grad_qs, grad_k, None, None


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
