"""GlobalBatchNorm: 2 ranks with half batches == nn.BatchNorm on the whole batch (outputs, input and
parameter gradients, running statistics)."""
from __future__ import annotations

import torch
from torch import nn

from tasks.pretrain.syncbn import GlobalBatchNorm, convert_sync_bn
from tests.dist_harness import ddp_gradients, rank_slice, run_ranks


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 4, 3, 3, generator=g) * 3 + 1, torch.randn(8, 4, 3, 3, generator=g)


def _bn(rank, world):
    torch.manual_seed(0)
    net = convert_sync_bn(nn.Sequential(nn.BatchNorm2d(4)), gpu=False)
    with torch.no_grad():
        net[0].weight.uniform_(0.5, 1.5)
        net[0].bias.uniform_(-1, 1)
    x, w = _data()
    x = rank_slice(x, rank, world).requires_grad_()
    y = net(x)
    (y * rank_slice(w, rank, world)).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "grads": ddp_gradients(net), "rm": net[0].running_mean.clone(),
            "rv": net[0].running_var.clone(), "type": type(net[0]).__name__}


def test_two_ranks_match_plain_batchnorm():
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(4)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    x, w = _data()
    x.requires_grad_()
    y = ref(x)
    (y * w).sum().backward()
    res = run_ranks(_bn, 2)
    assert res[0]["type"] == "GlobalBatchNorm"
    torch.testing.assert_close(torch.cat([r["y"] for r in res]), y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["dx"] for r in res]), x.grad, rtol=1e-4, atol=1e-5)
    # DDP averages parameter gradients over ranks; the objective of rank r is its share of the sum, so
    # the full-batch gradient is world x the average
    torch.testing.assert_close(res[0]["grads"]["0.weight"] * 2, ref.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res[0]["rm"], ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res[0]["rv"], ref.running_var, rtol=1e-5, atol=1e-6)


def test_single_process_is_plain_batchnorm_and_conversion_keeps_state():
    bn = nn.BatchNorm1d(3)
    bn.running_mean.fill_(2.0)
    conv = convert_sync_bn(nn.Sequential(nn.Linear(2, 3), bn), gpu=False)
    assert isinstance(conv[1], GlobalBatchNorm) and torch.equal(conv[1].running_mean, torch.full((3,), 2.0))
    x = torch.randn(5, 3)
    ref = nn.BatchNorm1d(3)
    torch.testing.assert_close(GlobalBatchNorm(3)(x), ref(x))
