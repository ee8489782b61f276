"""Shared pieces of the masked / predictive family: token masks, the masked ViT, MAE and I-JEPA details.

Where lightly has the same piece (MAE masking, patchify and targets, the masked timm ViT, I-JEPA's mask
collator) we check agreement on identical inputs and random streams; the rest by hand on small tensors.
"""
from __future__ import annotations

import math

import numpy as np

import pytest
import torch
import torch.nn.functional as F

from tasks.data.masking import MultiBlockMasks, random_masking, step_generator
from tasks.models.backbone import build_backbone
from tasks.models.vit import (TokenPredictor, gather_tokens, normalize_patches, patchify, sincos_2d, unpatchify,
                              vit_tokens)
from tasks.pretrain.methods import get_method

VIT_KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def tiny_vit(seed=0, **kw):
    torch.manual_seed(seed)
    return build_backbone("vit_tiny_patch16_224", **{**VIT_KW, **kw})


# ------------------------------------------------------------------------------------------ random masking
def test_random_masking_partitions_each_row():
    keep, masked = random_masking(64, 49, 0.75, torch.Generator().manual_seed(0))
    assert keep.shape == (64, 12) and masked.shape == (64, 37)  # int(49 * 0.25) kept, as MAE
    both = torch.cat([keep, masked], 1).sort(1).values
    assert torch.equal(both, torch.arange(49).expand(64, -1))  # disjoint, and together every patch
    assert torch.equal(keep, keep.sort(1).values) and torch.equal(masked, masked.sort(1).values)
    # every position is kept about 25 % of the time over many draws (no positional bias)
    keep, _ = random_masking(4000, 49, 0.75, torch.Generator().manual_seed(1))
    freq = torch.bincount(keep.flatten(), minlength=49).float() / 4000
    assert (freq - 12 / 49).abs().max() < 0.035


def test_random_masking_agrees_with_lightly():
    from lightly.models.utils import random_token_mask

    torch.manual_seed(7)
    lk, lm = random_token_mask((5, 16), mask_ratio=0.75, mask_class_token=True)
    keep, masked = random_masking(5, 16, 0.75, torch.Generator().manual_seed(7))
    assert torch.equal(keep, lk.sort(1).values) and torch.equal(masked, lm.sort(1).values)


def test_step_generator_is_a_function_of_seed_and_step():
    a = torch.rand(3, generator=step_generator(1, 5))
    assert torch.equal(a, torch.rand(3, generator=step_generator(1, 5)))
    assert not torch.equal(a, torch.rand(3, generator=step_generator(1, 6)))
    assert not torch.equal(a, torch.rand(3, generator=step_generator(2, 5)))
    assert not torch.equal(a, torch.rand(3, generator=step_generator(1, 5, stream=1)))


# ------------------------------------------------------------------------------------- I-JEPA multi-block
def _possible_sizes(grid, scale, aspect):
    """Every (h, w) the size rule can produce, evaluated on a fine grid of u."""
    rows, cols = grid
    out = set()
    for u in torch.linspace(0, 1, 20001).tolist():
        n = int(rows * cols * (scale[0] + u * (scale[1] - scale[0])))
        a = aspect[0] + u * (aspect[1] - aspect[0])
        h, w = int(round(math.sqrt(n * a))), int(round(math.sqrt(n / a)))
        out.add((min(h, rows - 1), min(w, cols - 1)))
    return out


def _bbox(idx, cols):
    r, c = idx // cols, idx % cols
    return int(r.min()), int(r.max()), int(c.min()), int(c.max())


def test_multiblock_masks_obey_their_rules_over_many_draws():
    grid = (14, 14)
    sampler = MultiBlockMasks(grid)
    target_sizes, seen_t = _possible_sizes(grid, (0.15, 0.2), (0.75, 1.5)), set()
    for step in range(150):
        context, targets = sampler(8, step_generator(0, step, 0), step_generator(0, step, 1))
        assert context.shape[:2] == (8, 1) and targets.shape[:2] == (8, 4)
        kt, kc = targets.shape[2], context.shape[2]
        assert kc > sampler.min_keep
        sizes = set()
        for b in range(8):
            for j in range(4):  # each target block is one full h x w rectangle, the same size for the batch
                r0, r1, c0, c1 = _bbox(targets[b, j], 14)
                assert (r1 - r0 + 1) * (c1 - c0 + 1) == kt and len(set(targets[b, j].tolist())) == kt
                sizes.add((r1 - r0 + 1, c1 - c0 + 1))
                assert r0 < 14 - (r1 - r0 + 1) and c0 < 14 - (c1 - c0 + 1)  # corner from randint(0, H - h)
            ctx = context[b, 0]
            assert torch.equal(ctx, ctx.sort().values) and len(set(ctx.tolist())) == kc
            assert not set(ctx.tolist()) & set(targets[b].flatten().tolist())  # target patches removed
        assert len(sizes) == 1
        seen_t |= sizes
        assert 0.15 * 196 * 0.6 <= kt <= 0.2 * 196 * 1.25  # near the scale range (rounding of h and w)
    assert seen_t <= target_sizes and len(seen_t) >= 3  # only sizes the rule allows, and several of them


def test_multiblock_context_is_a_square_block():
    sampler = MultiBlockMasks((14, 14), allow_overlap=True)  # nothing removed: the context block as drawn
    for step in range(30):
        context, _ = sampler(4, step_generator(3, step, 0), step_generator(3, step, 1))
        k = context.shape[2]
        side = int(round(math.sqrt(k)))
        assert side * side == k and (side, side) in _possible_sizes((14, 14), (0.85, 1.0), (1, 1))
        for b in range(4):
            r0, r1, c0, c1 = _bbox(context[b, 0], 14)
            assert (r1 - r0 + 1, c1 - c0 + 1) == (side, side)


def test_multiblock_terminates_on_small_grids():
    # 8 x 8 grid: a target block has 9-12 patches; the official loop would spin forever with min_keep 10
    context, targets = MultiBlockMasks((8, 8))(16, step_generator(0, 0, 0), step_generator(0, 0, 1))
    assert targets.shape[:2] == (16, 4) and targets.shape[2] >= 6 and context.shape[2] >= 1


def test_multiblock_agrees_with_lightly_collator():
    from lightly.data.ijepa_collate import IJEPAMaskCollator

    col = IJEPAMaskCollator(input_size=112, patch_size=8, enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2),
                            aspect_ratio=(0.75, 1.5), nenc=1, npred=4, min_keep=10)
    ours = MultiBlockMasks((14, 14))
    for step in range(6):
        col._itr_counter.value = step - 1  # lightly seeds the block sizes by its iteration counter
        torch.manual_seed(100 + step)  # and draws positions from the global stream
        _, enc, pred = col([torch.zeros(1)] * 5)
        context, targets = ours(5, torch.Generator().manual_seed(step), torch.Generator().manual_seed(100 + step))
        assert torch.equal(enc[0], context[:, 0])
        for j in range(4):
            assert torch.equal(pred[j], targets[:, j])


# ------------------------------------------------------------------------------------------ masked ViT
def test_vit_tokens_agree_with_lightly_masked_vit():
    from lightly.models.modules import MaskedVisionTransformerTIMM

    vit, _ = tiny_vit()
    lvit = MaskedVisionTransformerTIMM(vit=vit, weight_initialization="skip")  # wraps the same weights
    x = torch.randn(3, 3, 32, 32)
    keep, _ = random_masking(3, 16, 0.5, torch.Generator().manual_seed(0))
    prefix, patches = vit_tokens(vit, x, keep)
    idx_keep = torch.cat([torch.zeros(3, 1, dtype=torch.long), keep + 1], 1)  # lightly counts the class token
    ref = lvit.encode(x, idx_keep=idx_keep)
    torch.testing.assert_close(torch.cat([prefix, patches], 1), ref)
    # no mask: exactly timm's forward_features
    torch.testing.assert_close(torch.cat(vit_tokens(vit, x), 1), vit.forward_features(x))


def test_kept_patch_output_depends_only_on_kept_patches():
    vit, _ = tiny_vit()
    vit.eval()
    x = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[0, 5, 10], [1, 2, 15]])
    _, a = vit_tokens(vit, x, keep)
    y = x.clone()
    y[:, :, 24:, :16] += 5.0  # patches 12 and 13: kept by neither image
    _, b = vit_tokens(vit, y, keep)
    torch.testing.assert_close(a, b)


def test_patchify_targets_agree_with_lightly():
    from lightly.models.utils import normalize_mean_var
    from lightly.models.utils import patchify as lpatchify

    x = torch.randn(2, 3, 16, 16)
    p = patchify(x, 4)
    torch.testing.assert_close(p, lpatchify(x, 4))
    torch.testing.assert_close(normalize_patches(p), normalize_mean_var(p, dim=-1))
    torch.testing.assert_close(unpatchify(p, 4, (4, 4)), x)
    assert torch.equal(p[0, 5].view(4, 4, 3).permute(2, 0, 1), x[0, :, 4:8, 4:8])  # patch 5 = row 1, col 1


def test_sincos_by_hand():
    e = sincos_2d((2, 3), 8)  # 2 frequencies per axis: 1 and 1/100
    assert e.shape == (6, 8)
    r, c = 1, 2
    want = [math.sin(r), math.sin(r / 100), math.cos(r), math.cos(r / 100),
            math.sin(c), math.sin(c / 100), math.cos(c), math.cos(c / 100)]
    torch.testing.assert_close(e[r * 3 + c], torch.tensor(want))
    assert len({tuple(v) for v in e.tolist()}) == 6


def test_predictor_outputs_depend_on_target_positions():
    torch.manual_seed(0)
    pred = TokenPredictor(16, (4, 4), 16, 1, 2, 5)
    tok = torch.randn(1, 3, 16)
    pos = torch.tensor([[0, 1, 2]])
    out = pred(tok, pos, torch.tensor([[7, 9]]))
    assert out.shape == (1, 2, 5) and not torch.allclose(out[0, 0], out[0, 1])


# ---------------------------------------------------------------------------------------------------- MAE
def test_mae_loss_is_normalised_pixel_mse_on_removed_patches():
    vit, d = tiny_vit()
    mae = get_method("mae")(vit, d, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    x = torch.randn(4, 3, 32, 32)
    inputs = mae.collate(4, 0, 0)
    assert inputs["keep"].shape == (4, 4) and inputs["masked"].shape == (4, 12)
    loss = mae([x], 0, 10, **inputs)["loss"]
    pred = mae.reconstruct(x, inputs["keep"], inputs["masked"])
    target = gather_tokens(patchify(x, 8), inputs["masked"])
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(loss, F.mse_loss(pred, target))
    # the loss does not look at visible patches: changing them changes nothing but the encoder input
    mae_raw = get_method("mae")(tiny_vit()[0], d, decoder_dim=32, decoder_depth=1, decoder_heads=2, norm_pix_loss=False)
    assert torch.allclose(mae_raw.targets(x, inputs["masked"]), gather_tokens(patchify(x, 8), inputs["masked"]))


def test_mae_rejects_a_cnn_and_a_wrong_size():
    cnn, d = build_backbone("tiny_convnet")
    with pytest.raises(ValueError, match="needs a ViT"):
        get_method("mae")(cnn, d)
    vit, d = tiny_vit()
    mae = get_method("mae")(vit, d, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    with pytest.raises(ValueError, match="img_size"):
        mae([torch.randn(2, 3, 48, 48)], 0, 10)


def test_mae_learns_to_reconstruct_a_fixed_batch():
    from tasks.pretrain.loop import build_optimizer, train_step

    # Each image one random colour: the removed patches can be predicted only from the visible ones
    # (raw-pixel target; a normalised target of a flat patch would be all zeros).
    vit, d = tiny_vit()
    mae = get_method("mae")(vit, d, decoder_dim=32, decoder_depth=1, decoder_heads=2, norm_pix_loss=False)
    opt = build_optimizer(mae, "adamw", 3e-3, 0.9, 0.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 1, 1, generator=g).expand(-1, -1, 32, 32).contiguous()
    losses = [train_step(mae, opt, [x], s, 80, 3e-3, **mae.collate(16, s, 0))["loss"] for s in range(80)]
    assert sum(losses[-10:]) / 10 < 0.3 * sum(losses[:5]) / 5, losses


# ------------------------------------------------------------------------------------------------- I-JEPA
def _ijepa(**kw):
    vit, d = tiny_vit(img_size=64, class_token=False, global_pool="avg", fc_norm=False)
    return get_method("ijepa")(vit, d, predictor_dim=32, predictor_depth=1, **kw)


def test_ijepa_targets_are_layer_normalised_target_features():
    m = _ijepa()
    x = torch.randn(2, 3, 64, 64)
    inputs = m.collate(2, 0, 0)
    goal = m.target_features(x, inputs["targets"])
    b, k, t = inputs["targets"].shape
    assert goal.shape == (b * k, t, 32)
    torch.testing.assert_close(goal.mean(-1), torch.zeros(b * k, t), atol=1e-5, rtol=0)
    torch.testing.assert_close(goal.var(-1, unbiased=False), torch.ones(b * k, t), atol=1e-3, rtol=0)
    full = F.layer_norm(m.target_encoder.forward_features(x), (32,))
    torch.testing.assert_close(goal[1], full[0, inputs["targets"][0, 1]])  # image 0, its second block


def test_ijepa_loss_by_hand_and_ema_is_linear():
    m = _ijepa(loss="l2")
    x = torch.randn(2, 3, 64, 64)
    inputs = m.collate(2, 3, 0)
    loss = m([x], 0, 10, **inputs)["loss"]
    goal = m.target_features(x, inputs["targets"])
    _, z = vit_tokens(m.backbone, x, inputs["context"])
    b, k, t = inputs["targets"].shape
    pred = m.predictor(z.repeat_interleave(k, 0), inputs["context"].repeat_interleave(k, 0), inputs["targets"].reshape(b * k, t))
    torch.testing.assert_close(loss, ((pred - goal) ** 2).mean())
    # EMA: m_t = 0.996 + 0.004 t / T; at t = T/2 the target moves by (1 - 0.998) of the gap
    online = [p.detach().clone() + 1.0 for p in m.backbone.parameters()]
    with torch.no_grad():
        for p, o in zip(m.backbone.parameters(), online):
            p.copy_(o)
    before = [p.detach().clone() for p in m.target_encoder.parameters()]
    m.after_step(5, 10)
    for t_new, t_old, o in zip(m.target_encoder.parameters(), before, online):
        torch.testing.assert_close(t_new, 0.998 * t_old + 0.002 * o)
    assert not any(p.requires_grad for p in m.target_encoder.parameters())


def test_ijepa_predictor_is_narrow_by_default():
    """Default width min(384, encoder / 2): 192 for a ViT-S width, 384 for ViT-B's; an explicit width is
    only capped at the encoder's."""
    for d, heads, want in ((384, 6, 192), (768, 12, 384), (32, 2, 16)):
        vit, _ = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=d, depth=1,
                                num_heads=heads, class_token=False, global_pool="avg", fc_norm=False)
        m = get_method("ijepa")(vit, d, predictor_depth=1)
        assert m.predictor.embed.out_features == want, d
    vit, d = tiny_vit(class_token=False, global_pool="avg", fc_norm=False)
    assert get_method("ijepa")(vit, d, predictor_dim=512, predictor_depth=1).predictor.embed.out_features == 32


def test_cpu_attention_is_timm_attention_with_the_fused_switch_off_for_the_forward_only():
    from tasks.pretrain.loop import cpu_attention

    vit, _ = tiny_vit()
    attns = [b.attn for b in vit.blocks]
    x = torch.randn(2, 3, 32, 32)
    ref = vit.forward_features(x)
    ref.square().sum().backward()
    ref_grads = [p.grad.clone() for p in vit.parameters()]
    vit.zero_grad()
    seen = []
    hook = attns[0].register_forward_pre_hook(lambda mod, args: seen.append(mod.fused_attn))
    with cpu_attention(vit):
        out = vit.forward_features(x)
    hook.remove()
    assert seen == [False] and all(a.fused_attn for a in attns)  # off in the forward, restored after
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for p, g in zip(vit.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-4)


def test_a_vit_that_pools_before_its_norm_is_a_clear_error():
    vit, d = tiny_vit(class_token=False, global_pool="avg")  # timm then norms after pooling (fc_norm)
    with pytest.raises(ValueError, match="fc_norm: false"):
        get_method("ijepa")(vit, d, predictor_dim=32, predictor_depth=1)


# ------------------------------------------------------------------------------------------------ MixedAE
def test_group_partitions_split_each_group_s_positions():
    from tasks.pretrain.methods.mixedae import group_partitions

    keep, masked = group_partitions(8, 16, 4, torch.Generator().manual_seed(0))
    assert keep.shape == (8, 4) and masked.shape == (8, 12)
    for g in range(2):
        assert torch.equal(keep[4 * g:4 * g + 4].flatten().sort().values, torch.arange(16))  # disjoint, complete
    for i in range(8):
        assert torch.equal(torch.cat([keep[i], masked[i]]).sort().values, torch.arange(16))
    with pytest.raises(ValueError, match="multiples"):
        group_partitions(6, 16, 4)


def test_mixing_by_hand():
    from tasks.pretrain.methods.mixedae import MixedAE, mix_tokens

    keep = torch.tensor([[0, 3], [1, 2]])  # one group of 2 images on 4 positions
    owner = MixedAE.owners(keep, 2, 4)
    assert owner.tolist() == [[0, 1, 1, 0]]
    patches = torch.arange(2 * 4 * 1).float().view(2, 4, 1)  # image 0: 0..3, image 1: 4..7
    assert mix_tokens(patches, owner).flatten().tolist() == [0, 5, 6, 3]


def test_topk_attention_is_timm_attention_at_full_k_and_keeps_k():
    from tasks.pretrain.methods.mixedae import topk_attention

    vit, _ = tiny_vit()
    attn = vit.blocks[0].attn
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(topk_attention(attn, x, 16), attn(x))
    record = []
    out = topk_attention(attn, x, 3, record)
    assert out.shape == x.shape and record[0].shape == (2, 2, 16, 16)
    assert (record[0].sum(-1) == 3).all()  # each query of each head keeps exactly its 3 largest logits
    assert not torch.allclose(out, attn(x))
    # against attention written out by hand: the kept entries are each query's 3 largest logits, the softmax
    # runs over them alone, and the gradient reaches the input only through them
    xr = x.clone().requires_grad_(True)
    b, n, _ = x.shape
    q, k, v = attn.qkv(xr).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) * attn.scale
    kept = logits >= logits.topk(3, dim=-1).values[..., -1:]
    assert torch.equal(kept, record[0])
    ref = logits.masked_fill(~kept, float("-inf")).softmax(-1) @ v
    ref = attn.proj(ref.transpose(1, 2).reshape(b, n, -1))
    xo = x.clone().requires_grad_(True)
    out = topk_attention(attn, xo, 3)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, xo, g)[0], torch.autograd.grad(ref, xr, g)[0])


def test_homologous_attention_selects_its_own_image_above_chance_once_trained():
    """A mix of two distinct images (each one random colour plus noise, groups of 2): after a short MixedAE
    run (reconstruction + homologous contrastive loss), the top-K attention picks patches of the query's
    own image well above chance."""
    from tasks.pretrain.loop import build_optimizer, train_step

    vit, d = tiny_vit(class_token=False, global_pool="avg", fc_norm=False)
    m = get_method("mixedae")(vit, d, mix_ratio=0.5, decoder_dim=32, decoder_depth=1, decoder_heads=2, hc_dim=16)

    def images(g):
        return torch.rand(16, 3, 1, 1, generator=g) * 2 - 1 + 0.3 * torch.randn(16, 3, 32, 32, generator=g)

    probe, probe_keep = images(torch.Generator().manual_seed(99)), m.collate(16, 10_000, 1)["keep"]
    chance = (8 - 1) / (16 - 1)
    opt = build_optimizer(m, "adamw", 2e-3, 0.9, 0.0)
    g = torch.Generator().manual_seed(1)
    for s in range(100):
        out = train_step(m, opt, [images(g)], s, 100, 2e-3, **m.collate(16, s, 0))
    assert out["hc_loss"] < 2.2  # the optimum here is log(7) = 1.95: 7 positives among 15 others
    assert m.same_image_rate(probe, probe_keep) > chance + 0.1


# --------------------------------------------------------------------------------------------------- MoCE
def _moce(centroids, num_experts=4, **kw):
    vit, d = tiny_vit(depth=4, class_token=False, global_pool="avg", fc_norm=False)
    m = get_method("moce")(vit, d, centroids=centroids, num_experts=num_experts, decoder_dim=32, decoder_depth=1,
                           decoder_heads=2, **kw)
    with torch.no_grad():  # experts start as copies of the block's MLP; make them distinct
        for i in m.moe_layers:
            for e in m.backbone.blocks[i].mlp.experts:
                for p in e.parameters():
                    p.add_(0.2 * torch.randn_like(p))
    return m


def test_moce_routes_every_token_of_an_image_to_the_same_expert():
    centroids = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    m = _moce(centroids)
    assert m.moe_layers == [1, 3]  # every other block, starting with the second
    layer = m.backbone.blocks[1].mlp
    h = torch.randn(5, 16, 32)
    cluster = torch.tensor([0, 1, 2, 1, 0])
    probs = m.gate_probs(m.centroids[cluster])[0]
    w, idx = probs.topk(1, dim=-1)
    layer.route = (idx, w)
    with torch.no_grad():
        out = layer(h)
    layer.route = None
    for b in range(5):
        for t in range(16):  # which expert produced this token's output?
            with torch.no_grad():
                cands = [float((w[b, 0] * e(h[b, t]) - out[b, t]).abs().max()) for e in layer.experts]
            assert min(cands) < 1e-5 and int(torch.tensor(cands).argmin()) == int(idx[b, 0])
    # images of one cluster share their routing; the route is a function of the cluster only
    assert idx[0] == idx[4] and idx[1] == idx[3]


def test_moce_losses_by_hand():
    from tasks.pretrain.methods.moce import cv_squared

    assert float(cv_squared(torch.tensor([2.0, 2.0, 2.0, 2.0]))) == 0.0
    torch.testing.assert_close(cv_squared(torch.tensor([4.0, 0.0, 0.0, 0.0])), torch.tensor(3.0))
    m = _moce(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(4, 3, 32, 32)
    cluster = torch.tensor([0, 1, 2, 0])
    out = m([x], 0, 10, cluster=cluster, **m.collate(4, 0, 0))
    probs = m.gate_probs(m.centroids[cluster])
    balance = sum(cv_squared(p.sum(0)) for p in probs) / 2
    entropy = sum(-(p * p.log()).sum(-1).mean() for p in probs) / 2
    torch.testing.assert_close(out["loss"], out["rec_loss"] + 0.01 * balance + 0.01 * entropy)
    assert float(m.routed_count.sum()) == 2 * 4  # 2 MoE layers x 4 images, top-1


def test_expert_search_on_a_one_cluster_set_picks_that_cluster_s_experts_and_exports_a_dense_vit():
    from tasks.evaluate.expert_search import search_experts
    from tasks.models.vit import vit_tokens

    centroids = torch.eye(4, 8)  # 4 orthogonal clusters
    m = _moce(centroids)
    with torch.no_grad():  # decisive gates: cluster c -> expert c in layer 1, expert 3 - c in layer 3
        m.gates[0].weight.copy_(10 * torch.eye(4, 8))
        m.gates[1].weight.copy_(10 * torch.eye(4, 8).flip(0))
    g = torch.Generator().manual_seed(0)
    for c in range(4):
        downstream = centroids[c] + 0.05 * torch.randn(20, 8, generator=g)  # every image from cluster c
        found = search_experts(m, downstream.numpy())
        assert found["experts"] == [c, 3 - c] and found["clusters"].tolist() == [20 if i == c else 0 for i in range(4)]
        dense = m.dense(found["experts"], found["scales"])
        plain, _ = tiny_vit(depth=4, class_token=False, global_pool="avg", fc_norm=False)
        assert dense.state_dict().keys() == plain.state_dict().keys()  # a ViT of ordinary size
        plain.load_state_dict(dense.state_dict())
        # for images of cluster c the dense ViT computes what the MoE computes
        x = torch.randn(2, 3, 32, 32, generator=g)
        cluster = torch.full((2,), c)
        for i, p in zip(m.moe_layers, m.gate_probs(m.centroids[cluster])):
            w, idx = p.topk(1, dim=-1)
            m.backbone.blocks[i].mlp.route = (idx, w)
        want = torch.cat(vit_tokens(m.backbone, x), 1)
        for i in m.moe_layers:
            m.backbone.blocks[i].mlp.route = None
        torch.testing.assert_close(plain.forward_features(x), want, rtol=1e-4, atol=1e-5)


def test_cluster_embedder_loads_a_pretrained_vit_encoder(tmp_path):
    """The cluster stage's MoCE round 2: its Embedder loads the encoder.pt a pretrain stage exported (a plain
    timm ViT state dict) and embeds with exactly that encoder."""
    import io

    from PIL import Image

    from tasks.curation.embed import Embedder
    from tasks.data.images import batch_to_array
    from tasks.models.backbone import extract_features

    kw = dict(class_token=False, global_pool="avg", fc_norm=False)
    mae = get_method("mae")(tiny_vit(seed=3, **kw)[0], 32, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    torch.save(mae.encoder().state_dict(), tmp_path / "encoder.pt")
    imgs = []
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray((np.random.default_rng(i).random((40, 40, 3)) * 255).astype("uint8")).save(buf, "PNG")
        imgs.append(buf.getvalue())
    emb = Embedder("vit_tiny_patch16_224", checkpoint=str(tmp_path / "encoder.pt"), resolution=32,
                   **{**VIT_KW, **kw})({"id": np.array(["a", "b", "c"]), "image": imgs})["embedding"]
    want = extract_features(mae.encoder(), torch.from_numpy(batch_to_array(imgs, 32)))
    torch.testing.assert_close(torch.from_numpy(np.stack(emb)), want)
