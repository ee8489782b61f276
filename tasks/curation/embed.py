"""Embed images with a frozen encoder: a callable class (model loaded once), batch in, batch out."""
from __future__ import annotations

import numpy as np
import torch

from tasks.data.images import batch_to_array
from tasks.models.backbone import build_backbone, extract_features


class Embedder:
    def __init__(self, encoder: str, checkpoint: str = "", resolution: int = 64, cifar_stem: bool = False,
                 seed: int = 0, threads: int = 1, **timm_kwargs):
        torch.set_num_threads(threads)
        torch.manual_seed(seed)  # random-init encoders are reproducible across actors
        self.model, self.dim = build_backbone(encoder, checkpoint=checkpoint, cifar_stem=cifar_stem, **timm_kwargs)
        self.model.eval()
        self.resolution = resolution

    def __call__(self, batch: dict) -> dict:
        images = torch.from_numpy(batch_to_array(list(batch["image"]), self.resolution))
        feats = extract_features(self.model, images, batch_size=len(images)).numpy().astype(np.float32)
        return {"id": np.asarray(batch["id"]), "embedding": list(feats)}
