"""BYOL (METHODS.md 7.3): the loss against lightly's NegativeCosineSimilarity (2 - 2cos = 2 + 2 * negcos)
and the squared distance of normalised vectors, the target network and its EMA schedule, the head layouts,
stop-gradient, and per-image weights."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from tasks.models.backbone import build_backbone
from tasks.pretrain.loop import build_optimizer, train_step
from tasks.pretrain.methods import METHODS, get_method
from tasks.pretrain.methods.byol import BYOL, byol_regression
from tests.trajectory import gap


def _views(seed: int = 0, b: int = 6, s: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, s, s, generator=g) for _ in range(2)]


def _make(**kw) -> BYOL:
    torch.manual_seed(0)
    backbone, dim = build_backbone("tiny_convnet")
    return BYOL(backbone, dim, hidden_dim=32, out_dim=16, **kw)


def _neg_cos():
    return pytest.importorskip("lightly.loss").NegativeCosineSimilarity()


def test_registry_and_options():
    assert METHODS["byol"] == "tasks.pretrain.methods.byol" and get_method("byol") is BYOL
    with pytest.raises(TypeError):
        _make(not_an_option=1)
    assert _make().momentum == 0.99 and _make(momentum=0.996).momentum == 0.996


def test_regression_matches_lightly_and_normalised_distance():
    g = torch.Generator().manual_seed(1)
    p, z = torch.randn(7, 16, generator=g), torch.randn(7, 16, generator=g)
    ours = byol_regression(p, z)
    assert ours.shape == (7,)
    torch.testing.assert_close(ours.mean(), 2 + 2 * _neg_cos()(p, z), rtol=0, atol=1e-5)
    dist = (F.normalize(p, dim=1) - F.normalize(z, dim=1)).pow(2).sum(1)  # ||p_bar - z_bar||^2
    torch.testing.assert_close(ours, dist, rtol=0, atol=1e-5)
    torch.testing.assert_close(byol_regression(p, p), torch.zeros(7), rtol=0, atol=1e-5)
    torch.testing.assert_close(byol_regression(p, -p), torch.full((7,), 4.0), rtol=0, atol=1e-5)


def test_regression_stops_gradient_at_target():
    p = torch.randn(4, 8, requires_grad=True)
    z = torch.randn(4, 8, requires_grad=True)
    byol_regression(p, z).sum().backward()
    assert p.grad is not None and z.grad is None


def test_forward_equals_symmetric_reference_on_same_tensors():
    model = _make()
    twin = copy.deepcopy(model)
    x1, x2 = _views()
    out = model([x1, x2], 0, 10)
    assert out["loss"].ndim == 0 and out["loss"].requires_grad and not out["pos_cos"].requires_grad
    with torch.no_grad():
        p1, p2 = (twin.predictor(twin.projector(twin.backbone(x))) for x in (x1, x2))
        z1, z2 = (twin.projector_k(twin.backbone_k(x)) for x in (x1, x2))
    ncs = _neg_cos()
    expected = (2 + 2 * ncs(p1, z2)) + (2 + 2 * ncs(p2, z1))
    torch.testing.assert_close(out["loss"].detach(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["pos_cos"], -0.5 * (ncs(p1, z2) + ncs(p2, z1)), rtol=0, atol=1e-6)


def test_pair_weights_ones_and_one_hot():
    model = _make()
    v = _views(2)
    plain = model(v, 0, 10)["loss"].detach()
    torch.testing.assert_close(model(v, 0, 10, pair_weights=torch.ones(6))["loss"].detach(), plain,
                               rtol=0, atol=1e-6)
    ncs = _neg_cos()
    with torch.no_grad():
        p1, p2 = (model.predictor(model.projector(model.backbone(x))) for x in v)
        z1, z2 = (model.projector_k(model.backbone_k(x)) for x in v)
    for j in (1, 5):
        w = torch.zeros(6)
        w[j] = 6.0  # mean(w * l) over 6 images = l_j
        expected = (2 + 2 * ncs(p1[j:j + 1], z2[j:j + 1])) + (2 + 2 * ncs(p2[j:j + 1], z1[j:j + 1]))
        picked = model(v, 0, 10, pair_weights=w)["loss"].detach()
        torch.testing.assert_close(picked, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        model(v, 0, 10, pair_weights=torch.ones(7))


def test_head_layouts_and_predictor_only_online():
    model = _make()
    for head, dims in ((model.projector, (16, 32, 16)), (model.predictor, (16, 32, 16))):
        assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
        assert (head[0].in_features, head[0].out_features, head[3].out_features) == dims
        assert head[0].bias is None and head[3].bias is not None  # BN's shift replaces the first bias
    online = [p.shape for p in list(model.backbone.parameters()) + list(model.projector.parameters())]
    target = [p.shape for p in list(model.backbone_k.parameters()) + list(model.projector_k.parameters())]
    assert online == target
    # One predictor, on the online branch only.
    children = {"backbone", "projector", "predictor", "backbone_k", "projector_k"}
    assert dict(model.named_children()).keys() == children
    assert all(p.requires_grad for p in model.predictor.parameters())
    assert model.encoder() is model.backbone


def test_view_augments_byol_pair():
    first, second = _make().view_augments(24)
    assert first.size == second.size == 24 and first.scale == second.scale == (0.08, 1.0)
    assert (first.p_blur, first.p_solarize, second.p_blur, second.p_solarize) == (1.0, 0.0, 0.1, 0.2)
    assert first.jitter == (0.4, 0.4, 0.2, 0.1) and first.p_grey == 0.2


def test_vit_backbone_runs():
    torch.manual_seed(0)
    backbone, dim = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    model = BYOL(backbone, dim, hidden_dim=32, out_dim=16)
    opt = build_optimizer(model, "adamw", lr=1e-3)
    out = train_step(model, opt, _views(0, b=4, s=32), 0, 10, lr=1e-3)
    assert math.isfinite(out["loss"]) and 0.0 <= out["loss"] <= 8.0


def test_trajectory_equals_lightly_recipe_at_a_quarter_of_the_lr():
    """Our loss (the paper's, per image l(p1, z2) + l(p2, z1), l = 2 - 2cos) has 4x the gradient of lightly's
    example loss (0.5 (negcos(p0, z1) + negcos(p1, z0))), so SGD at lr / 4 with weight decay x 4 (lr * wd kept)
    is lightly's update exactly (the rule bench/knn.py's LR_SCALE applies). From the same weights and batches,
    with every parameter decayed on both sides, steps of ours follow lightly's recipe (its heads holding ours'
    weights, update_momentum + cosine_schedule before each step): losses to 1e-5, weights to 1e-4 of how far
    they moved. At the same lr instead, they part after one step."""
    lightly_loss = pytest.importorskip("lightly.loss")
    heads = pytest.importorskip("lightly.models.modules")
    utils = pytest.importorskip("lightly.models.utils")
    from lightly.utils.scheduler import cosine_schedule

    lr, wd, max_steps = 0.2, 1e-2, 10 ** 6
    for scale, equal in ((0.25, True), (1.0, False)):
        torch.manual_seed(0)
        base, dim = build_backbone("tiny_convnet")
        model = BYOL(copy.deepcopy(base), dim, hidden_dim=32, out_dim=16)
        opt = build_optimizer(model, "sgd", lr=lr * scale, weight_decay=wd / scale, decay_norm_and_bias="yes")
        ref = torch.nn.ModuleDict({"backbone": copy.deepcopy(base), "proj": heads.BYOLProjectionHead(dim, 32, 16),
                                   "pred": heads.BYOLPredictionHead(16, 32, 16)})
        with torch.no_grad():
            for dst, src in ((ref["proj"], model.projector), (ref["pred"], model.predictor)):
                for a, b in zip(dst.parameters(), src.parameters(), strict=True):
                    a.copy_(b)
        twin = torch.nn.ModuleDict({k: copy.deepcopy(ref[k]) for k in ("backbone", "proj")})
        utils.deactivate_requires_grad(twin)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
        neg_cos = lightly_loss.NegativeCosineSimilarity()
        start = [p.detach().clone() for p in base.parameters()]
        for i in range(4):
            x0, x1 = _views(seed=30 + i)
            ours = train_step(model, opt, [x0, x1], i, max_steps, lr=lr * scale)["loss"]
            m = cosine_schedule(i, max_steps, 0.99, 1.0)
            for k in ("backbone", "proj"):
                utils.update_momentum(ref[k], twin[k], m=m)
            p0, p1 = (ref["pred"](ref["proj"](ref["backbone"](x))) for x in (x0, x1))
            with torch.no_grad():
                z0, z1 = (twin["proj"](twin["backbone"](x)) for x in (x0, x1))
            loss = 0.5 * (neg_cos(p0, z1) + neg_cos(p1, z0))
            loss.backward()
            ref_opt.step()
            ref_opt.zero_grad()
            apart, moved = gap(model.backbone.parameters(), ref["backbone"].parameters(), start)
            if not equal:
                assert apart > 0.1 * moved
                break
            assert ours == pytest.approx(4 + 4 * float(loss.detach()), abs=1e-5)  # 2 l(p,z) = 2(2 + 2 negcos)
            assert apart <= 1e-4 * moved
