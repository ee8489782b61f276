"""Optimisers: LARS equals lightly's LARS (the paper's trust ratio) on identical parameters and gradients;
excluded parameters (biases, norms) get plain SGD without weight decay; gradient clipping and autocast."""
from __future__ import annotations

import pytest
import torch
from lightly.utils.lars import LARS as LightlyLARS
from torch import nn

from tasks.pretrain.loop import train_step
from tasks.pretrain.optim import LARS, build_optimizer, param_groups


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(5, 4, generator=g)), nn.Parameter(torch.randn(3, 3, 2, generator=g))]


def test_lars_matches_lightly_over_steps():
    ours, ref = _params(), _params()
    opt = LARS([{"params": ours, "weight_decay": 1e-2}], lr=0.5, momentum=0.9, trust_coefficient=1e-3)
    opt_ref = LightlyLARS(ref, lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=1e-3, eps=1e-8)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        for a, b in zip(ours, ref):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        opt_ref.step()
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_excluded_group_is_plain_sgd_and_no_decay():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    groups = param_groups(model, 0.1)
    assert [p.ndim for p in groups[0]["params"]] == [2] and all(p.ndim == 1 for p in groups[1]["params"])
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["lars"] is False
    opt = build_optimizer(model, "lars", lr=0.2, momentum=0.0, weight_decay=0.1)
    bias = model[0].bias
    before = bias.detach().clone()
    bias.grad = torch.ones_like(bias)
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    opt.step()
    torch.testing.assert_close(bias.detach(), before - 0.2)  # no trust ratio, no decay


def test_build_optimizer_names():
    m = nn.Linear(2, 2)
    assert isinstance(build_optimizer(m, "sgd"), torch.optim.SGD)
    assert isinstance(build_optimizer(m, "adamw"), torch.optim.AdamW)
    assert isinstance(build_optimizer(m, "LARS"), LARS)
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(m, "adagrad")


class _Quadratic(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.full((4,), 10.0))
        self.seen_dtype = None

    def forward(self, views, step, max_steps, pair_weights=None):
        y = views[0] @ self.w
        self.seen_dtype = y.dtype
        return {"loss": (y.float() ** 2).mean()}

    def after_step(self, step, max_steps):
        pass


def test_clip_grad_and_autocast():
    m = _Quadratic()
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    out = train_step(m, opt, [torch.ones(2, 4)], 0, 1, 1.0, clip_grad=1.0)
    assert out["grad_norm"] > 1.0  # the norm before clipping is reported
    torch.testing.assert_close(torch.linalg.vector_norm(m.w.detach() - 10.0), torch.tensor(1.0))
    train_step(m, opt, [torch.ones(2, 4)], 1, 2, 0.0, autocast_dtype=torch.bfloat16)
    assert m.seen_dtype == torch.bfloat16


def test_precision_resolves_to_an_autocast_dtype():
    from tasks.pretrain.loop import autocast_dtype, cpu_has_bf16_matmul

    assert autocast_dtype("fp32", "cpu") is None and autocast_dtype("fp32", "cuda") is None
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert autocast_dtype("auto", "cuda") is torch.bfloat16
    # auto on a CPU: bf16 only where the CPU has bf16 matrix units (AMX), since elsewhere it is no faster
    assert autocast_dtype("auto", "cpu") is (torch.bfloat16 if cpu_has_bf16_matmul() else None)
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype("fp16", "cpu")
