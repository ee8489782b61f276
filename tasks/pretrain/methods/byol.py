"""BYOL (Grill et al., NeurIPS 2020, arXiv 2006.07733), per METHODS.md 7.3.

Online network = backbone + projector + predictor; target network = EMA copy of backbone + projector (no
gradient; ``backbone_k``/``projector_k``, the shape shared with MoCo v3 in ``_predictor_ema.py``). Each view's prediction regresses the other view's target projection:
``||p̄ - z̄'||² = 2 - 2 cos(p, z')`` per direction, symmetrised. No negatives, so nothing is gathered
across ranks (only the heads' BN statistics, when they are made cross-rank).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tasks.data.transforms import Augment, byol_views
from tasks.pretrain.heads import MLPHead
from tasks.pretrain.methods._predictor_ema import PredictorEMA


def byol_regression(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample ``2 - 2 cos(p, z)`` ``[B]`` (BYOL sec. 3.1), the target ``z`` detached (stop-gradient)."""
    # At least fp32, so that 2 - 2cos keeps its digits when the heads ran in bf16 (autocast runs
    # cosine_similarity in fp32 on CUDA anyway; this also covers other devices).
    dtype = torch.promote_types(p.dtype, torch.float32)
    with torch.autocast(p.device.type, enabled=False):
        return 2.0 - 2.0 * F.cosine_similarity(p.to(dtype), z.detach().to(dtype), dim=1)


def byol_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> MLPHead:
    """BYOL's projector and predictor share one shape: Linear -> BN -> ReLU -> Linear (METHODS.md 7.3)."""
    return MLPHead([in_dim, hidden_dim, out_dim], batch_norm=True)


class BYOL(PredictorEMA):
    """BYOL per METHODS.md 7.3: projector feat->4096->256, predictor 256->4096->256, target EMA with
    ``tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2`` over ``max_steps``.

    ``momentum`` is tau_base. The paper ties it to the run length (0.996 for 1000 epochs, 0.99 for
    100/300, 0.97 for 40); the default is the 100/300-epoch value.
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, *, hidden_dim: int = 4096, out_dim: int = 256,
                 momentum: float = 0.99):
        super().__init__(backbone, feat_dim, momentum=momentum)
        self.projector = byol_mlp(feat_dim, hidden_dim, out_dim)
        self.predictor = byol_mlp(out_dim, hidden_dim, out_dim)
        self.make_momentum_encoder()  # the paper's "target network"

    def pair_loss(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return byol_regression(p, z)

    def view_augments(self, size: int) -> list[Augment]:
        return byol_views(size)


METHOD = BYOL
