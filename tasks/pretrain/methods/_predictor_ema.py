"""The shared shape of BYOL and MoCo v3: an online network backbone -> projector -> predictor, a momentum
network that is an EMA copy of backbone + projector (no gradient, no predictor), two views, a symmetric
loss ``l(p1, z2) + l(p2, z1)`` per image, and the momentum ramped from ``momentum`` to 1 by half-cosine over
``max_steps``. A method supplies its heads, its per-pair loss and its views; the file name starts with "_",
so the registry does not list it as a method.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tasks.pretrain.ema import copy_and_freeze, update_ema
from tasks.pretrain.methods.base import Method
from tasks.pretrain.schedules import cosine_schedule


class PredictorEMA(Method):
    """Online ``predictor(projector(backbone(x)))`` vs momentum ``projector_k(backbone_k(x))``.

    Subclasses build ``projector`` and ``predictor``, then call :meth:`make_momentum_encoder`, and define
    :meth:`pair_loss`. ``momentum`` is the schedule's start value ``m0``:
    ``m_t = 1 - (1 - m0) (1 + cos(pi t / T)) / 2``.
    """

    projector: nn.Module
    predictor: nn.Module

    def __init__(self, backbone: nn.Module, feat_dim: int, *, momentum: float):
        super().__init__(backbone, feat_dim)
        self.momentum = momentum

    def make_momentum_encoder(self) -> None:
        self.backbone_k = copy_and_freeze(self.backbone)
        self.projector_k = copy_and_freeze(self.projector)

    def pair_loss(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Per-image loss ``[B_local]`` of online predictions ``p`` against momentum projections ``z``."""
        raise NotImplementedError

    def online(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.backbone(self.to_layout(x)).flatten(1)))

    @torch.no_grad()
    def momentum_target(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector_k(self.backbone_k(self.to_layout(x)).flatten(1))

    def forward(self, views: list[torch.Tensor], step: int, max_steps: int,
                pair_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x1, x2 = views
        # Target passes first: see "Order of passes" in Method's docstring.
        z1, z2 = self.momentum_target(x1), self.momentum_target(x2)
        p1, p2 = self.online(x1), self.online(x2)
        # Image i's own term is both directions, so the mean over images is the symmetrised loss.
        per_image = self.pair_loss(p1, z2) + self.pair_loss(p2, z1)
        with torch.no_grad():
            pos_cos = 0.5 * (F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean())
        return {"loss": self.reduce(per_image, pair_weights), "pos_cos": pos_cos.detach()}

    def current_momentum(self, step: int, max_steps: int) -> float:
        return cosine_schedule(step, max_steps, self.momentum, 1.0)

    @torch.no_grad()
    def after_step(self, step: int, max_steps: int) -> None:
        m = self.current_momentum(step, max_steps)
        update_ema(self.backbone, self.backbone_k, m)
        update_ema(self.projector, self.projector_k, m)
