"""MoCE's downstream expert search (METHODS.md 4.2 item 5; the procedure is ours where the paper is silent).

The downstream images are embedded with the cluster stage's encoder (the same encoder and centroids MoCE
was trained with), each is assigned to its nearest centroid (cosine, as the k-means ran on L2-normalised
embeddings), and each image's cluster is routed through every MoE layer's gate as in training. Per layer
the expert with the largest routed mass (sum over images of its top-k gate weight) is picked; the chosen
experts and the shared layers form a dense ViT of ordinary size.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tasks.pretrain.methods.moce import pick_experts, routed_totals


def nearest_clusters(embeddings, centroids) -> np.ndarray:
    """Index of each row's nearest centroid by cosine similarity: ``[N]`` int64."""
    e = F.normalize(torch.as_tensor(np.asarray(embeddings), dtype=torch.float32), dim=1)
    c = F.normalize(torch.as_tensor(np.asarray(centroids), dtype=torch.float32), dim=1)
    return (e @ c.t()).argmax(dim=1).numpy()


@torch.no_grad()
def search_experts(moce, embeddings) -> dict:
    """``{"experts": [per MoE layer], "scales": [mean gate weight of each chosen expert], "mass": [layers, E]
    array, "clusters": per-cluster image counts}``; ``moce.dense(r["experts"], r["scales"])`` is the model."""
    clusters = torch.as_tensor(nearest_clusters(embeddings, moce.centroids.cpu()))
    probs = moce.gate_probs(moce.centroids.cpu()[clusters].to(moce.centroids.device))
    mass, count = routed_totals([p.cpu() for p in probs], moce.top_k)
    experts, scales = pick_experts(mass, count)
    return {"experts": experts, "scales": scales, "mass": mass.numpy(),
            "clusters": np.bincount(clusters.numpy(), minlength=len(moce.centroids))}
