"""DenseCL (Wang, Zhang, Shen, Kong, Li, CVPR 2021, arXiv 2011.09157): MoCo v2 plus a dense branch.

One backbone pass per view gives the C5 map; the global branch pools it (MoCo v2 exactly), the dense branch
projects every location with its own head. Each query location's positive is the key location whose
*backbone* feature is most cosine-similar; negatives are pooled dense keys of past images (a second
queue). ``L = (1 - lambda) L_global + lambda L_dense`` (METHODS.md section 3).

``dense_queue_keys="locations"`` is the one departure offered: the dense queue then stores every query
location's matched key (N*S^2 entries per step) instead of one pooled key per image. That is lightly's DenseCL
recipe (its ``NTXentLoss`` memory bank stores every key it is given) and, by METHODS.md 3.6, a different method
from the paper's, so the default stays the paper's. Measured in ``bench knn``'s setup (resnet18 CIFAR stem,
32 px imagenette, 420 s of step time on 2 CPU cores, bf16, ~550 steps; seeds 1 / 2): kNN top-1 0.394 / 0.387
with ``locations``, 0.363 / 0.380 with ``pooled`` (one s.e. 0.015): in short runs from scratch the negatives
from every location of the last few batches seem to teach at least as fast; the paper's 200-epoch regime is
not measured here.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tasks.pretrain.ema import copy_and_freeze, update_ema
from tasks.pretrain.heads import mocov2_head
from tasks.pretrain.losses.infonce import MemoryQueue
from tasks.pretrain.methods.mocov2 import MoCoV2


def dense_correspondence(f_q: torch.Tensor, f_k: torch.Tensor) -> torch.Tensor:
    """``c(s) = argmax_t cos(f_q[s], f_k[t])`` per image (METHODS.md 3.3): ``[N, S2, C] x [N, S2, C] -> [N, S2]``.

    One batched matmul over the whole batch; no gradient (argmax has none).
    """
    with torch.no_grad():
        sim = torch.bmm(F.normalize(f_q, dim=-1), F.normalize(f_k, dim=-1).transpose(1, 2))
        return sim.argmax(dim=2)


# What the dense queue stores: "pooled" (the paper: one pooled dense key per image) or "locations" (every
# query location's matched key, lightly's recipe); see the module docstring.
DENSE_QUEUE_KEYS = ("pooled", "locations")


class DenseCL(MoCoV2):
    """DenseCL per METHODS.md section 3 on top of :class:`MoCoV2` (its global branch, queue, EMA, shuffle-BN).

    Dense head: 1x1 conv -> ReLU -> 1x1 conv -> L2 norm per location. A 1x1 conv is a Linear over the
    channels of each location, so it is ``mocov2_head(feat_dim, hidden_dim, out_dim)`` (the paper uses the
    same widths as the global head: C5 channels -> C5 channels -> 128, the default here as in MoCo v2) applied
    to the ``[N, S2, C]`` tokens of the map: one matmul.
    ``dense_weight`` is lambda; ``warmup_steps_dense`` sets lambda = 0 for the first steps (the optional
    DenseCLWarmupHook, default off). ``dense_queue_keys``: ``"pooled"`` (paper) or ``"locations"`` (module
    docstring); ``dense_queue_size`` defaults to ``queue_size``. Other options are MoCo v2's.
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, *, hidden_dim: int | None = None, out_dim: int = 128,
                 queue_size: int = 65536, dense_queue_size: int | None = None, dense_weight: float = 0.5,
                 warmup_steps_dense: int = 0, dense_queue_keys: str = "pooled", **moco_kwargs: Any):
        super().__init__(backbone, feat_dim, hidden_dim=hidden_dim, out_dim=out_dim, queue_size=queue_size,
                         **moco_kwargs)
        if not 0.0 <= dense_weight <= 1.0:
            raise ValueError(f"dense_weight must be in [0, 1], got {dense_weight}")
        if dense_queue_keys not in DENSE_QUEUE_KEYS:
            raise ValueError(f"dense_queue_keys must be one of {DENSE_QUEUE_KEYS}, got {dense_queue_keys!r}")
        self.dense_head = mocov2_head(feat_dim, hidden_dim, out_dim)
        self.dense_head_k = copy_and_freeze(self.dense_head)
        self.dense_queue = MemoryQueue(dense_queue_size or queue_size, out_dim)
        self.dense_weight, self.warmup_steps_dense = dense_weight, warmup_steps_dense
        self.dense_queue_keys = dense_queue_keys
        self._dense_keys: torch.Tensor | None = None

    def encode(self, backbone: nn.Module, head: nn.Module, dense_head: nn.Module,
               x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The one forward path of both branches: image -> (global unit vector ``[N, D]``, dense unit
        vectors ``[N, S2, D]``, pooled dense unit vector ``[N, D]`` (the dense-queue entry), backbone
        tokens ``[N, S2, C]`` for matching)."""
        fmap = backbone.forward_features(self.to_layout(x))
        if fmap.ndim != 4:
            raise ValueError(f"DenseCL needs a conv feature map [N, C, H, W], got shape {tuple(fmap.shape)}")
        # mean over (H, W) is MoCo v2's global average pool (bit-identical to TinyConvNet's forward).
        g = F.normalize(head(fmap.mean((2, 3))).float(), dim=1)  # unit vectors in fp32 (see MoCoV2.embed)
        tokens = fmap.flatten(2).transpose(1, 2)  # contiguous when fmap is channels_last
        d = dense_head(tokens).float()
        # Pool before normalising, as the reference neck pools the raw dense output (METHODS.md 3.2).
        return g, F.normalize(d, dim=2), F.normalize(d.mean(1), dim=1), tokens

    def dense_lambda(self, step: int) -> float:
        return 0.0 if step < self.warmup_steps_dense else self.dense_weight

    def forward(self, views: list[torch.Tensor], step: int, max_steps: int,
                pair_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x_q, x_k = views
        # Key pass first: see "Order of passes" in Method's docstring.
        k, t, t_pooled, f_k = self.key_forward(partial(self.encode, self.backbone_k, self.head_k, self.dense_head_k), x_k)
        q, r, _, f_q = self.encode(self.backbone, self.head, self.dense_head, x_q)
        with torch.no_grad():
            match = dense_correspondence(f_q.detach(), f_k)
            t_pos = t.gather(1, match.unsqueeze(-1).expand_as(t))
        n, s2, dim = r.shape
        loss_global = self.criterion(q, k, self.queue.queue, reduction="none")
        loss_dense = self.criterion(r.reshape(n * s2, dim), t_pos.reshape(n * s2, dim), self.dense_queue.queue,
                                    reduction="none").view(n, s2).mean(1)
        # lambda = 0 still computes the dense branch: every parameter stays in the graph (DDP needs no
        # find_unused_parameters), and 0 * finite adds exactly nothing, so the loss is MoCo v2's.
        lam = self.dense_lambda(step)
        loss = self.reduce((1.0 - lam) * loss_global + lam * loss_dense, pair_weights)
        self._keys = k
        self._dense_keys = t_pooled if self.dense_queue_keys == "pooled" else t_pos.reshape(n * s2, dim)
        return {"loss": loss, "loss_global": loss_global.detach().mean(), "loss_dense": loss_dense.detach().mean(),
                "pos_cos": (q.detach() * k).sum(1).mean(), "dense_pos_cos": (r.detach() * t_pos).sum(2).mean()}

    @torch.no_grad()
    def after_step(self, step: int, max_steps: int) -> None:
        super().after_step(step, max_steps)
        update_ema(self.dense_head, self.dense_head_k, self.current_momentum(step, max_steps))
        if self._dense_keys is not None:
            self.dense_queue.enqueue(self._dense_keys)
            self._dense_keys = None


METHOD = DenseCL
