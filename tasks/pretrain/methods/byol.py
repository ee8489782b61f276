"""BYOL (Grill et al., NeurIPS 2020, arXiv 2006.07733), per METHODS.md 7.3.

Online network = backbone + projector + predictor; target network = EMA copy of backbone + projector (no
gradient). Each view's prediction regresses the other view's target projection:
``||p̄ - z̄'||² = 2 - 2 cos(p, z')`` per direction, symmetrised. No negatives, so nothing is gathered
across ranks (only the heads' BN statistics, when they are made cross-rank).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tasks.data.transforms import Augment, byol_views
from tasks.pretrain.ema import copy_and_freeze, update_ema
from tasks.pretrain.heads import MLPHead
from tasks.pretrain.methods.base import Method
from tasks.pretrain.schedules import cosine_schedule


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


class BYOL(Method):
    """BYOL per METHODS.md 7.3: projector feat->4096->256, predictor 256->4096->256, target EMA with
    ``tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2`` over ``max_steps``.

    ``momentum`` is tau_base. The paper ties it to the run length (0.996 for 1000 epochs, 0.99 for
    100/300, 0.97 for 40); the default is the 100/300-epoch value.
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, *, hidden_dim: int = 4096, out_dim: int = 256,
                 momentum: float = 0.99):
        super().__init__(backbone, feat_dim)
        self.momentum = momentum
        self.projector = byol_mlp(feat_dim, hidden_dim, out_dim)
        self.predictor = byol_mlp(out_dim, hidden_dim, out_dim)
        self.backbone_t = copy_and_freeze(self.backbone)
        self.projector_t = copy_and_freeze(self.projector)

    def online(self, x: torch.Tensor) -> torch.Tensor:
        """Online prediction q = predictor(projector(backbone(x)))."""
        return self.predictor(self.projector(self.backbone(x).flatten(1)))

    @torch.no_grad()
    def target(self, x: torch.Tensor) -> torch.Tensor:
        """Target projection z' = EMA projector(EMA backbone(x)), no gradient."""
        return self.projector_t(self.backbone_t(x).flatten(1))

    def forward(self, views: list[torch.Tensor], step: int, max_steps: int,
                pair_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x1, x2 = views
        p1, p2 = self.online(x1), self.online(x2)
        z1, z2 = self.target(x1), self.target(x2)
        # Image i's own term is both directions, so the mean over images is L + L~ of the paper.
        per_image = byol_regression(p1, z2) + byol_regression(p2, z1)
        with torch.no_grad():
            pos_cos = 0.5 * (F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean())
        return {"loss": self.reduce(per_image, pair_weights), "pos_cos": pos_cos.detach()}

    def view_augments(self, size: int) -> list[Augment]:
        return byol_views(size)

    def current_momentum(self, step: int, max_steps: int) -> float:
        return cosine_schedule(step, max_steps, self.momentum, 1.0)

    @torch.no_grad()
    def after_step(self, step: int, max_steps: int) -> None:
        m = self.current_momentum(step, max_steps)
        update_ema(self.backbone, self.backbone_t, m)
        update_ema(self.projector, self.projector_t, m)


METHOD = BYOL
