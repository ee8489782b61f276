"""k-means on L2-normalised embeddings, by scikit-learn (a maintained implementation, not ours)."""
from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def kmeans(embeddings: np.ndarray, k: int, seed: int = 0, n_init: int = 3) -> dict:
    """Cluster rows of ``embeddings`` (normalised first: cosine geometry) into ``k`` clusters.

    Returns ``{"assign": int32 [N], "centroids": float32 [k, D], "distance": float32 [N], "inertia": float}``.
    ``k`` larger than the number of rows is an error that names the values.
    """
    from sklearn.cluster import KMeans

    x = l2_normalize(embeddings)
    if len(x) < k:
        raise ValueError(f"cluster.k={k} is larger than the number of images ({len(x)})")
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
    centroids = km.cluster_centers_.astype(np.float32)
    assign = km.labels_.astype(np.int32)
    dist = np.linalg.norm(x - centroids[assign], axis=1).astype(np.float32)
    return {"assign": assign, "centroids": centroids, "distance": dist, "inertia": float(km.inertia_)}


def cluster_sizes(assign: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(np.asarray(assign), minlength=k)
