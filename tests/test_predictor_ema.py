"""The momentum encoder shared by BYOL and MoCo v3 (``tasks/pretrain/methods/_predictor_ema.py``): no
gradient reaches it, the predictor gets one, and after every step it equals lightly's ``update_momentum``
with lightly's ``cosine_schedule`` applied to a copy."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tasks.models.backbone import build_backbone
from tasks.pretrain.loop import build_optimizer
from tasks.pretrain.methods import get_method


@pytest.mark.parametrize("name", ["byol", "mocov3"])
def test_momentum_encoder_no_grad_and_ema_schedule(name):
    scheduler = pytest.importorskip("lightly.utils.scheduler")
    lightly_utils = pytest.importorskip("lightly.models.utils")
    torch.manual_seed(0)
    backbone, dim = build_backbone("tiny_convnet")
    model = get_method(name)(backbone, dim, hidden_dim=32, out_dim=16, momentum=0.9)
    opt = build_optimizer(model, "sgd", lr=0.5, weight_decay=1e-4)
    max_steps = 4
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        ref_k = copy.deepcopy(nn.ModuleList([model.backbone_k, model.projector_k]))
        online_before = [p.detach().clone() for p in model.backbone.parameters()]
        out = model([torch.randn(6, 3, 16, 16, generator=g) for _ in range(2)], step, max_steps)
        assert math.isfinite(out["loss"].item())
        out["loss"].backward()
        frozen = list(model.backbone_k.parameters()) + list(model.projector_k.parameters())
        assert all(not p.requires_grad and p.grad is None for p in frozen)
        assert all(p.grad is not None for p in model.predictor.parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_step(step, max_steps)
        assert any(not torch.equal(a, b) for a, b in zip(online_before, model.backbone.parameters()))
        # lightly's cosine_schedule runs over max_steps - 1 intervals, ours over max_steps: same formula.
        m = scheduler.cosine_schedule(step, max_steps + 1, 0.9, 1.0)
        assert model.current_momentum(step, max_steps) == pytest.approx(m)
        lightly_utils.update_momentum(nn.ModuleList([model.backbone, model.projector]), ref_k, m)
        for a, b in zip(ref_k.parameters(), frozen):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert model.current_momentum(0, 10) == pytest.approx(0.9)
    assert model.current_momentum(5, 10) == pytest.approx(0.95)
    assert model.current_momentum(10, 10) == pytest.approx(1.0)
