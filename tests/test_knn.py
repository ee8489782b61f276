import math

import torch

from tasks.evaluate.knn import knn_accuracy, knn_predict


def test_weighted_vote_hand_computed():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[2.0, 0.0]])  # normalised inside
    # T = 1: class 0 scores e^1 = 2.72, class 1 e^0.8 + e^0.6 = 4.05 -> the majority wins
    pred, scores = knn_predict(train, labels, test, k=3, T=1.0, num_classes=2, return_scores=True)
    assert pred.tolist() == [1]
    assert torch.allclose(scores[0], torch.tensor([math.e, math.exp(0.8) + math.exp(0.6)]), rtol=1e-5)
    # T = 0.07: the single closest neighbour dominates
    assert knn_predict(train, labels, test, k=3, T=0.07, num_classes=2).tolist() == [0]
    # k = 1 only looks at the closest
    assert knn_predict(train, labels, torch.tensor([[0.6, 0.8]]), k=1).tolist() == [1]


def test_separable_clusters_and_chunking():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(4) * 5
    train = torch.cat([c + 0.3 * torch.randn(30, 4, generator=g) for c in centers])
    test = torch.cat([c + 0.3 * torch.randn(10, 4, generator=g) for c in centers])
    ytr, yte = torch.arange(4).repeat_interleave(30), torch.arange(4).repeat_interleave(10)
    assert knn_accuracy(train, ytr, test, yte, k=20, T=0.07, chunk_size=7) == 1.0
    assert torch.equal(knn_predict(train, ytr, test, chunk_size=7), knn_predict(train, ytr, test, chunk_size=1000))


def test_k_larger_than_train_set():
    train, labels = torch.eye(2), torch.tensor([0, 1])
    assert knn_predict(train, labels, torch.tensor([[1.0, 0.1]]), k=20).tolist() == [0]
