"""The contract between a pretraining method and the trainer (which never branches on method names)."""
from __future__ import annotations

import torch
from torch import nn


class Method(nn.Module):
    """backbone + heads + loss. Subclasses: one file each, registered in ``METHODS``.

    ``forward`` runs through DDP, so everything that needs gradients happens inside it; ``after_step`` is
    called on the unwrapped module on every rank after ``optimizer.step()`` (EMA, queues, prototypes).
    """

    num_views: int = 2

    def __init__(self, backbone: nn.Module, feat_dim: int, **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unknown options: {', '.join(sorted(kwargs))}")
        self.backbone = backbone
        self.feat_dim = feat_dim

    def forward(self, views: list[torch.Tensor], step: int, max_steps: int) -> dict[str, torch.Tensor]:
        """Return ``{"loss": scalar tensor, <metric>: detached scalar tensor, ...}``."""
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, step: int, max_steps: int) -> None:
        pass

    def encoder(self) -> nn.Module:
        """The backbone to export and evaluate."""
        return self.backbone
