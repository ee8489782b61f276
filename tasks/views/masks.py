"""Foreground masks from the first principal direction of ViT patch tokens (GenView, METHODS.md 1.2).

1. patch tokens t_j of a ViT (prefix tokens dropped);
2. u = first principal direction of the mean-centred tokens of a sample of the dataset;
3. score s_j = t_j . u on the *raw* (un-centred) token, as the GenView code does;
4. one global threshold alpha: the (1 - foreground_fraction) quantile of the sample's scores, so that
   about ``foreground_fraction`` of all patches are foreground (GenView README: ~40 %);
5. mask = s_j > alpha, upsampled (nearest) to the image size.

Sign rule (an eigenvector's sign is arbitrary): u is flipped so that patches on the image border score
lower on average than interior patches -- photographs and our built-in sample put objects inside the frame,
so the border is mostly background. The rule makes the mask polarity deterministic between runs.
"""
from __future__ import annotations

import numpy as np
import torch

from tasks.data.images import batch_to_array, mask_to_png
from tasks.models.backbone import normalize


def build_vit(name: str, checkpoint: str = "", resolution: int = 224, **kwargs) -> torch.nn.Module:
    import timm

    from tasks.models.backbone import load_checkpoint

    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=resolution, **kwargs)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model.eval()


@torch.no_grad()
def patch_tokens(model: torch.nn.Module, images_u8: np.ndarray) -> torch.Tensor:
    """uint8 ``N x H x W x 3`` -> patch tokens ``N x h x w x D`` (prefix/register tokens dropped)."""
    x = normalize(torch.from_numpy(images_u8))
    tokens = model.forward_features(x)
    tokens = tokens[:, getattr(model, "num_prefix_tokens", 1):]
    gh, gw = model.patch_embed.grid_size
    return tokens.reshape(len(x), gh, gw, -1).float()


def border_mask(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = True
    return m


def fit_direction(tokens: torch.Tensor, foreground_fraction: float) -> tuple[np.ndarray, float, dict]:
    """tokens ``N x h x w x D`` of the PCA sample -> (unit direction u [D], threshold alpha, stats)."""
    n, h, w, d = tokens.shape
    flat = tokens.reshape(-1, d).double()
    centred = flat - flat.mean(0, keepdim=True)
    cov = centred.T @ centred / max(1, len(flat) - 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    u = evecs[:, -1]
    scores = (flat @ u).reshape(n, h, w).numpy()
    border = border_mask(h, w)
    flipped = False
    if h > 2 and w > 2 and scores[:, border].mean() > scores[:, ~border].mean():
        u, scores, flipped = -u, -scores, True
    alpha = float(np.quantile(scores, 1.0 - foreground_fraction))
    stats = {"explained_variance": float(evals[-1] / evals.sum().clamp_min(1e-12)), "flipped": flipped,
             "border_score": float(scores[:, border].mean()), "interior_score": float(scores[:, ~border].mean())}
    return u.float().numpy(), alpha, stats


def score_maps(tokens: torch.Tensor, u: np.ndarray) -> np.ndarray:
    return (tokens @ torch.as_tensor(np.array(u, np.float32))).numpy()  # a copy: u may be read-only (Arrow)


def upsample_nearest(grid: np.ndarray, size: int) -> np.ndarray:
    h, w = grid.shape
    rows = (np.arange(size) * h // size)
    cols = (np.arange(size) * w // size)
    return grid[rows][:, cols]


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 1.0


class MaskPredictor:
    """Callable class for a Ray Data actor pool: batch {id, image} -> {id, mask (PNG), fg_ratio}."""

    def __init__(self, encoder: str, direction: np.ndarray, alpha: float, resolution: int, checkpoint: str = "",
                 encoder_kwargs: dict | None = None, seed: int = 0, threads: int = 1):
        torch.set_num_threads(threads)
        torch.manual_seed(seed)  # a random-init encoder must equal the one the direction was fitted with
        self.model = build_vit(encoder, checkpoint, resolution, **(encoder_kwargs or {}))
        self.u, self.alpha, self.resolution = np.asarray(direction, np.float32), float(alpha), resolution

    def __call__(self, batch: dict) -> dict:
        imgs = batch_to_array(list(batch["image"]), self.resolution)
        grids = score_maps(patch_tokens(self.model, imgs), self.u) > self.alpha
        masks = [mask_to_png(upsample_nearest(g, self.resolution)) for g in grids]
        return {"id": np.asarray(batch["id"]), "mask": masks, "fg_ratio": grids.reshape(len(grids), -1).mean(1)}
