"""Frozen-encoder classification metrics on the labelled split: kNN (k=20, T=0.07) and a linear probe."""
from __future__ import annotations

import numpy as np
import torch

from tasks.evaluate.knn import knn_accuracy
from tasks.evaluate.linear_probe import linear_probe
from tasks.models.backbone import extract_features


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, ``test_fraction`` of the indices (at least one) go to the test side."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = max(1, int(round(len(idx) * test_fraction))) if len(idx) > 1 else 0
        test += idx[:n_test].tolist()
        train += idx[n_test:].tolist()
    return np.sort(train), np.sort(test)


def evaluate_encoder(encoder: torch.nn.Module, images: np.ndarray, labels: np.ndarray, *, k: int = 20,
                     temperature: float = 0.07, test_fraction: float = 0.3, linear_epochs: int = 100,
                     linear_lr: float = 0.1, seed: int = 0, batch_size: int = 128) -> dict:
    """images uint8 ``N x H x W x 3``, integer labels ``N`` -> {"knn_top1", "linear_top1", sizes}."""
    train, test = stratified_split(labels, test_fraction, seed)
    feats = extract_features(encoder, images, batch_size=batch_size)
    y = torch.from_numpy(labels.astype(np.int64))
    num_classes = int(labels.max()) + 1
    knn = knn_accuracy(feats[train], y[train], feats[test], y[test], k=k, T=temperature, num_classes=num_classes)
    lin = linear_probe(feats[train], y[train], feats[test], y[test], epochs=linear_epochs, lr=linear_lr, seed=seed,
                       num_classes=num_classes)
    return {"knn_top1": knn, "linear_top1": lin, "n_train": int(len(train)), "n_test": int(len(test))}


def knn_monitor(encoder: torch.nn.Module, images: np.ndarray, labels: np.ndarray, train: np.ndarray,
                test: np.ndarray, *, k: int = 20, temperature: float = 0.07, batch_size: int = 256) -> float:
    """kNN top-1 of the ``test`` images against the ``train`` bank (the online monitor during pretraining)."""
    feats = extract_features(encoder, images, batch_size=batch_size)
    y = torch.from_numpy(labels.astype(np.int64))
    return knn_accuracy(feats[train], y[train], feats[test], y[test], k=k, T=temperature,
                        num_classes=int(labels.max()) + 1)
