"""MAE (He et al., CVPR 2022), per METHODS.md 7.5.

75 % of each image's patches are removed (a per-image random draw made on the data side, ``collate``); the
ViT encodes only the visible 25 %; a light transformer decoder, given the visible tokens and a mask token at
every removed position (fixed sin-cos positions), regresses the removed patches' pixels. The target is each
patch normalised to zero mean and unit variance (``norm_pix_loss``); the loss is the mean squared error over
removed patches only. Every image has the same number of removed patches, so image i's own term is its mean
over its removed patches and the batch loss is the mean of those.

Choices: the decoder sees no class token (MAE's carries it along; nothing is predicted from it). The
encoder is used as built (no re-initialisation to sin-cos position embeddings), so timm weights can start it.
"""
from __future__ import annotations

import torch
from torch import nn

from tasks.data.masking import random_masking, step_generator
from tasks.data.transforms import Augment, crop_views
from tasks.models.vit import (TokenPredictor, check_input, capped_width, gather_tokens, normalize_patches, patch_grid,
                              patch_size, patchify, require_vit, vit_tokens)
from tasks.pretrain.methods.base import Method


class MAE(Method):
    """Defaults are the paper's: mask ratio 0.75, decoder 8 blocks x 512 wide x 16 heads, normalised pixels.
    The decoder width is capped at the encoder's (a ViT-Tiny gets a 192-wide decoder) and rounded down to a
    multiple of 4 and of the heads."""

    def __init__(self, backbone: nn.Module, feat_dim: int, *, mask_ratio: float = 0.75, decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, norm_pix_loss: bool = True):
        super().__init__(backbone, feat_dim)
        require_vit(backbone, "mae")
        self.mask_ratio, self.norm_pix_loss = float(mask_ratio), bool(norm_pix_loss)
        self.grid, self.patch = patch_grid(backbone), patch_size(backbone)
        self.decoder = self.make_decoder(decoder_dim, decoder_depth, decoder_heads)

    def make_decoder(self, dim: int, depth: int, heads: int) -> TokenPredictor:
        return TokenPredictor(self.backbone.embed_dim, self.grid, capped_width(self.backbone.embed_dim, dim, heads),
                              depth, heads, self.patch ** 2 * 3)

    def view_augments(self, size: int) -> list[Augment]:
        return crop_views(size, (0.2, 1.0), flip=True)

    def collate(self, batch: int, step: int, seed: int) -> dict[str, torch.Tensor]:
        keep, masked = random_masking(batch, self.grid[0] * self.grid[1], self.mask_ratio, step_generator(seed, step))
        return {"keep": keep, "masked": masked}

    def targets(self, x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        t = gather_tokens(patchify(x.float(), self.patch), masked)
        return normalize_patches(t) if self.norm_pix_loss else t

    def reconstruct(self, x: torch.Tensor, keep: torch.Tensor, masked: torch.Tensor, blocks=None) -> torch.Tensor:
        """Predicted pixels of the removed patches ``[B, N - K, p * p * 3]``."""
        _, visible = vit_tokens(self.backbone, self.to_layout(x), keep, blocks=blocks)
        return self.decoder(visible, keep, masked)

    def forward(self, views, step, max_steps, pair_weights=None, *, keep=None, masked=None):
        (x,) = views
        check_input(self.backbone, x, "mae")
        if keep is None:  # called without the data side's masks (e.g. a direct call): draw them here
            keep, masked = (t.to(x.device) for t in random_masking(len(x), self.grid[0] * self.grid[1], self.mask_ratio))
        pred = self.reconstruct(x, keep, masked)
        per_image = ((pred.float() - self.targets(x, masked)) ** 2).mean(dim=(1, 2))
        return {"loss": self.reduce(per_image, pair_weights)}


METHOD = MAE
