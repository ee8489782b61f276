"""MoCo v3 (METHODS.md 7.2): the loss against two independent references, the momentum encoder and its
schedule, the head layouts, per-image weights, and the ViT path (frozen patch projection).

lightly has no MoCo v3 loss (its NTXentLoss without a memory bank uses the 2N - 2 other embeddings of both
views as negatives, not the other keys). Its InfoNCE-with-memory-bank form does fit one query at a time:
for query i, the positive key k_i and a bank holding the other keys give exactly row i of MoCo v3's
logits with the positive moved to column 0. That, and a float64 hand-written loop, are the references.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tasks.models.backbone import build_backbone
from tasks.pretrain.loop import build_optimizer, train_step
from tasks.pretrain.methods import METHODS, get_method
from tasks.pretrain.methods.mocov3 import MoCoV3, mocov3_contrastive


def _views(seed: int = 0, b: int = 6, s: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, s, s, generator=g) for _ in range(2)]


def _make(**kw) -> MoCoV3:
    torch.manual_seed(0)
    backbone, dim = build_backbone("tiny_convnet")
    return MoCoV3(backbone, dim, hidden_dim=32, out_dim=16, **kw)


def _ctr_loop(q: torch.Tensor, k: torch.Tensor, tau: float) -> list[float]:
    """Per-query -log(exp(q_i.k_i / tau) / sum_j exp(q_i.k_j / tau)) * 2 tau, one dot product at a time."""
    q, k = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    out = []
    for i in range(q.shape[0]):
        logits = [float(q[i] @ k[j]) / tau for j in range(k.shape[0])]
        out.append((math.log(sum(math.exp(v) for v in logits)) - logits[i]) * 2 * tau)
    return out


def _ctr_lightly(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-query term from lightly's NTXentLoss with a bank of the other keys (one query per call)."""
    lightly_loss = pytest.importorskip("lightly.loss")
    b, d = k.shape
    out = []
    for i in range(b):
        ref = lightly_loss.NTXentLoss(temperature=tau, memory_bank_size=(b - 1, d))
        ref.memory_bank.bank = F.normalize(torch.cat([k[:i], k[i + 1:]]), dim=1)
        out.append(ref(q[i:i + 1], k[i:i + 1]) * 2 * tau)
    return torch.stack(out)


def test_registry_and_options():
    assert METHODS["mocov3"] == "tasks.pretrain.methods.mocov3" and get_method("mocov3") is MoCoV3
    with pytest.raises(TypeError):
        _make(not_an_option=1)
    with pytest.raises(ValueError):
        _make(freeze_patch_embed=True)  # a CNN has no patch projection to freeze
    cnn = _make()
    assert not cnn.vit and cnn.temperature == 1.0 and not cnn.freeze_patch_embed and cnn.momentum == 0.99
    assert _make(temperature=0.5).temperature == 0.5


@pytest.mark.parametrize("tau", [1.0, 0.2])
def test_ctr_matches_lightly_and_hand_loop(tau):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    ours = mocov3_contrastive(q, k, tau)
    assert ours.shape == (5,)
    torch.testing.assert_close(ours, _ctr_lightly(q, k, tau), rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.double(), torch.tensor(_ctr_loop(q, k, tau), dtype=torch.float64),
                               rtol=0, atol=1e-5)


def test_ctr_hand_computed():
    # Orthogonal unit q = k = I_2, tau = 1: each row has logits (1, 0) with the positive first or second.
    expected = 2 * math.log(1 + math.exp(-1))
    torch.testing.assert_close(mocov3_contrastive(torch.eye(2), torch.eye(2), 1.0),
                               torch.full((2,), expected), rtol=0, atol=1e-6)


def test_forward_equals_symmetric_reference_on_same_tensors():
    model = _make()
    twin = copy.deepcopy(model)
    x1, x2 = _views()
    out = model([x1, x2], 0, 10)
    assert out["loss"].ndim == 0 and out["loss"].requires_grad and not out["pos_cos"].requires_grad
    with torch.no_grad():
        q1, q2 = (twin.predictor(twin.projector(twin.backbone(x))) for x in (x1, x2))
        k1, k2 = (twin.projector_k(twin.backbone_k(x)) for x in (x1, x2))
    expected = _ctr_lightly(q1, k2, 1.0).mean() + _ctr_lightly(q2, k1, 1.0).mean()
    torch.testing.assert_close(out["loss"].detach(), expected, rtol=0, atol=1e-5)
    pos = 0.5 * (F.cosine_similarity(q1, k2).mean() + F.cosine_similarity(q2, k1).mean())
    torch.testing.assert_close(out["pos_cos"], pos, rtol=0, atol=1e-6)


def test_pair_weights_ones_and_one_hot():
    model = _make()
    v = _views(2)
    plain = model(v, 0, 10)["loss"].detach()
    ones = model(v, 0, 10, pair_weights=torch.ones(6))["loss"].detach()
    torch.testing.assert_close(ones, plain, rtol=0, atol=1e-6)
    with torch.no_grad():
        q1, q2 = (model.predictor(model.projector(model.backbone(x))) for x in v)
        k1, k2 = (model.projector_k(model.backbone_k(x)) for x in v)
    per_image = torch.tensor(_ctr_loop(q1, k2, 1.0)) + torch.tensor(_ctr_loop(q2, k1, 1.0))
    for j in (0, 4):
        w = torch.zeros(6)
        w[j] = 6.0  # mean(w * l) over 6 images = l_j
        picked = model(v, 0, 10, pair_weights=w)["loss"].detach()
        torch.testing.assert_close(picked, per_image[j].float(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        model(v, 0, 10, pair_weights=torch.ones(5))


def test_head_layouts_and_predictor_only_online():
    model = _make()
    proj, pred = model.projector, model.predictor
    assert [type(m).__name__ for m in proj] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert [type(m).__name__ for m in pred] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert not proj[-1].affine
    assert all(m.bias is None for m in list(proj) + list(pred) if isinstance(m, nn.Linear))
    assert (proj[0].in_features, proj[0].out_features, proj[3].out_features) == (16, 32, 16)
    # One predictor, on the online branch only; the momentum encoder mirrors backbone + projector exactly.
    children = {"backbone", "projector", "predictor", "backbone_k", "projector_k"}
    assert dict(model.named_children()).keys() == children
    online = [p.shape for p in list(model.backbone.parameters()) + list(proj.parameters())]
    momentum = [p.shape for p in list(model.backbone_k.parameters()) + list(model.projector_k.parameters())]
    assert online == momentum
    assert all(p.requires_grad for p in pred.parameters())
    assert model.encoder() is model.backbone


def test_view_augments_crop_min_0p2():
    first, second = _make().view_augments(32)
    assert first.size == second.size == 32 and first.scale == second.scale == (0.2, 1.0)
    assert (first.p_blur, first.p_solarize, second.p_blur, second.p_solarize) == (1.0, 0.0, 0.1, 0.2)
    assert first.jitter == (0.4, 0.4, 0.2, 0.1)


def _tiny_vit():
    torch.manual_seed(0)
    return build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)


@pytest.mark.parametrize("freeze", [None, False])
def test_vit_path_and_frozen_patch_projection(freeze):
    backbone, dim = _tiny_vit()
    model = MoCoV3(backbone, dim, hidden_dim=32, out_dim=16, freeze_patch_embed=freeze)
    assert model.vit and model.temperature == 0.2 and model.freeze_patch_embed == (freeze is None)
    assert [type(x).__name__ for x in model.projector].count("Linear") == 3 and not model.projector[-1].affine
    assert isinstance(model.predictor[-1], nn.BatchNorm1d) and not model.predictor[-1].affine
    proj = model.backbone.patch_embed.proj
    before = [p.detach().clone() for p in proj.parameters()]
    others = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if "patch_embed" not in n}
    opt = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1)
    out = train_step(model, opt, _views(0, b=4, s=32), 0, 10, lr=1e-3)
    assert math.isfinite(out["loss"])
    unchanged = all(torch.equal(a, b) for a, b in zip(before, proj.parameters()))
    assert unchanged == (freeze is None)
    assert all(p.requires_grad != (freeze is None) for p in proj.parameters())
    assert any(not torch.equal(p, others[n]) for n, p in model.backbone.named_parameters() if n in others)
    # The momentum copy of a frozen projection never drifts: online and momentum weights stay equal.
    if freeze is None:
        momentum_proj = model.backbone_k.patch_embed.proj
        assert all(torch.equal(a, b) for a, b in zip(proj.parameters(), momentum_proj.parameters()))


def test_vit_flag_overrides_detection():
    backbone, dim = build_backbone("tiny_convnet")
    model = MoCoV3(backbone, dim, hidden_dim=32, out_dim=16, vit=True, freeze_patch_embed=False)
    assert model.temperature == 0.2 and [type(x).__name__ for x in model.projector].count("Linear") == 3
    assert math.isfinite(float(model(_views(), 0, 10)["loss"].detach()))


def _ctr_on_ranks(rank: int, world: int, q: torch.Tensor, k: torch.Tensor) -> dict:
    from tests.dist_harness import mean_over_ranks, rank_slice

    q_local = rank_slice(q, rank, world).clone().requires_grad_(True)
    loss = mocov3_contrastive(q_local, rank_slice(k, rank, world), 0.2).mean()
    loss.backward()
    return {"loss": mean_over_ranks(loss), "grad": q_local.grad * (1.0 / world)}


def test_keys_gathered_and_labels_offset_across_ranks():
    """2 gloo ranks x 3 queries == one process x 6 (loss and d loss / d q): each rank's positive is its own
    key among all gathered keys. No BN involved, so this isolates the gather and the label offset."""
    from tests.dist_harness import run_ranks

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    q_one = q.clone().requires_grad_(True)
    loss_one = mocov3_contrastive(q_one, k, 0.2).mean()
    loss_one.backward()
    two = run_ranks(_ctr_on_ranks, 2, q, k)
    torch.testing.assert_close(two[0]["loss"], loss_one.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["grad"] for r in two]), q_one.grad, rtol=0, atol=1e-6)
