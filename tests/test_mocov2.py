import math

import pytest
import torch
from torch import nn

from tasks.models.backbone import build_backbone, extract_features, normalize
from tasks.pretrain.ema import copy_and_freeze, update_ema
from tasks.pretrain.heads import MLPHead
from tasks.pretrain.loop import build_optimizer, train_step
from tasks.pretrain.methods import METHODS, get_method
from tasks.pretrain.methods.mocov2 import MoCoV2
from tasks.pretrain.schedules import cosine_schedule, scaled_lr, warmup_cosine_lr
from tests.trajectory import gap


def tiny_backbone():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return net, 8


def views(seed=0, b=6, s=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, s, s, generator=g) for _ in range(2)]


def make(**kw):
    torch.manual_seed(0)
    bb, d = tiny_backbone()
    return MoCoV2(bb, d, hidden_dim=32, out_dim=16, queue_size=20, **kw)


def test_registry_and_unknown_option():
    assert METHODS["mocov2"] == "tasks.pretrain.methods.mocov2" and "base" not in METHODS
    assert get_method("mocov2") is MoCoV2
    with pytest.raises(TypeError):
        make(not_an_option=1)


def test_forward_finite_and_key_branch_frozen():
    model = make()
    out = model(views(), 0, 10)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert out["loss"].requires_grad and not out["pos_cos"].requires_grad
    assert all(not p.requires_grad for p in list(model.backbone_k.parameters()) + list(model.head_k.parameters()))
    assert model.encoder() is model.backbone


def test_two_steps_query_moves_key_follows_ema_queue_holds_keys():
    m = 0.9
    model = make(momentum=m)
    opt = build_optimizer(model, lr=0.5, weight_decay=1e-4)
    for step in range(2):
        q_before = [p.detach().clone() for p in model.backbone.parameters()]
        k_before = [p.detach().clone() for p in model.backbone_k.parameters()]
        queue_before, ptr = model.queue.queue.clone(), int(model.queue.ptr)
        v = views(step)
        metrics = train_step(model, opt, v, step, 2, lr=0.5)
        assert math.isfinite(metrics["loss"]) and metrics["lr"] == 0.5
        q_after = [p.detach() for p in model.backbone.parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(q_before, q_after))
        for kb, ka, qa in zip(k_before, model.backbone_k.parameters(), q_after):
            assert torch.allclose(ka, m * kb + (1 - m) * qa, atol=1e-6)
        b = v[1].shape[0]
        assert int(model.queue.ptr) == (ptr + b) % 20
        written = model.queue.queue[ptr:ptr + b]
        assert torch.allclose(written.norm(dim=1), torch.ones(b), atol=1e-5)
        assert not torch.equal(written, queue_before[ptr:ptr + b])
        assert torch.equal(model.queue.queue[ptr + b:], queue_before[ptr + b:])


def test_queue_content_equals_previous_keys():
    model = make()
    opt = build_optimizer(model, lr=0.1)
    out = model(views(), 0, 1)
    keys = model._keys.clone()
    out["loss"].backward()
    opt.step()
    model.after_step(0, 1)
    assert torch.equal(model.queue.queue[:6], keys) and int(model.queue.ptr) == 6


def test_weight_decay_covers_norm_and_bias_as_the_reference_recipe():
    """MoCo v2 decays every parameter (main_moco.py, lightly); ``no`` restores the usual exclusion."""
    model = make()
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    (group,) = build_optimizer(model, "sgd", lr=0.1, weight_decay=0.5).param_groups
    assert group["weight_decay"] == 0.5 and len(group["params"]) == n_trainable
    assert any(p.ndim <= 1 for p in group["params"])
    decay, no_decay = build_optimizer(model, "sgd", lr=0.1, weight_decay=0.5, decay_norm_and_bias="no").param_groups
    assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == n_trainable
    assert isinstance(build_optimizer(model, "adamw", lr=1e-3), torch.optim.AdamW)
    with pytest.raises(ValueError, match="decay_norm_and_bias"):
        build_optimizer(model, decay_norm_and_bias="sometimes")


def _lightly_moco(base, head, queue, momentum):
    """lightly's MoCo recipe (its example: MoCoProjectionHead, NTXentLoss with a memory bank, update_momentum,
    torch SGD over every parameter) started from our head's weights and our queue."""
    import copy

    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    dims = head.dims
    net = nn.ModuleDict({"backbone": copy.deepcopy(base), "head": MoCoProjectionHead(*dims)})
    for a, b in zip(net["head"].parameters(), head.parameters(), strict=True):
        a.data.copy_(b.data)
    twin = copy.deepcopy(net)
    deactivate_requires_grad(twin)
    criterion = NTXentLoss(temperature=0.2, memory_bank_size=tuple(queue.shape))
    criterion.memory_bank.bank.copy_(queue)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)

    def step(x_q, x_k):
        update_momentum(net["backbone"], twin["backbone"], m=momentum)
        update_momentum(net["head"], twin["head"], m=momentum)
        q = net["head"](net["backbone"](x_q).flatten(1))
        with torch.no_grad():
            k = twin["head"](twin["backbone"](x_k).flatten(1))
        loss = criterion(q, k)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return float(loss.detach())
    return net, step, criterion.memory_bank.bank


@pytest.mark.parametrize("decay", ["auto", "no"])
def test_trajectory_equals_lightly_recipe(decay):
    """From the same weights, head, queue and batches, steps of our MoCo v2 (pretrain defaults: shuffle-BN,
    fused queue InfoNCE, EMA after the step) follow lightly's recipe: losses to 1e-5 and weights to 1e-4 of
    how far they moved. With the usual bias/norm exclusion instead, the weights part after one step (the
    check that the test can tell the two apart)."""
    import copy

    torch.manual_seed(0)
    base, d = tiny_backbone()
    model = MoCoV2(copy.deepcopy(base), d, hidden_dim=32, out_dim=16, queue_size=24, momentum=0.9)
    opt = build_optimizer(model, "sgd", lr=0.05, weight_decay=1e-2, decay_norm_and_bias=decay)
    ref, ref_step, ref_bank = _lightly_moco(base, model.head, model.queue.queue, 0.9)
    start = [p.detach().clone() for p in base.parameters()]
    for s in range(4):
        x_q, x_k = views(seed=10 + s, b=6)
        ours_loss = train_step(model, opt, [x_q, x_k], s, 100, lr=0.05)["loss"]
        ref_loss = ref_step(x_q, x_k)
        apart, moved = gap(model.backbone.parameters(), ref["backbone"].parameters(), start)
        if decay == "no":
            assert apart > 1e-3 * moved
            return
        assert ours_loss == pytest.approx(ref_loss, abs=1e-5)
        assert apart <= 1e-4 * moved
    torch.testing.assert_close(model.queue.queue, ref_bank, atol=1e-5, rtol=0)  # the same keys, in the same slots


def test_non_finite_loss_raises_before_step():
    model = make()
    opt = build_optimizer(model, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError):
        train_step(model, opt, [torch.full((4, 3, 8, 8), float("nan"))] * 2, 0, 1, lr=0.1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_ema_formula():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    old = [p.detach().clone() for p in b.parameters()]
    update_ema(a, b, 0.99)
    for pa, pb, o in zip(a.parameters(), b.parameters(), old):
        assert torch.allclose(pb, 0.99 * o + 0.01 * pa, atol=1e-7)
    frozen = copy_and_freeze(a)
    assert all(not p.requires_grad for p in frozen.parameters())
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), frozen.parameters()))


def test_schedules_known_points():
    assert cosine_schedule(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_schedule(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert cosine_schedule(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert cosine_schedule(200, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert warmup_cosine_lr(0, 110, 1.0, warmup_steps=10) == pytest.approx(0.1)
    assert warmup_cosine_lr(9, 110, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert warmup_cosine_lr(10, 110, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert warmup_cosine_lr(60, 110, 1.0, warmup_steps=10, final=0.1) == pytest.approx(0.55)
    assert warmup_cosine_lr(110, 110, 1.0, warmup_steps=10) == pytest.approx(0.0)
    assert scaled_lr(0.03, 512) == pytest.approx(0.06)


def test_momentum_cosine():
    model = make(momentum=0.99, momentum_cosine=True)
    assert model.current_momentum(0, 10) == pytest.approx(0.99)
    assert model.current_momentum(10, 10) == pytest.approx(1.0)


def test_mlp_head_layouts():
    head = MLPHead([8, 16, 4], batch_norm=True, last_bn=True, last_bn_affine=False)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert head[0].bias is None and head[-1].weight is None
    plain = MLPHead([8, 16, 4])
    assert [type(m).__name__ for m in plain] == ["Linear", "ReLU", "Linear"] and plain[0].bias is not None


def test_resnet_cifar_stem_features_and_checkpoint(tmp_path):
    model, dim = build_backbone("resnet18", cifar_stem=True)
    assert dim == 512 and model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    imgs = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    feats = extract_features(model, imgs, batch_size=2)
    assert feats.shape == (3, 512) and model.training
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, tmp_path / "ck.pt")
    again, _ = build_backbone("resnet18", cifar_stem=True, checkpoint=str(tmp_path / "ck.pt"))
    assert torch.allclose(extract_features(again, imgs), feats, atol=1e-5)
    with pytest.raises(ValueError, match="strict"):
        build_backbone("resnet18", checkpoint=str(tmp_path / "ck.pt"))  # 7x7 stem does not match


def test_normalize_layouts():
    x = torch.randint(0, 256, (2, 5, 4, 3), dtype=torch.uint8)
    a, b = normalize(x), normalize(x.permute(0, 3, 1, 2))
    assert a.shape == (2, 3, 5, 4) and torch.equal(a, b)


def test_pair_weights_weight_each_image_loss():
    m = make()
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    plain = m(views, 0, 10)["loss"]
    ones = m(views, 0, 10, pair_weights=torch.ones(4))["loss"]
    torch.testing.assert_close(plain, ones)
    w = torch.tensor([4.0, 0.0, 0.0, 0.0])  # only image 0 counts, 4x (the mean divides by 4)
    only0 = m(views, 0, 10, pair_weights=w)["loss"]
    q = m.embed(m.backbone, m.head, views[0])
    k = m.embed(m.backbone_k, m.head_k, views[1])
    per = m.criterion(q, k, m.queue.queue, reduction="none")
    torch.testing.assert_close(only0, per[0])
    with pytest.raises(ValueError):
        m(views, 0, 10, pair_weights=torch.ones(3))
