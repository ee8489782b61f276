import torch

from tasks.evaluate.linear_probe import linear_probe


def _blobs(n, seed, noise):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(3).repeat_interleave(n)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(123))[y] * 3 + noise * torch.randn(3 * n, 8, generator=g)
    return x, y


def test_separable_gets_perfect_accuracy():
    xtr, ytr = _blobs(40, 0, 0.3)
    xte, yte = _blobs(20, 1, 0.3)
    assert linear_probe(xtr, ytr, xte, yte, epochs=20, lr=0.05, seed=0) == 1.0
    assert linear_probe(xtr, ytr, xte, yte, epochs=50, lr=0.05, seed=0, batch_size=0) == 1.0


def test_deterministic_with_seed():
    xtr, ytr = _blobs(40, 2, 4.0)
    xte, yte = _blobs(40, 3, 4.0)
    a = linear_probe(xtr, ytr, xte, yte, epochs=5, lr=0.05, seed=7, batch_size=16)
    b = linear_probe(xtr, ytr, xte, yte, epochs=5, lr=0.05, seed=7, batch_size=16)
    assert a == b and 0.0 <= a <= 1.0
