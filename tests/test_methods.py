"""Every registered method: a smoke run, and 2 ranks x B/2 == 1 rank x B (loss and gradients, 2 steps).

The second is the distributed-semantics check of the issue (the lightly#1528 / #1018 bug class: queues,
gathers, Sinkhorn or batch statistics computed per rank instead of globally). It runs on the normalisation-
free ``tiny_convnet`` with every BatchNorm of the heads made cross-rank (``convert_sync_bn``), on real gloo
process groups.
"""
from __future__ import annotations

import pytest
import torch

from tasks.models.backbone import build_backbone
from tasks.pretrain.loop import build_optimizer, train_step
from tasks.pretrain.methods import METHODS, get_method
from tasks.pretrain.syncbn import convert_sync_bn
from tests.dist_harness import ddp_gradients, mean_over_ranks, rank_slice, run_ranks

# Small heads/queues so the tests run in seconds; every other option stays at the method's default.
TINY_KWARGS = {
    "mocov2": {"queue_size": 32, "hidden_dim": 32, "out_dim": 16},
    "mocov3": {"hidden_dim": 32, "out_dim": 16},
    "byol": {"hidden_dim": 32, "out_dim": 16},
    "swav": {"hidden_dim": 32, "out_dim": 16, "num_prototypes": 10},
    "densecl": {"queue_size": 32, "hidden_dim": 32, "out_dim": 16},
    "mae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
    "ijepa": {"predictor_dim": 32, "predictor_depth": 1},
    "mixedae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, "hc_dim": 16},
    # 3 clusters of 8-d centroids, 4 experts: a batch of 8 images routes to several, rarely all of them
    "moce": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, "num_experts": 4,
             "centroids": torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), "balance_weight": 1.0,
             "confidence_weight": 1.0},
    "neco": {"out_dim": 16, "hidden_dim": 32, "queue_size": 32, "num_references": 8},
}
SIZE = 16
# The masked / predictive family needs a ViT: a tiny one (4 x 4 patch grid). It has no batch statistics,
# so it is as exact across ranks as the normalisation-free tiny_convnet the others use.
TINY_VIT = ("vit_tiny_patch16_224", {"img_size": SIZE, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2})
# NeCo: a tiny DINOv2-with-registers ViT that takes its 16 px global and 8 px local crops
TINY_DINOV2 = ("vit_small_patch14_reg4_dinov2", {"img_size": SIZE, "patch_size": 4, "embed_dim": 32, "depth": 2,
                                                 "num_heads": 2, "dynamic_img_size": True})
BACKBONES = {"mae": TINY_VIT, "ijepa": TINY_VIT, "mixedae": TINY_VIT, "moce": TINY_VIT, "neco": TINY_DINOV2}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    arch, kwargs = BACKBONES.get(name, ("tiny_convnet", {}))
    backbone, dim = build_backbone(arch, **kwargs)
    return get_method(name)(backbone, dim, **TINY_KWARGS.get(name, {}))


def global_views(method, batch: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, a.size, a.size, generator=g) for a in method.view_augments(SIZE)]


def global_inputs(method, batch: int, step: int) -> dict[str, torch.Tensor]:
    """What the data side adds for the global batch (token masks; MoCE: each image's cluster id), as the
    trainer's feeder does."""
    inputs = method.collate(batch, step, seed=0)
    if getattr(method, "needs_geometry", False):  # NeCo: each view's crop box in a 40 x 48 source image
        from tasks.data.transforms import Overlap

        g = torch.Generator().manual_seed(1000 + step)
        overlap, augs = getattr(method, "view_overlap", None) or Overlap(), method.view_augments(SIZE)
        inputs["boxes"] = torch.tensor([[[*b, 0.0] for b in overlap.boxes(augs, 40, 48, g)] for _ in range(batch)])
    if getattr(method, "needs_clusters", False):
        g = torch.Generator().manual_seed(step)
        inputs["cluster"] = torch.randint(0, len(method.centroids), (batch,), generator=g)
    return inputs


@pytest.mark.parametrize("name", sorted(METHODS))
def test_smoke_two_steps(name):
    method = build(name)
    before = {k: v.detach().clone() for k, v in method.state_dict().items()}
    opt = build_optimizer(method, "sgd", 0.1, 0.9, 1e-4)
    for step in range(2):
        out = train_step(method, opt, global_views(method, 8, step), step, 10, 0.1, **global_inputs(method, 8, step))
        assert torch.isfinite(torch.tensor(out["loss"])), out
    changed = [k for k, v in method.backbone.state_dict().items() if not torch.equal(v, before["backbone." + k])]
    assert changed, "no backbone parameter changed"
    assert method.encoder() is method.backbone or isinstance(method.encoder(), torch.nn.Module)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bf16_autocast_steps_keep_fp32_state(name):
    """Under bf16 autocast (``pretrain.precision: auto`` on a GPU or an AMX CPU) the loss stays finite and
    close to the fp32 loss, and parameters, gradients and buffers (queues, EMA copies) stay fp32."""
    fp32, bf16 = build(name), build(name)
    views = global_views(fp32, 8, 0)
    out = {}
    for tag, method, dtype in (("fp32", fp32, None), ("bf16", bf16, torch.bfloat16)):
        opt = build_optimizer(method, "sgd", 0.1, 0.9, 1e-4)
        out[tag] = train_step(method, opt, views, 0, 10, 0.1, autocast_dtype=dtype, **global_inputs(method, 8, 0))["loss"]
    assert abs(out["bf16"] - out["fp32"]) <= 0.05 * abs(out["fp32"]) + 1e-3, out
    assert all(t.dtype == torch.float32 for t in bf16.state_dict().values() if t.is_floating_point())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in bf16.parameters())


def _two_steps(rank: int, world: int, name: str, batch: int) -> dict:
    method = convert_sync_bn(build(name), gpu=False)
    opt = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    losses, grads = [], {}
    for step in range(2):
        views = [rank_slice(v, rank, world) for v in global_views(method, batch, seed=100 + step)]
        inputs = {k: rank_slice(v, rank, world) for k, v in global_inputs(method, batch, step).items()}
        opt.zero_grad(set_to_none=True)
        out = method(views, step, 10, **inputs)
        out["loss"].backward()
        grads = ddp_gradients(method)
        for n, p in method.named_parameters():
            if n in grads:
                p.grad = grads[n].clone()
        losses.append(mean_over_ranks(out["loss"]))
        opt.step()
        method.after_step(step, 10)
    return {"losses": losses, "grads": grads}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_two_ranks_equal_one_rank(name):
    one = run_ranks(_two_steps, 1, name, 8)[0]
    two = run_ranks(_two_steps, 2, name, 8)
    for r in two:
        for a, b in zip(r["losses"], one["losses"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert r["grads"].keys() == one["grads"].keys()
        for k, g in one["grads"].items():
            torch.testing.assert_close(r["grads"][k], g, rtol=1e-4, atol=1e-5, msg=f"{name}: gradient of {k}")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_inputs_follow_the_weights_memory_layout(name):
    """With the method in channels_last (``pretrain.channels_last``), an NCHW batch is convolved as NHWC,
    never in oneDNN's slower mixed-layout path; the method's parameters and state keys are unchanged."""
    method = build(name)
    x = torch.randn(2, 3, SIZE, SIZE)
    keys, n_params = list(method.state_dict()), len(list(method.parameters()))
    method.to(memory_format=torch.channels_last)
    assert method.to_layout(x).is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(method.to_layout(x), x)
    assert list(method.state_dict()) == keys and len(list(method.parameters())) == n_params
