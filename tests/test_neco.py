"""NeCo pieces: overlapping crops, box alignment by ROI-Align, references/queue, the permutation loss."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.data.transforms import MultiView, Overlap, _overlap, geometry_tensor, neco_views
from tasks.models.backbone import build_backbone
from tasks.pretrain.losses.sorting import soft_sort
from tasks.pretrain.methods import get_method
from tasks.pretrain.methods.neco import (aligned_patches, intersection_in_crop, permutation_cross_entropy,
                                         rank_matrices)

P = 4


def tiny_dinov2(size=16, **kw):
    torch.manual_seed(0)
    return build_backbone("vit_small_patch14_reg4_dinov2", img_size=size, patch_size=P, embed_dim=32, depth=1,
                          num_heads=2, **{"dynamic_img_size": True, **kw})


def neco(**kw):
    vit, d = tiny_dinov2()
    return get_method("neco")(vit, d, **{"out_dim": 16, "hidden_dim": 32, "queue_size": 40, "num_references": 8, **kw})


def test_overlapping_crops_obey_the_rule_over_many_draws():
    augs = neco_views(32, 16)
    rule = Overlap()
    g = torch.Generator().manual_seed(0)
    h, w = 60, 90
    for _ in range(500):
        boxes = rule.boxes(augs, h, w, g)
        assert _overlap(boxes[0], boxes[1]) > 0.02 * h * w
        assert all(_overlap(b, boxes[a]) > 0.01 * h * w for b in boxes[2:] for a in (0, 1))
    # and the views come out with the boxes they were cut from
    imgs = [np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8) for i in range(3)]
    views, geoms = MultiView(augs, seed=0, overlap=rule)(imgs, with_geometry=True)
    assert [v.shape[-1] for v in views] == [32, 32, 16, 16, 16, 16]
    assert geometry_tensor(geoms).shape == (3, 6, 5)


def _position_map(box, size, flipped=False):
    """A crop's patch map whose features are the source (x, y) of each patch centre (what a perfectly
    equivariant encoder would give): [1, 2, size / P, size / P]."""
    top, left, h, w = box
    n = size // P
    c = (torch.arange(n) + 0.5) * P  # patch centres in crop pixels
    xs = left + c * w / size
    if flipped:
        xs = xs.flip(0)
    ys = top + c * h / size
    return torch.stack([xs.view(1, n).expand(n, n), ys.view(n, 1).expand(n, n)]).unsqueeze(0)


@pytest.mark.parametrize("flip_v", [False, True])
def test_roi_align_cuts_the_same_source_region_out_of_both_crops(flip_v):
    g_box, v_box = (10, 20, 40, 48), (30, 36, 24, 20)
    boxes = torch.tensor([[[*g_box, 0.0], [*v_box, float(flip_v)]]])
    sizes = (32, 16)
    flipped = boxes[..., 4] > 0.5
    cuts = []
    for crop, box in enumerate((g_box, v_box)):
        fmap = _position_map(box, sizes[crop], flipped=bool(flipped[0, crop]))
        roi = intersection_in_crop(boxes, 0, 1, crop, sizes[crop])
        cuts.append(aligned_patches(fmap, roi, flipped[:, crop], P))
    # a bilinear sample of a linear map is exact between patch centres, so both give the same source
    # points; the outer ring of the 7 x 7 grid lies within half a patch of a crop's edge (the intersection
    # shares an edge with one crop), where the sample clamps to the last patch centre
    inner = torch.zeros(7, 7, dtype=torch.bool)
    inner[1:-1, 1:-1] = True
    inner = inner.flatten()
    torch.testing.assert_close(cuts[0][:, inner], cuts[1][:, inner], atol=0.05, rtol=0)
    assert (cuts[0] - cuts[1]).abs().max() < 0.5 * P * 24 / 16  # half a patch of crop v, in source pixels
    # and the inner points are the 7 x 7 bin centres of the intersection (x 36..56, y 30..50), raster order
    centres = (torch.arange(7) + 0.5) * 20 / 7
    want = torch.stack([(36 + centres).view(1, 7).expand(7, 7), (30 + centres).view(7, 1).expand(7, 7)], -1)
    torch.testing.assert_close(cuts[1][0, inner], want.reshape(49, 2)[inner], atol=0.05, rtol=0)


def test_intersection_by_hand():
    boxes = torch.tensor([[[0.0, 0.0, 100.0, 100.0, 0.0], [50.0, 25.0, 50.0, 50.0, 0.0]]])
    torch.testing.assert_close(intersection_in_crop(boxes, 0, 1, 0, 200), torch.tensor([[50.0, 100.0, 150.0, 200.0]]))
    torch.testing.assert_close(intersection_in_crop(boxes, 0, 1, 1, 10), torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    boxes[0, 1, 4] = 1.0  # flipped: x mirrored within the crop
    boxes[0, 0, 3] = 60.0  # crop 0 now ends at x = 60: intersection x 25..60 -> crop 1 x 0..7, mirrored 3..10
    torch.testing.assert_close(intersection_in_crop(boxes, 0, 1, 1, 10), torch.tensor([[3.0, 0.0, 10.0, 10.0]]))


def test_permutation_loss_by_hand_and_minimal_when_student_ranks_as_teacher():
    torch.manual_seed(0)
    q, refs = torch.randn(2, 5, 8), torch.randn(2, 6, 8)
    p_t = rank_matrices(q, refs, 100.0, "bitonic", "cauchy")
    sim = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(refs, dim=-1).transpose(1, 2)
    torch.testing.assert_close(p_t[1, 3], soft_sort(sim[1, 3:4], 100.0)[1][0])
    by_hand = torch.stack([-(p_t[b] * (p_t[b] + 1e-8).log()).sum(-1).mean() for b in range(2)])
    torch.testing.assert_close(permutation_cross_entropy(p_t, p_t), by_hand)
    other = rank_matrices(q.flip(1), refs, 100.0, "bitonic", "cauchy")
    assert (permutation_cross_entropy(p_t, other) > permutation_cross_entropy(p_t, p_t)).all()


def _inputs(m, b, step, size=16, h=40, w=48):
    g = torch.Generator().manual_seed(step)
    augs = m.view_augments(size)
    inp = m.collate(b, step, 0)
    inp["boxes"] = torch.tensor([[[*bx, 0.0] for bx in m.view_overlap.boxes(augs, h, w, g)] for _ in range(b)])
    views = [torch.randn(b, 3, a.size, a.size, generator=g) for a in augs]
    return views, inp


def test_references_come_from_the_batch_then_from_the_queue_which_fills_fifo():
    m = neco()
    views, inp = _inputs(m, 4, 0)
    assert m.view_augments(16)[2].size == 8 and len(m.pairs()) == 10
    m(views, 0, 10, **inp)
    pushed = [k.clone() for k in m._push]
    assert pushed[0].shape == (4 * 10, 16)
    m.after_step(0, 10)
    assert m.filled.tolist() == [40, 40]
    torch.testing.assert_close(m.queues[0].queue, pushed[0])  # 40 = the queue's size: exactly this step's pushes
    # the references of the next step are queue entries
    t = torch.randn(4, 49, 16)
    refs = m._references(0, t, torch.rand(4, 8))
    assert all(any(torch.equal(r, e) for e in m.queues[0].queue) for r in refs.flatten(0, 1))


def test_teacher_is_an_ema_in_eval_mode_and_gets_no_gradient():
    m = neco(momentum=0.5)
    m.train()
    assert not m.teacher_backbone.training and m.backbone.training
    views, inp = _inputs(m, 2, 0)
    m(views, 0, 10, **inp)["loss"].backward()
    assert all(p.grad is None for p in m.teacher_backbone.parameters())
    assert m.head[0].weight.grad is not None and m.backbone.blocks[0].attn.qkv.weight.grad is not None
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.teacher_backbone.parameters()]
    m.after_step(0, 10)  # cosine schedule at step 0: m = 0.5
    for t, b, s in zip(m.teacher_backbone.parameters(), before, m.backbone.parameters()):
        torch.testing.assert_close(t, 0.5 * b + 0.5 * s)


def test_neco_learns_on_a_fixed_batch():
    m = neco()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    views, inp = _inputs(m, 4, 0)
    losses = []
    for step in range(25):
        opt.zero_grad()
        out = m(views, step, 1000, **inp)
        out["loss"].backward()
        opt.step()
        m.after_step(step, 1000)
        losses.append(float(out["loss"].detach()))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, losses


def test_backbone_trains_at_a_tenth_of_the_heads_lr():
    from tasks.pretrain.loop import train_step
    from tasks.pretrain.optim import build_optimizer

    m = neco()
    opt = build_optimizer(m, "adamw", 1e-3, 0.9, 0.0)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters() if p.requires_grad)  # each exactly once
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    views, inp = _inputs(m, 2, 0)
    train_step(m, opt, views, 0, 10, 1e-3, **inp)
    # AdamW's first step moves every parameter with a gradient by ~lr (the sign of its gradient)
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in m.named_parameters() if p.requires_grad}
    head = [v for n, v in moved.items() if n.startswith("head.")]
    backbone = [v for n, v in moved.items() if n.startswith("backbone.") and v > 0]
    assert head and backbone
    assert max(head) == pytest.approx(1e-3, rel=0.01) and max(backbone) == pytest.approx(1e-4, rel=0.01)
    with pytest.raises(ValueError, match="backbone_lr_scale"):
        neco(backbone_lr_scale=0.0)


def test_clear_errors():
    vit, d = build_backbone("vit_small_patch14_reg4_dinov2", img_size=16, patch_size=P, embed_dim=32, depth=1,
                            num_heads=2)
    m = get_method("neco")(vit, d, out_dim=16, hidden_dim=32)
    with pytest.raises(ValueError, match="dynamic_img_size: true"):
        m.view_augments(16)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        neco().view_augments(18)
    with pytest.raises(ValueError, match="needs a ViT"):
        get_method("neco")(*build_backbone("tiny_convnet"))


def test_the_feeder_hands_neco_its_crops_boxes_and_draws():
    from tasks.pretrain.feeder import ViewFeeder

    m = neco()
    images = [np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8) for i in range(8)]
    feeder = ViewFeeder(images, 2, 1, 2, 0, 0, 1, m.view_augments(16), collate=m.collate,
                        overlap=m.view_overlap, geometry=m.needs_geometry)
    (views, extra), _ = feeder.next()
    inputs = extra["inputs"]
    assert [v.shape for v in views] == [(2, 3, 16, 16)] * 2 + [(2, 3, 8, 8)] * 4
    assert inputs["boxes"].shape == (2, 6, 5) and set(inputs) == {"boxes", "ref_u", "push_u"}
    torch.testing.assert_close(inputs["ref_u"], m.collate(4, 0, 0)["ref_u"][2:4])  # rank 1's rows of the global draw
    for b in inputs["boxes"]:
        boxes = [tuple(int(x) for x in v[:4]) for v in b]
        assert _overlap(boxes[0], boxes[1]) > 0.02 * 40 * 48
    m(views, 0, 10, **inputs)["loss"].backward()


def test_an_official_format_dinov2_checkpoint_loads_into_the_timm_model(tmp_path):
    """The DINOv2 release stores register tokens as ``register_tokens``, keeps a ``mask_token`` and puts the
    class position into ``pos_embed``; build_backbone(checkpoint=...) converts it through timm."""
    vit, _ = tiny_dinov2()
    timm_state = vit.state_dict()
    official = {k: v.clone() for k, v in timm_state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    official["register_tokens"] = timm_state["reg_token"].clone()
    cls_pos = torch.randn(1, 1, 32)
    official["pos_embed"] = torch.cat([cls_pos, timm_state["pos_embed"]], 1)
    official["cls_token"] = timm_state["cls_token"] - cls_pos
    official["mask_token"] = torch.zeros(1, 32)
    torch.save(official, tmp_path / "dinov2_official.pth")
    loaded, _ = build_backbone("vit_small_patch14_reg4_dinov2", img_size=16, patch_size=P, embed_dim=32, depth=1,
                               num_heads=2, dynamic_img_size=True, checkpoint=str(tmp_path / "dinov2_official.pth"))
    for k, v in timm_state.items():
        torch.testing.assert_close(loaded.state_dict()[k], v, msg=k)
    with pytest.raises(ValueError, match="does not match"):
        torch.save({"blocks.0.norm1.weight": torch.ones(3)}, tmp_path / "bad.pth")
        build_backbone("vit_small_patch14_reg4_dinov2", img_size=16, patch_size=P, embed_dim=32, depth=1,
                       num_heads=2, checkpoint=str(tmp_path / "bad.pth"))
