"""The differentiable sorting network NeCo ranks with (tasks/pretrain/losses/sorting.py)."""
from __future__ import annotations

import pytest
import torch

from tasks.pretrain.losses.sorting import bitonic_layers, odd_even_layers, soft_sort


@pytest.mark.parametrize("network", ["bitonic", "odd_even"])
@pytest.mark.parametrize("n", [1, 2, 5, 16, 49])
def test_soft_permutations_are_doubly_stochastic_and_sort_the_values(network, n):
    torch.manual_seed(n)
    x = torch.randn(6, n, dtype=torch.float64)
    for steepness in (1.0, 10.0, 100.0):
        values, p = soft_sort(x, steepness, network)
        assert p.shape == (6, n, n) and (p >= 0).all()
        torch.testing.assert_close(p.sum(1), torch.ones(6, n, dtype=torch.float64))  # each rank: weights sum to 1
        torch.testing.assert_close(p.sum(2), torch.ones(6, n, dtype=torch.float64))  # each input: spread sums to 1
        torch.testing.assert_close(values, torch.einsum("rj,rjk->rk", x, p))


@pytest.mark.parametrize("network", ["bitonic", "odd_even"])
@pytest.mark.parametrize("distribution", ["cauchy", "logistic"])
def test_high_steepness_is_the_hard_sort(network, distribution):
    torch.manual_seed(0)
    x = torch.randn(20, 49, dtype=torch.float64)
    values, p = soft_sort(x, 1e9, network, distribution)  # cauchy has heavy tails
    order = x.argsort(1)
    hard = torch.zeros_like(p)  # hard[r, order[r, k], k] = 1
    hard[torch.arange(20).unsqueeze(1), order, torch.arange(49).unsqueeze(0)] = 1.0
    assert torch.equal(p.argmax(1), order)
    torch.testing.assert_close(p, hard, atol=1e-3, rtol=0)
    torch.testing.assert_close(values, x.sort(1).values, atol=1e-4, rtol=0)


def test_low_steepness_is_nearly_uniform_and_steepness_sharpens():
    torch.manual_seed(1)
    x = torch.rand(8, 16, dtype=torch.float64) * 0.1
    peaks = [soft_sort(x, s)[1].amax(1).mean().item() for s in (0.01, 1.0, 100.0, 1e6)]
    assert peaks == sorted(peaks) and peaks[0] < 1 / 16 + 0.01 and peaks[-1] > 0.99


def test_networks_sort_every_zero_one_input():
    """0-1 principle: a comparator network sorts every input iff it sorts every 0/1 input."""
    for n in (3, 5, 6, 7, 8):
        bits = torch.tensor([[(i >> j) & 1 for j in range(n)] for i in range(2 ** n)], dtype=torch.float64)
        for layers in (bitonic_layers(n), odd_even_layers(n)):
            x = bits.clone()
            for lo, hi in layers:
                a, b = x[:, list(lo)], x[:, list(hi)]
                x[:, list(lo)], x[:, list(hi)] = torch.minimum(a, b), torch.maximum(a, b)
            assert torch.equal(x, bits.sort(1).values), n


def test_bitonic_depth_is_log_squared():
    assert len(bitonic_layers(64)) == 21 and len(bitonic_layers(49)) == 21 and len(odd_even_layers(49)) == 49


@pytest.mark.parametrize("network", ["bitonic", "odd_even"])
def test_agrees_with_the_diffsort_package(network):
    diffsort = pytest.importorskip("diffsort")
    torch.manual_seed(2)
    for n in (7, 49):
        x = torch.randn(4, n)
        ours = soft_sort(x, 100.0, network)
        ref = diffsort.DiffSortNet(network, n, steepness=100.0)(x)  # its default relaxation: cauchy
        torch.testing.assert_close(ours[0], ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours[1], ref[1], atol=1e-5, rtol=1e-5)


def test_gradients_flow_and_are_finite():
    x = torch.randn(3, 49, requires_grad=True)
    _, p = soft_sort(x, 100.0)
    target = soft_sort(torch.randn(3, 49), 100.0)[1]
    (-(target * p.clamp_min(1e-8).log()).sum()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    torch.autograd.gradcheck(lambda v: soft_sort(v, 3.0)[1], torch.randn(2, 6, dtype=torch.float64, requires_grad=True))


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="rows of a"):
        soft_sort(torch.randn(4))
    with pytest.raises(ValueError, match="sorting network"):
        soft_sort(torch.randn(2, 4), network="merge")
    with pytest.raises(ValueError, match="relaxation"):
        soft_sort(torch.randn(2, 4), distribution="gauss")
