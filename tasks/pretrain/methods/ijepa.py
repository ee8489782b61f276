"""I-JEPA (Assran et al., CVPR 2023, arXiv 2301.08243), per METHODS.md 6.

From one large context block of an image, a narrow predictor predicts the target-encoder features of 4
target blocks. Masks: multi-block sampling on the data side (``collate``, :class:`MultiBlockMasks`). Context
encoder = the backbone on the context patches only; target encoder = an EMA copy of it on the whole image,
its outputs layer-normalised over the feature dimension without affine parameters; momentum linear from
0.996 to 1 over the run. One predictor pass per target block (the batch repeated 4 times).

Choices: the loss is the released code's smooth-L1 (beta 1) averaged over elements (``loss="l2"`` gives the
paper's squared L2 averaged over elements instead). Predictor width: by default 384 (the released configs)
but at most half the encoder's width -- "narrow": the released 384 is 0.3x ViT-H's width and 0.5x ViT-B's, so
ViT-S gets 192 (at 384, as wide as the encoder, a ViT-S I-JEPA step costs 1.31x MAE's on the bench; at 192
about the paper's 1.07); an explicit ``predictor_dim`` is only capped at the encoder's width. Depth 6 (the
code default; the ViT-H configs use 12). Image i's own term is the mean
over its 4 targets; all images have the same mask sizes, so the batch loss is the mean of those terms.
A timm ViT with a class token is allowed (the token is encoded with the context, nothing is predicted for
it); for evaluation I-JEPA pools patch tokens, so ``backbone_kwargs: {class_token: false, global_pool: avg}``
is the faithful encoder (with ``fc_norm: false``: tokens layer-normed, then averaged).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tasks.data.masking import MultiBlockMasks, step_generator
from tasks.data.transforms import Augment, crop_views
from tasks.models.vit import (TokenPredictor, capped_width, check_input, gather_tokens, num_heads_of, patch_grid,
                              require_vit, vit_tokens)
from tasks.pretrain.ema import copy_and_freeze, update_ema
from tasks.pretrain.methods.base import Method
from tasks.pretrain.schedules import linear_schedule


class IJEPA(Method):
    def __init__(self, backbone: nn.Module, feat_dim: int, *, predictor_dim: int | None = None, predictor_depth: int = 6,
                 predictor_heads: int | None = None, momentum: float = 0.996, loss: str = "smooth_l1",
                 num_targets: int = 4, pred_scale: tuple = (0.15, 0.2), enc_scale: tuple = (0.85, 1.0),
                 aspect: tuple = (0.75, 1.5), min_keep: int = 10):
        super().__init__(backbone, feat_dim)
        require_vit(backbone, "ijepa")
        if loss not in ("smooth_l1", "l2"):
            raise ValueError(f"ijepa: loss must be smooth_l1 or l2, got {loss!r}")
        self.loss_name, self.momentum = loss, float(momentum)
        self.masks = MultiBlockMasks(patch_grid(backbone), enc_scale=tuple(enc_scale), pred_scale=tuple(pred_scale),
                                     aspect=tuple(aspect), num_targets=int(num_targets), min_keep=int(min_keep))
        heads = predictor_heads or num_heads_of(backbone)  # the encoder's head count, as in the code
        d = backbone.embed_dim
        width = min(384, d // 2) if predictor_dim is None else predictor_dim
        self.predictor = TokenPredictor(d, self.masks.grid, capped_width(d, width, heads), predictor_depth,
                                        heads, d)
        self.target_encoder = copy_and_freeze(backbone)

    def view_augments(self, size: int) -> list[Augment]:
        return crop_views(size, (0.3, 1.0), flip=False)

    def collate(self, batch: int, step: int, seed: int) -> dict[str, torch.Tensor]:
        # block sizes: one draw per step for the whole (global) batch; positions: per image
        context, targets = self.masks(batch, step_generator(seed, step, 0), step_generator(seed, step, 1))
        return {"context": context[:, 0], "targets": targets}

    @torch.no_grad()
    def target_features(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Layer-normalised target-encoder features of the target blocks: ``[B * M, T, D]``, block-major per image."""
        _, h = vit_tokens(self.target_encoder, x)
        h = F.layer_norm(h.float(), (h.shape[-1],))
        b, m, t = targets.shape
        return gather_tokens(h, targets.reshape(b, m * t)).reshape(b * m, t, -1)

    def forward(self, views, step, max_steps, pair_weights=None, *, context=None, targets=None):
        (x,) = views
        check_input(self.backbone, x, "ijepa")
        if context is None:  # a direct call without the data side's masks: draw them here
            c, targets = self.masks(len(x), step_generator(0, step, 0), step_generator(0, step, 1))
            context, targets = c[:, 0].to(x.device), targets.to(x.device)
        x = self.to_layout(x)
        goal = self.target_features(x, targets)
        _, z = vit_tokens(self.backbone, x, context)
        b, m, t = targets.shape
        pred = self.predictor(z.repeat_interleave(m, 0), context.repeat_interleave(m, 0), targets.reshape(b * m, t))
        err = F.smooth_l1_loss(pred.float(), goal, reduction="none", beta=1.0) if self.loss_name == "smooth_l1" \
            else (pred.float() - goal) ** 2
        per_image = err.mean(dim=(1, 2)).view(b, m).mean(1)
        return {"loss": self.reduce(per_image, pair_weights)}

    @torch.no_grad()
    def after_step(self, step: int, max_steps: int) -> None:
        update_ema(self.backbone, self.target_encoder, linear_schedule(step, max_steps, self.momentum, 1.0))


METHOD = IJEPA
