"""Weighted k-NN classification on frozen features (Wu et al. 2018 InstDisc; DINO's eval_knn protocol)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, *,
                k: int = 20, T: float = 0.07, num_classes: int | None = None, chunk_size: int = 1024,
                return_scores: bool = False):
    """Predicted class per test feature: ``argmax_c sum_{i in kNN, y_i = c} exp(cos_i / T)``.

    Features are L2-normalised here (cosine similarity); test features are processed in chunks so memory
    stays ``chunk_size x N_train``. With ``return_scores`` also returns the ``[N_test, C]`` vote scores.
    """
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    labels = train_labels.long().to(train.device)
    C = int(num_classes) if num_classes is not None else int(labels.max()) + 1
    k = min(k, train.shape[0])
    preds, all_scores = [], []
    for i in range(0, test.shape[0], chunk_size):
        sims, idx = (test[i:i + chunk_size].to(train.device) @ train.t()).topk(k, dim=1)
        scores = torch.zeros(sims.shape[0], C, device=train.device)
        scores.scatter_add_(1, labels[idx], (sims / T).exp())
        preds.append(scores.argmax(dim=1))
        if return_scores:
            all_scores.append(scores)
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    if return_scores:
        return pred, (torch.cat(all_scores) if all_scores else torch.empty(0, C))
    return pred


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, **kwargs) -> float:
    """Top-1 accuracy of :func:`knn_predict` (same keyword options)."""
    pred = knn_predict(train_feats, train_labels, test_feats, **kwargs)
    return float((pred.cpu() == test_labels.long().cpu()).float().mean())
