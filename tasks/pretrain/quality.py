"""GenView's quality-driven weighting of positive pairs (Li et al., ECCV 2024; METHODS.md 1.3).

A frozen encoder embeds both augmented views; the image's foreground mask, cropped, resized and flipped
exactly as each view was (the data side carries each view's :class:`~tasks.data.transforms.Geometry`),
pools foreground and background features of each view. A pair whose foregrounds agree more than their
backgrounds is a good positive: ``q_i = cos(fg1_i, fg2_i) - cos(bg1_i, bg2_i)``, and the per-pair loss
terms are weighted by ``w_i = N softmax(gamma q)_i`` (detached, mean 1 over this rank's batch, as the
reference code does per GPU).

[choice] The issue asks for the masks from the masks stage (binary, following the crop geometry) rather than
the reference's soft per-view PCA maps of the frozen encoder's own tokens; both give fg/bg pooling weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2 import functional as TF

from tasks.data.transforms import Geometry


def crop_mask(mask: torch.Tensor, geometry: Geometry, size: int) -> torch.Tensor:
    """``mask [H, W]`` (float 0..1, in the source image's pixel frame) -> ``[size, size]``: the view's crop box,
    resized with the same antialiased resampling as the image, then flipped if the view was."""
    m = TF.resized_crop(mask[None].float(), geometry.top, geometry.left, geometry.height, geometry.width,
                        [size, size], antialias=True)[0]
    return TF.horizontal_flip(m) if geometry.flipped else m


def crop_masks(masks, geometries: list[Geometry], size: int) -> torch.Tensor:
    """Per image ``crop_mask`` -> ``[B, size, size]``."""
    return torch.stack([crop_mask(torch.as_tensor(m), g, size) for m, g in zip(masks, geometries)])


def feature_map(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` from a conv encoder's ``forward_features`` or a ViT's patch tokens (prefix tokens
    such as CLS/registers dropped, square grid assumed)."""
    f = encoder.forward_features(x)
    if f.ndim == 4:
        return f
    if f.ndim != 3:
        raise ValueError(f"expected a feature map or tokens, got shape {tuple(f.shape)}")
    f = f[:, int(getattr(encoder, "num_prefix_tokens", 0)):]
    side = int(math.isqrt(f.shape[1]))
    if side * side != f.shape[1]:
        raise ValueError(f"{f.shape[1]} patch tokens do not form a square grid")
    return f.transpose(1, 2).reshape(f.shape[0], f.shape[2], side, side)


def pooled(feats: torch.Tensor, weights: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``sum_j w_j f_j / sum_j w_j`` over locations: ``[B, C, h, w] x [B, h, w] -> [B, C]``."""
    w = weights.to(feats.dtype).unsqueeze(1)
    return (feats * w).sum((2, 3)) / (w.sum((2, 3)) + eps)


def pair_quality(f1: torch.Tensor, f2: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """``q = cos(fg1, fg2) - cos(bg1, bg2)`` per pair; masks ``[B, H, W]`` are area-resized to the maps."""
    size = f1.shape[-2:]
    m1 = F.adaptive_avg_pool2d(m1.unsqueeze(1).float(), size)[:, 0]
    m2 = F.adaptive_avg_pool2d(m2.unsqueeze(1).float(), size)[:, 0]
    fg = F.cosine_similarity(pooled(f1, m1), pooled(f2, m2), dim=1)
    bg = F.cosine_similarity(pooled(f1, 1 - m1), pooled(f2, 1 - m2), dim=1)
    return fg - bg


def quality_weights(q: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``w = N softmax(gamma q)`` over this rank's batch: mean 1, detached."""
    q = q.detach().float()
    return q.numel() * torch.softmax(gamma * q, dim=0)


class QualityWeighter(nn.Module):
    """The frozen encoder plus the weighting: ``(view1, view2, mask1, mask2) -> (weights [B], q [B])``.

    The encoder is kept in eval mode without gradients (its BN statistics never move) and takes the same
    normalised tensors the trained network gets.
    """

    def __init__(self, encoder: nn.Module, gamma: float = 1.0):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.gamma = gamma

    def train(self, mode: bool = True):  # the frozen encoder stays in eval mode
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def forward(self, v1: torch.Tensor, v2: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor):
        q = pair_quality(feature_map(self.encoder, v1).float(), feature_map(self.encoder, v2).float(), m1, m2)
        return quality_weights(q, self.gamma), q
