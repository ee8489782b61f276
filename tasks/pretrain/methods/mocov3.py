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
from tasks.pretrain.heads import MLPHead
from tasks.pretrain.methods._predictor_ema import PredictorEMA


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


class MoCoV3(PredictorEMA):
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
        super().__init__(backbone, feat_dim, momentum=momentum)
        self.vit = hasattr(backbone, "patch_embed") if vit is None else bool(vit)
        self.temperature = (0.2 if self.vit else 1.0) if temperature is None else float(temperature)
        self.freeze_patch_embed = self.vit if freeze_patch_embed is None else bool(freeze_patch_embed)
        if self.freeze_patch_embed:
            patch_embed = getattr(backbone, "patch_embed", None)
            if patch_embed is None:
                raise ValueError("freeze_patch_embed=True needs a backbone with a `patch_embed` (a ViT)")
            # Only the linear patch projection, as --stop-grad-conv1 does (a norm after it, if any, trains).
            getattr(patch_embed, "proj", patch_embed).requires_grad_(False)
        self.projector = mocov3_projector(feat_dim, hidden_dim, out_dim, self.vit)
        self.predictor = mocov3_predictor(out_dim, hidden_dim, self.vit)
        self.make_momentum_encoder()

    def pair_loss(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return mocov3_contrastive(p, z, self.temperature)

    def view_augments(self, size: int) -> list[Augment]:
        # Crop scale (0.2, 1) as in the reference commands of moco-v3 CONFIG.md (the code default is 0.08).
        return byol_views(size, min_scale=0.2)


METHOD = MoCoV3
