"""Frozen dense (per-patch) features for the segmentation evaluations (METHODS.md 8.3 and 8.4).

ViT: the output of timm's ``forward_features`` -- the last block's tokens after the final norm -- minus the
``num_prefix_tokens`` class and register tokens, reshaped from raster order to the patch grid. (A ViT built
with ``global_pool="avg"`` and ``fc_norm`` has ``norm = Identity``; its patch tokens are then un-normalised.)
CNN (timm ResNet, :class:`~tasks.models.backbone.TinyConvNet`): the ``forward_features`` map.
"""
from __future__ import annotations

import torch
from torch import nn

from tasks.models.backbone import extract_features
from tasks.models.vit import is_vit, patch_size


def _patch_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model.forward_features(x)
    if out.ndim == 4:
        return out
    if out.ndim != 3 or not is_vit(model):
        raise ValueError(f"{type(model).__name__}.forward_features gave shape {tuple(out.shape)}; expected a "
                         f"[B, D, h, w] map or a timm ViT's [B, tokens, D]")
    p = patch_size(model)
    h, w = x.shape[-2] // p, x.shape[-1] // p
    tokens = out[:, model.num_prefix_tokens:]
    if tokens.shape[1] != h * w:
        raise ValueError(f"{tokens.shape[1]} patch tokens do not fill the {h}x{w} grid of a "
                         f"{x.shape[-2]}x{x.shape[-1]} input with {p} px patches")
    return tokens.transpose(1, 2).reshape(out.shape[0], out.shape[2], h, w)


@torch.no_grad()
def dense_features(encoder: nn.Module, images: torch.Tensor, batch_size: int = 32,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Frozen features ``[N, D, h, w]`` (float32, on CPU), computed in eval mode in batches.

    uint8 images (``NxHxWx3`` or ``Nx3xHxW``, tensor or array) are normalised with the ImageNet statistics of
    :func:`~tasks.models.backbone.normalize`; float images (either layout) are taken as already normalised.
    A ViT must be given its ``img_size`` unless it was built with ``dynamic_img_size``. The train/eval mode
    is restored.
    Memory: ``N * D * h * w * 4`` bytes (367 images, ViT-S/16 at 448 px: 0.44 GB).
    """
    if not len(images):
        raise ValueError("dense_features got no images")
    return extract_features(encoder, images, batch_size, device, forward=lambda x: _patch_map(encoder, x))
