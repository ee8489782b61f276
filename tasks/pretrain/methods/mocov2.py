"""MoCo v2 (Chen, Fan, Girshick, He 2020, arXiv 2003.04297; MoCo: He et al. 2020, arXiv 1911.05722).

Query = backbone + MLP head; key = EMA copy of both (no gradient); InfoNCE of each query against its key
and a FIFO queue of past keys; keys from every rank are enqueued. Asymmetric, as the original: view 0 is
the query, view 1 the key.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from tasks.pretrain.distributed import batch_shuffle, batch_unshuffle
from tasks.pretrain.ema import copy_and_freeze, update_ema
from tasks.pretrain.heads import mocov2_head
from tasks.pretrain.losses.infonce import InfoNCEQueueLoss, MemoryQueue
from tasks.pretrain.methods.base import Method
from tasks.pretrain.schedules import cosine_schedule


class MoCoV2(Method):
    """MoCo v2 per METHODS.md 7.1: head feat->feat->ReLU->128 (no BN), m=0.999, K=65536, tau=0.2.

    ``momentum_cosine=True`` ramps m from ``momentum`` to 1 (BYOL-style) instead of keeping it constant.
    ``channels_last`` runs conv backbones in NHWC, which oneDNN (CPU) and cuDNN (AMP) convolve faster;
    it changes the memory layout only, not the computation.
    Weight decay covers every parameter, biases and BN included, as the official ``main_moco.py`` (SGD over
    ``model.parameters()``) and lightly's recipe do (``decay_norm_and_bias``; DenseCL inherits it, as its
    mmselfsup configs decay everything too). With the optimiser's usual exclusion instead, one SGD step at
    lr 0.03 already moved a ResNet-18 0.8 % away from lightly's (relative to the step), 6 % after 20 steps.
    Under DDP prefer ``broadcast_buffers=False``: every rank already holds the same queue (keys are
    all-gathered before enqueue), and broadcasting it would copy ``queue_size x out_dim`` floats per step.
    """

    decay_norm_and_bias = True

    def __init__(self, backbone: nn.Module, feat_dim: int, *, hidden_dim: int | None = None, out_dim: int = 128,
                 queue_size: int = 65536, temperature: float = 0.2, momentum: float = 0.999,
                 momentum_cosine: bool = False, shuffle_bn: bool = True, channels_last: bool = True):
        super().__init__(backbone, feat_dim)
        self.channels_last = channels_last
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.head = mocov2_head(feat_dim, hidden_dim, out_dim)  # hidden_dim None: feat_dim wide
        self.backbone_k = copy_and_freeze(self.backbone)
        self.head_k = copy_and_freeze(self.head)
        self.queue = MemoryQueue(queue_size, out_dim)
        self.criterion = InfoNCEQueueLoss(temperature)
        self.momentum, self.momentum_cosine, self.shuffle_bn = momentum, momentum_cosine, shuffle_bn
        self._keys: torch.Tensor | None = None

    def to_layout(self, x: torch.Tensor) -> torch.Tensor:
        """NHWC input for conv backbones when ``channels_last`` (layout only, same values)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def embed(self, backbone: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The one forward path of both branches: image -> pooled feature -> head -> unit vector (fp32 even
        under bf16 autocast: keys live on in the queue, and cosines need more than bf16's 3 digits)."""
        return F.normalize(head(backbone(self.to_layout(x)).flatten(1)).float(), dim=1)

    @torch.no_grad()
    def key_forward(self, encode, x_k: torch.Tensor):
        """``encode(x_k)`` (a tensor or a tuple of per-image tensors) under shuffle-BN, in input order."""
        if not self.shuffle_bn:
            return encode(x_k)
        x_k, unshuffle = batch_shuffle(x_k)
        out = encode(x_k)
        if isinstance(out, torch.Tensor):
            return batch_unshuffle(out, unshuffle)
        return tuple(batch_unshuffle(o, unshuffle) for o in out)

    def forward(self, views: list[torch.Tensor], step: int, max_steps: int,
                pair_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x_q, x_k = views
        # Key pass first: see "Order of passes" in Method's docstring.
        k = self.key_forward(partial(self.embed, self.backbone_k, self.head_k), x_k)
        q = self.embed(self.backbone, self.head, x_q)
        # The queue is read here and only written in after_step (after backward), so no defensive clone.
        loss = self.reduce(self.criterion(q, k, self.queue.queue, reduction="none"), pair_weights)
        self._keys = k
        return {"loss": loss, "pos_cos": (q.detach() * k).sum(1).mean()}

    def current_momentum(self, step: int, max_steps: int) -> float:
        return cosine_schedule(step, max_steps, self.momentum, 1.0) if self.momentum_cosine else self.momentum

    @torch.no_grad()
    def after_step(self, step: int, max_steps: int) -> None:
        m = self.current_momentum(step, max_steps)
        update_ema(self.backbone, self.backbone_k, m)
        update_ema(self.head, self.head_k, m)
        if self._keys is not None:
            self.queue.enqueue(self._keys)
            self._keys = None


METHOD = MoCoV2
