"""GenView's quality-driven weights: masks follow each view's crop/flip exactly; q and w by hand; the
frozen encoder stays frozen; every method's loss becomes mean(w_i * l_i)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tasks.data.transforms import Augment, MultiView, byol_views
from tasks.models.backbone import build_backbone
from tasks.pretrain.methods import get_method
from tasks.pretrain.quality import (QualityWeighter, crop_masks, feature_map, pair_quality, pooled,
                                    quality_weights)


def test_masks_follow_the_view_geometry():
    rng = np.random.default_rng(0)
    masks = [(rng.random((40, 40)) > 0.6).astype(np.float32) for _ in range(6)]
    for m in masks:
        m[5:20, 8:30] = 1.0  # some structure, so a wrong crop or a missing flip shows
    images = [np.repeat((m * 255).astype(np.uint8)[..., None], 3, axis=2) for m in masks]
    geometric_only = Augment(size=24, p_jitter=0.0, p_grey=0.0, p_blur=0.0, p_flip=0.5)
    mv = MultiView([geometric_only, dataclasses.replace(geometric_only, size=16)], seed=3)
    views, geoms = mv(images, with_geometry=True)
    assert any(g.flipped for g in geoms[0]) and not all(g.flipped for g in geoms[0])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    for v, g, aug in zip(views, geoms, mv.augments):
        pixels = (v * std + mean)[:, 0]  # the view's own pixels, back in [0, 1]
        cropped = crop_masks([torch.from_numpy(m) for m in masks], g, aug.size)
        assert cropped.shape == pixels.shape
        assert (cropped - pixels).abs().max() <= 1.5 / 255  # uint8 vs float resampling rounding only


def test_pair_quality_by_hand():
    # 2x2 maps, C=2; foreground = the left column in both views
    m = torch.tensor([[1.0, 0.0], [1.0, 0.0]])[None]
    f1 = torch.zeros(1, 2, 2, 2)
    f2 = torch.zeros(1, 2, 2, 2)
    f1[0, :, :, 0] = torch.tensor([1.0, 0.0])[:, None]  # fg feature (1, 0) in view 1
    f2[0, :, :, 0] = torch.tensor([1.0, 1.0])[:, None]  # fg (1, 1) in view 2: cos = 1/sqrt(2)
    f1[0, :, :, 1] = torch.tensor([0.0, 1.0])[:, None]  # bg (0, 1)
    f2[0, :, :, 1] = torch.tensor([1.0, 0.0])[:, None]  # bg (1, 0): cos = 0
    torch.testing.assert_close(pooled(f1, m[:, :, :]), torch.tensor([[1.0, 0.0]]), rtol=1e-5, atol=1e-5)
    q = pair_quality(f1, f2, m, m)
    torch.testing.assert_close(q, torch.tensor([2 ** -0.5 - 0.0]), rtol=1e-5, atol=1e-5)
    # masks at image resolution are area-pooled to the map: a 4x4 mask with the left half set
    big = torch.zeros(1, 4, 4)
    big[:, :, :2] = 1
    torch.testing.assert_close(pair_quality(f1, f2, big, big), q)


def test_weights_mean_one_ordered_and_gamma_zero():
    q = torch.tensor([0.5, -0.2, 0.1, 0.9])
    w = quality_weights(q, 1.0)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    assert torch.equal(torch.argsort(w), torch.argsort(q))
    torch.testing.assert_close(w, 4 * torch.exp(q) / torch.exp(q).sum())
    torch.testing.assert_close(quality_weights(q, 0.0), torch.ones(4))
    assert not quality_weights(q.requires_grad_(), 1.0).requires_grad


def test_vit_tokens_become_a_map():
    vit, _ = build_backbone("vit_tiny_patch16_224", img_size=32, depth=1)
    f = feature_map(vit, torch.randn(2, 3, 32, 32))
    assert f.shape == (2, vit.num_features, 2, 2)


@pytest.mark.parametrize("name", ["mocov2", "mocov3", "byol", "swav"])
def test_weighted_loss_for_every_base_method(name):
    from tests.test_methods import TINY_KWARGS

    torch.manual_seed(0)
    enc, _ = build_backbone("tiny_convnet")
    weighter = QualityWeighter(enc, gamma=2.0).train()
    assert not weighter.encoder.training and not any(p.requires_grad for p in weighter.parameters())
    backbone, dim = build_backbone("tiny_convnet")
    method = get_method(name)(backbone, dim, **TINY_KWARGS[name])
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(6, 3, a.size, a.size, generator=g) for a in method.view_augments(16)]
    masks = [(torch.rand(6, 16, 16, generator=g) > 0.5).float() for _ in range(2)]
    w, q = weighter(views[0], views[1], masks[0], masks[1])
    assert w.shape == (6,) and torch.isfinite(q).all() and abs(float(w.mean()) - 1) < 1e-5
    plain = method(views, 0, 10)["loss"]
    weighted = method(views, 0, 10, pair_weights=w)["loss"]
    uniform = method(views, 0, 10, pair_weights=torch.ones(6))["loss"]
    torch.testing.assert_close(uniform, plain, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(weighted, plain)  # the weights matter
    weighted.backward()
    assert method.backbone.conv1.weight.grad is not None


def test_byol_views_are_asymmetric():
    a, b = byol_views(32)
    assert (a.p_blur, a.p_solarize, b.p_blur, b.p_solarize) == (1.0, 0.0, 0.1, 0.2)
