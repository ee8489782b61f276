"""The contract between a pretraining method and the trainer (which never branches on method names)."""
from __future__ import annotations

import torch
from torch import nn

from tasks.data.transforms import Augment, mocov2_views


class Method(nn.Module):
    """backbone + heads + loss. Subclasses: one file each, registered in ``METHODS``.

    ``forward`` runs through DDP, so everything that needs gradients happens inside it; ``after_step`` is
    called on the unwrapped module on every rank after ``optimizer.step()`` (EMA, queues, prototypes).
    ``view_augments`` says which views the data side must build (their order is the order of ``views``).

    ``forward(views, step, max_steps, pair_weights=None)``: ``pair_weights`` ``[B_local]`` (detached, from
    GenView's quality score) turns the loss into ``mean(w_i * l_i)`` over this rank's images, where ``l_i``
    is image i's own loss term (symmetrised over its views where the method is symmetric).
    The trainer sets ``steps_per_epoch`` before the first step (schedules that are stated in epochs).

    ``collate(batch, step, seed)`` is the data side's hook (token masks of MAE, I-JEPA, ...): called in the
    loader thread for the *global* batch, it returns tensors whose first dim is the batch; each rank gets
    the rows of its own images and ``forward`` receives them as keyword arguments.

    Order of passes: a method runs its no-grad passes (momentum key / target encoders) *before* the passes
    that record a graph. The values are the same in either order (the key branch reads nothing the query
    branch writes; EMA updates happen in ``after_step``), but the no-grad pass is slower while the query's
    saved activations are alive: on 2 CPU cores, ResNet-18 (CIFAR stem) at 64 px, batch 32, fp32, a MoCo v2
    step with the key pass first took 0.946x the time of the same step with it second (median over 14
    interleaved rounds; the step went from 1.108x to 1.039x the bare backbone's). The cause was not
    pinned down (memory held by the graph during the no-grad pass is the likely one).
    """

    steps_per_epoch: int | None = None
    # The method's reference recipe decays biases and norm parameters like every weight (the optimiser's
    # default leaves them out: tasks/pretrain/optim.py). pretrain.decay_norm_and_bias: auto reads this.
    decay_norm_and_bias: bool = False

    def __init__(self, backbone: nn.Module, feat_dim: int, **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unknown options: {', '.join(sorted(kwargs))}")
        self.backbone = backbone
        self.feat_dim = feat_dim

    def forward(self, views: list[torch.Tensor], step: int, max_steps: int,
                pair_weights: torch.Tensor | None = None, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``{"loss": scalar tensor, <metric>: detached scalar tensor, ...}``; ``inputs`` are this
        rank's rows of what :meth:`collate` made."""
        raise NotImplementedError

    def collate(self, batch: int, step: int, seed: int) -> dict[str, torch.Tensor]:
        """Per-step inputs besides the views, for the whole global batch (a pure function of the step);
        none by default."""
        return {}

    def view_augments(self, size: int) -> list[Augment]:
        """One :class:`~tasks.data.transforms.Augment` per view ``forward`` expects; default MoCo v2's pair."""
        return mocov2_views(size)

    def to_layout(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the memory layout of the backbone's convolution weights: NHWC when the trainer put the
        method in channels_last (``pretrain.channels_last``), so a caller's NCHW batch never meets NHWC weights
        (oneDNN would then convolve in a slower mixed path). Layout only, same values."""
        if x.ndim != 4:
            return x
        w = getattr(self, "_layout_probe", None)
        if w is None:
            w = next((p for p in self.backbone.parameters() if p.ndim == 4), False)
            self.__dict__["_layout_probe"] = w  # not nn.Module's setattr: that would register a second parameter
        if w is not False and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
            return x.contiguous(memory_format=torch.channels_last)
        return x

    @staticmethod
    def reduce(per_sample: torch.Tensor, pair_weights: torch.Tensor | None) -> torch.Tensor:
        """``mean(l)``, or ``mean(w * l)`` with detached per-image weights."""
        if pair_weights is None:
            return per_sample.mean()
        if pair_weights.shape != per_sample.shape:
            raise ValueError(f"pair_weights {tuple(pair_weights.shape)} != per-sample loss {tuple(per_sample.shape)}")
        return (pair_weights.detach().to(per_sample.dtype) * per_sample).mean()

    @torch.no_grad()
    def after_step(self, step: int, max_steps: int) -> None:
        pass

    def encoder(self) -> nn.Module:
        """The backbone to export and evaluate."""
        return self.backbone
