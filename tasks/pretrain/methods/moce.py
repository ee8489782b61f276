"""MoCE (Liu, Chen et al., ICLR 2023, arXiv 2402.05382), per METHODS.md 4: an MAE whose selected ViT MLPs
are mixtures of experts routed by the image's *cluster*, not by each token. No official code exists; every
choice below is ours and marked as such.

Routing: the cluster stage assigns each image to a k-means cluster of its embedding; the centroids (its
input, recorded in lineage) are a buffer of this method. For an image of cluster c, each MoE layer l has
its own gate ``G_l(x) = softmax(W_l e_c)`` over E experts and keeps the top-k (default top-1); every token of
the image goes to the same expert(s), and a layer's output is ``sum_k G_k Expert_k(h)``.

Choices [unverified in METHODS.md 4.3]: E = 8 experts, top-1, MoE in every other block starting with the
second (V-MoE's placement); experts start as copies of the block's own MLP (so a dense MAE/timm checkpoint
"upcycles" into them). Two regularisers, each weighted 0.01: (a) load balance, the squared coefficient of
variation of the experts' summed gate values over the global batch (Shazeer et al. / V-MoE importance
loss); (b) gate confidence, the mean entropy of the images' gate distributions (low: each cluster decides
for one expert; (a) keeps the experts used evenly). Loss = MAE loss + 0.01 (a) + 0.01 (b).

The exported encoder (``encoder()``) is a dense ViT of ordinary size: per MoE layer the expert with the
largest routed mass over the training images seen (a running count), its mean gate weight folded into its
output layer; ``tasks.evaluate.expert_search`` picks the experts for a downstream set instead (METHODS.md
4.2 item 5).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from tasks.pretrain.distributed import all_gather_with_grad, all_reduce_sum_nograd
from tasks.pretrain.methods.mae import MAE


class ClusterMoE(nn.Module):
    """E expert MLPs; ``route = (expert index [B, k], weight [B, k])`` is set per forward by the method, so all
    tokens of image b go to the same experts."""

    def __init__(self, mlp: nn.Module, num_experts: int):
        super().__init__()
        self.experts = nn.ModuleList(copy.deepcopy(mlp) for _ in range(num_experts))
        self.route: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.route is None:
            raise RuntimeError("ClusterMoE called without a route (the method sets it per batch)")
        index, weight = self.route
        out = None
        for j in range(index.shape[1]):
            # images sorted by expert, one contiguous chunk per expert, then back to batch order
            order = torch.argsort(index[:, j], stable=True)
            counts = torch.bincount(index[:, j], minlength=len(self.experts)).tolist()
            chunks = h[order].split(counts)
            y = torch.cat([e(c) for e, c, n in zip(self.experts, chunks, counts) if n])
            y = (y * weight[order, j, None, None].to(y.dtype))[torch.argsort(order)]
            out = y if out is None else out + y
        return out


def routed_totals(probs: list[torch.Tensor], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per MoE layer and expert, the summed top-k gate weight (routed mass) and the number of images routed,
    over the images whose gate distributions ``probs`` (one ``[B, E]`` per layer) are given: ``[L, E]`` each."""
    num_experts = probs[0].shape[1]
    mass = torch.zeros(len(probs), num_experts, device=probs[0].device)
    count = torch.zeros_like(mass)
    for row, p in enumerate(probs):
        w, idx = p.detach().float().topk(top_k, dim=-1)
        mass[row].index_add_(0, idx.flatten(), w.flatten())
        count[row].index_add_(0, idx.flatten(), torch.ones_like(w.flatten()))
    return mass, count


def pick_experts(mass: torch.Tensor, count: torch.Tensor) -> tuple[list[int], list[float]]:
    """Per layer the expert with the largest routed mass and its mean gate weight (1.0 where nothing was routed)."""
    experts = mass.argmax(dim=1)
    rows = torch.arange(len(experts))
    scales = mass[rows, experts] / count[rows, experts].clamp_min(1)
    return experts.tolist(), [float(x) if x > 0 else 1.0 for x in scales]


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation ``var / mean^2`` (population variance); 0 for one element."""
    if x.numel() <= 1:
        return x.sum() * 0
    return x.var(unbiased=False) / (x.mean() ** 2 + eps)


class MoCE(MAE):
    needs_clusters = True  # the trainer passes the cluster stage's centroids and each image's cluster id
    sparse_parameters = True  # an expert no image of this rank's batch routes to gets no gradient this step

    def __init__(self, backbone: nn.Module, feat_dim: int, *, centroids: torch.Tensor | None = None,
                 num_clusters: int = 0, centroid_dim: int = 0, num_experts: int = 8, top_k: int = 1,
                 moe_layers: tuple | None = None, balance_weight: float = 0.01, confidence_weight: float = 0.01,
                 **mae_kwargs):
        super().__init__(backbone, feat_dim, **mae_kwargs)
        if centroids is None:
            if num_clusters < 1 or centroid_dim < 1:
                raise ValueError("moce needs the cluster stage's centroids (or num_clusters and centroid_dim)")
            centroids = torch.zeros(num_clusters, centroid_dim)
        centroids = torch.as_tensor(centroids, dtype=torch.float32)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"moce: top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.register_buffer("centroids", F.normalize(centroids, dim=1))
        depth = len(backbone.blocks)
        layers = list(range(1, depth, 2)) if moe_layers is None else sorted({int(i) % depth for i in moe_layers})
        if not layers:
            raise ValueError(f"moce: no MoE layer in a {depth}-block ViT")
        self.moe_layers, self.top_k, self.num_experts = layers, int(top_k), int(num_experts)
        for i in layers:
            backbone.blocks[i].mlp = ClusterMoE(backbone.blocks[i].mlp, num_experts)
        self.gates = nn.ModuleList(nn.Linear(centroids.shape[1], num_experts) for _ in layers)
        for g in self.gates:  # small random gates: initial routing differs between clusters but is not decided
            nn.init.normal_(g.weight, std=0.02)
            nn.init.zeros_(g.bias)
        self.balance_weight, self.confidence_weight = float(balance_weight), float(confidence_weight)
        self.register_buffer("routed_mass", torch.zeros(len(layers), num_experts))
        self.register_buffer("routed_count", torch.zeros(len(layers), num_experts))

    def gate_probs(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        """Per MoE layer, the gate distribution ``[B, E]`` for cluster embeddings ``[B, Dc]`` (fp32)."""
        with torch.autocast(embedding.device.type, enabled=False):
            return [g(embedding.float()).softmax(dim=-1) for g in self.gates]

    def forward(self, views, step, max_steps, pair_weights=None, *, keep=None, masked=None, cluster=None):
        if cluster is None:
            raise ValueError("moce: every image needs its cluster id (inputs['cluster'] from the cluster stage)")
        probs = self.gate_probs(self.centroids[cluster])
        for i, p in zip(self.moe_layers, probs):
            w, idx = p.topk(self.top_k, dim=-1)
            self.backbone.blocks[i].mlp.route = (idx, w)
        try:
            out = super().forward(views, step, max_steps, pair_weights, keep=keep, masked=masked)
        finally:
            for i in self.moe_layers:
                self.backbone.blocks[i].mlp.route = None
        balance = sum(cv_squared(all_gather_with_grad(p).sum(0)) for p in probs) / len(probs)
        confidence = sum(-(p * p.clamp_min(1e-12).log()).sum(-1).mean() for p in probs) / len(probs)
        with torch.no_grad():  # routed mass of every rank's images, so the exported choice is global
            mass, count = routed_totals(probs, self.top_k)
            self.routed_mass += all_reduce_sum_nograd(mass)
            self.routed_count += all_reduce_sum_nograd(count)
        out["rec_loss"] = out["loss"].detach()
        out["loss"] = out["loss"] + self.balance_weight * balance + self.confidence_weight * confidence
        out.update(balance_loss=balance.detach(), gate_entropy=confidence.detach())
        return out

    def encoder(self) -> nn.Module:
        """A dense ViT: per MoE layer the expert with the most routed mass so far, scaled by its mean gate weight."""
        return self.dense(*pick_experts(self.routed_mass.cpu(), self.routed_count.cpu()))

    def dense(self, experts: list[int], scales: list[float] | None = None) -> nn.Module:
        """The backbone with MoE layer ``moe_layers[j]`` replaced by its expert ``experts[j]``: a plain timm ViT
        of ordinary size (the state-dict keys of the architecture built by name). ``scales[j]``, the gate
        weight that expert gets for the images at hand, is folded into its output layer, so for an image
        routed to the chosen experts with those weights the dense ViT computes exactly what the MoE does."""
        if len(experts) != len(self.moe_layers):
            raise ValueError(f"one expert per MoE layer ({len(self.moe_layers)}), got {len(experts)}")
        scales = scales or [1.0] * len(experts)
        vit = copy.deepcopy(self.backbone)
        for i, e, w in zip(self.moe_layers, experts, scales):
            mlp = copy.deepcopy(self.backbone.blocks[i].mlp.experts[int(e)])
            with torch.no_grad():
                mlp.fc2.weight.mul_(w)
                if mlp.fc2.bias is not None:
                    mlp.fc2.bias.mul_(w)
            vit.blocks[i].mlp = mlp
        return vit


METHOD = MoCE
