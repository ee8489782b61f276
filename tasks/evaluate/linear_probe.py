"""Linear probe: one linear layer on frozen, standardised features (METHODS.md 8.2, scaled down).

On precomputed features there is no augmentation, so this is a fast proxy of the paper protocols (which
train on augmented crops); use it to compare checkpoints, not to reproduce published numbers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, *, epochs: int = 100, lr: float = 1e-2, seed: int = 0,
                 batch_size: int = 256, weight_decay: float = 0.0, num_classes: int | None = None) -> float:
    """Top-1 test accuracy of a linear classifier trained with AdamW + cosine lr on frozen features.

    Features are standardised with train statistics; the layer starts at zero and mini-batches are drawn
    with a generator seeded by ``seed``, so the result is deterministic for a given seed on CPU.
    ``batch_size <= 0`` means full-batch.
    """
    x = train_feats.float()
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True).clamp_min(1e-6)
    x = (x - mean) / std
    xt = (test_feats.float().to(x.device) - mean) / std
    y = train_labels.long().to(x.device)
    C = int(num_classes) if num_classes is not None else int(max(y.max(), test_labels.max())) + 1
    layer = torch.nn.Linear(x.shape[1], C).to(x.device)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    bs = n if batch_size <= 0 else min(batch_size, n)
    steps_per_epoch = math.ceil(n / bs)
    total, step = epochs * steps_per_epoch, 0
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(x.device)
            for i in range(0, n, bs):
                for g in opt.param_groups:
                    g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                idx = order[i:i + bs]
                loss = F.cross_entropy(layer(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    with torch.no_grad():
        pred = layer(xt).argmax(1).cpu()
    return float((pred == test_labels.long().cpu()).float().mean())
