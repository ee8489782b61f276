"""MoCo v3 (Chen, Xie, He, ICCV 2021, arXiv 2104.02057), per METHODS.md 7.2.

Base encoder = backbone + projector + predictor; momentum encoder = EMA copy of backbone + projector (no
gradient). No queue: the negatives are the other keys of the global batch (keys are all-gathered across
ranks). Symmetric: ``L = ctr(q1, k2) + ctr(q2, k1)`` with ``ctr(q, k) = CE(q k^T / tau, diagonal) * 2 tau``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tasks.data.transforms import Augment, byol_views
from tasks.pretrain.distributed import all_gather_nograd, rank
from tasks.pretrain.ema import copy_and_freeze, update_ema
from tasks.pretrain.heads import MLPHead
from tasks.pretrain.methods.base import Method
from tasks.pretrain.schedules import cosine_schedule


def mocov3_contrastive(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-query ``ctr`` term ``[B_local]`` of MoCo v3 (arXiv 2104.02057 Alg. 1; METHODS.md 7.2).

    ``q`` are this rank's queries, ``k`` its keys (same images, same order, no gradient needed). Keys of
    every rank are gathered, so query i's positive is global key ``rank * B_local + i`` and its negatives
    are the ``world * B_local - 1`` other keys. Scaled by ``2 * tau`` as in the paper (this cancels the
    ``1 / tau`` in the gradient w.r.t. the logits' inputs). The mean over queries is ``ctr(q, k)``.
    """
    # Logits in at least fp32, autocast off: in bf16 the 1/tau-scaled logits would keep ~3 digits.
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(q.to(dtype), dim=1)
        k_all = all_gather_nograd(F.normalize(k.detach().to(dtype), dim=1))
        logits = q @ k_all.t() / temperature
        labels = torch.arange(q.shape[0], device=q.device) + rank() * q.shape[0]
        return F.cross_entropy(logits, labels, reduction="none") * (2.0 * temperature)


def _drop_last_bias(head: MLPHead) -> MLPHead:
    """MoCo v3's MLPs have no bias in any Linear (moco-v3 builder.py); :class:`MLPHead` keeps one on a last
    Linear that is not followed by BN (the ResNet predictor), so replace that layer by a bias-free one."""
    last = head[-1]
    if isinstance(last, nn.Linear) and last.bias is not None:
        head[-1] = nn.Linear(last.in_features, last.out_features, bias=False)
    return head


def mocov3_projector(feat_dim: int, hidden_dim: int, out_dim: int, vit: bool) -> MLPHead:
    """Linear (no bias) + BN + ReLU between layers, last BN without affine; 3 layers for ViT, 2 for CNNs."""
    dims = [feat_dim] + [hidden_dim] * (2 if vit else 1) + [out_dim]
    return MLPHead(dims, batch_norm=True, last_bn=True, last_bn_affine=False)


def mocov3_predictor(out_dim: int, hidden_dim: int, vit: bool) -> MLPHead:
    """2 layers; the ViT predictor ends with an affine-free BN, the ResNet one with a bare Linear."""
    return _drop_last_bias(MLPHead([out_dim, hidden_dim, out_dim], batch_norm=True, last_bn=vit,
                                   last_bn_affine=False))


class MoCoV3(Method):
    """MoCo v3 per METHODS.md 7.2: projector feat->4096->256 (ViT: feat->4096->4096->256), predictor
    256->4096->256, momentum 0.99 -> 1 by half-cosine over ``max_steps``, in-batch negatives.

    ``vit=None`` detects a ViT by the backbone having ``patch_embed`` (timm's ViTs do, CNNs do not).
    ``temperature=None`` picks the paper's values: 1.0 for CNNs (moco-v3 code default), 0.2 for ViTs
    (the ViT commands in moco-v3 CONFIG.md). ``freeze_patch_embed=None`` means "on for ViTs": the patch
    projection keeps its random initialisation (``--stop-grad-conv1``, the paper's "random patch
    projection"), which the paper reports alleviates the training instability of ViTs. The fixed sin-cos
    position embedding and patch-projection initialisation of the official ``vits.py`` are not reproduced:
    the backbone is used as built.
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, *, hidden_dim: int = 4096, out_dim: int = 256,
                 temperature: float | None = None, momentum: float = 0.99, vit: bool | None = None,
                 freeze_patch_embed: bool | None = None):
        super().__init__(backbone, feat_dim)
        self.vit = hasattr(backbone, "patch_embed") if vit is None else bool(vit)
        self.temperature = (0.2 if self.vit else 1.0) if temperature is None else float(temperature)
        self.momentum = momentum
        self.freeze_patch_embed = self.vit if freeze_patch_embed is None else bool(freeze_patch_embed)
        if self.freeze_patch_embed:
            patch_embed = getattr(backbone, "patch_embed", None)
            if patch_embed is None:
                raise ValueError("freeze_patch_embed=True needs a backbone with a `patch_embed` (a ViT)")
            # Only the linear patch projection, as --stop-grad-conv1 does (a norm after it, if any, trains).
            getattr(patch_embed, "proj", patch_embed).requires_grad_(False)
        self.projector = mocov3_projector(feat_dim, hidden_dim, out_dim, self.vit)
        self.predictor = mocov3_predictor(out_dim, hidden_dim, self.vit)
        self.backbone_k = copy_and_freeze(self.backbone)
        self.projector_k = copy_and_freeze(self.projector)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Base encoder: backbone -> projector -> predictor (unnormalised)."""
        return self.predictor(self.projector(self.backbone(x).flatten(1)))

    @torch.no_grad()
    def key(self, x: torch.Tensor) -> torch.Tensor:
        """Momentum encoder: EMA backbone -> EMA projector (unnormalised, no gradient)."""
        return self.projector_k(self.backbone_k(x).flatten(1))

    def forward(self, views: list[torch.Tensor], step: int, max_steps: int,
                pair_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x1, x2 = views
        q1, q2 = self.query(x1), self.query(x2)
        k1, k2 = self.key(x1), self.key(x2)
        # Image i's own term: both directions, so mean over images == ctr(q1, k2) + ctr(q2, k1).
        per_image = (mocov3_contrastive(q1, k2, self.temperature)
                     + mocov3_contrastive(q2, k1, self.temperature))
        with torch.no_grad():
            pos_cos = 0.5 * (F.cosine_similarity(q1, k2).mean() + F.cosine_similarity(q2, k1).mean())
        return {"loss": self.reduce(per_image, pair_weights), "pos_cos": pos_cos.detach()}

    def view_augments(self, size: int) -> list[Augment]:
        # Crop scale (0.2, 1) as in the reference commands of moco-v3 CONFIG.md (the code default is 0.08).
        return byol_views(size, min_scale=0.2)

    def current_momentum(self, step: int, max_steps: int) -> float:
        """``m_t = 1 - (1 - m0) (1 + cos(pi t / T)) / 2`` (METHODS.md 7.2)."""
        return cosine_schedule(step, max_steps, self.momentum, 1.0)

    @torch.no_grad()
    def after_step(self, step: int, max_steps: int) -> None:
        m = self.current_momentum(step, max_steps)
        update_ema(self.backbone, self.backbone_k, m)
        update_ema(self.projector, self.projector_k, m)


METHOD = MoCoV3
