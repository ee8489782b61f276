"""DenseCL (METHODS.md section 3): pieces against lightly 1.6's independent ones and hand-built cases.

lightly has the dense head (``DenseCLProjectionHead``), the correspondence (``select_most_similar``) and
MoCo's InfoNCE with a memory bank (``NTXentLoss``); the end-to-end reference below is assembled from those
alone, reading only the model's weights and queues.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tasks.models.backbone import build_backbone
from tasks.pretrain.loop import build_optimizer, train_step
from tasks.pretrain.methods import get_method
from tasks.pretrain.methods.densecl import DenseCL, dense_correspondence
from tasks.pretrain.methods.mocov2 import MoCoV2
from tests.dist_harness import rank_slice, run_ranks
from tests.trajectory import gap

heads = pytest.importorskip("lightly.models.modules.heads")
lightly_loss = pytest.importorskip("lightly.loss")
lightly_utils = pytest.importorskip("lightly.models.utils")

TINY = {"queue_size": 32, "hidden_dim": 32, "out_dim": 16}
B = 6


def make(cls=DenseCL, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    backbone, dim = build_backbone("tiny_convnet")
    return cls(backbone, dim, **{**TINY, **kw})


def views(seed: int = 0, b: int = B, s: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, s, s, generator=g) for _ in range(2)]


def lightly_head(ours: nn.Module) -> nn.Module:
    """lightly's DenseCLProjectionHead holding our head's weights (same Linear-ReLU-Linear layout)."""
    d_in, d_hid, d_out = ours.dims
    ref = heads.DenseCLProjectionHead(d_in, d_hid, d_out)
    ref.layers.load_state_dict(ours.state_dict())
    return ref


def ntxent(queue: torch.Tensor) -> nn.Module:
    loss = lightly_loss.NTXentLoss(temperature=0.2, memory_bank_size=tuple(queue.shape))
    loss.memory_bank.bank = queue.clone()  # lightly reads negatives from its bank ([K, D] stored)
    return loss


@torch.no_grad()
def reference(model: DenseCL, vs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-image global and dense losses and the pooled dense keys, from lightly's pieces."""
    fq = model.backbone.forward_features(vs[0]).flatten(2).transpose(1, 2)
    fk = model.backbone_k.forward_features(vs[1]).flatten(2).transpose(1, 2)
    q = lightly_head(model.head)(fq.mean(1))
    k = lightly_head(model.head_k)(fk.mean(1))
    r = lightly_head(model.dense_head)(fq)
    t = lightly_head(model.dense_head_k)(fk)
    t_pos = lightly_utils.select_most_similar(fq, fk, F.normalize(t, dim=2))
    n, s2, d = r.shape
    glob = torch.stack([ntxent(model.queue.queue)(q[i:i + 1], k[i:i + 1]) for i in range(n)])
    dense = torch.stack([ntxent(model.dense_queue.queue)(r[i], t_pos[i]) for i in range(n)])
    return {"global": glob, "dense": dense, "pooled_keys": F.normalize(t.mean(1), dim=1), "keys": F.normalize(k, dim=1),
            "t_pos": t_pos}


def step(model: DenseCL, opt, vs, i: int = 0, max_steps: int = 10) -> dict[str, float]:
    return train_step(model, opt, vs, i, max_steps, lr=0.5)


def test_registry_options_and_frozen_key_branch():
    assert get_method("densecl") is DenseCL
    model = make()
    assert model.dense_queue.size == 32 and make(dense_queue_size=12).dense_queue.size == 12
    assert all(not p.requires_grad for p in model.dense_head_k.parameters())
    assert model.encoder() is model.backbone
    with pytest.raises(TypeError):
        make(not_an_option=1)
    with pytest.raises(ValueError):
        make(dense_weight=1.5)


def test_dense_head_is_lightly_head_and_two_1x1_convs():
    head = make().dense_head
    fmap = torch.randn(2, 16, 3, 3)
    tokens = fmap.flatten(2).transpose(1, 2)
    torch.testing.assert_close(head(tokens), lightly_head(head)(tokens), rtol=0, atol=1e-5)
    conv = [(m.weight[:, :, None, None], m.bias) for m in head if isinstance(m, nn.Linear)]
    by_conv = F.conv2d(F.relu(F.conv2d(fmap, *conv[0])), *conv[1])
    torch.testing.assert_close(head(tokens), by_conv.flatten(2).transpose(1, 2), rtol=0, atol=1e-5)


def test_correspondence_matches_lightly():
    g = torch.Generator().manual_seed(1)
    fq, fk, t = (torch.randn(3, 9, n, generator=g) for n in (5, 5, 4))
    idx = dense_correspondence(fq, fk)
    assert torch.equal(idx, lightly_utils.most_similar_index(fq, fk))
    torch.testing.assert_close(t.gather(1, idx[..., None].expand_as(t)), lightly_utils.select_most_similar(fq, fk, t))


def test_correspondence_recovers_known_permutation_of_a_2x2_map():
    fmap_q = F.normalize(torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(2)), dim=1)
    # key 0 = query 0 flipped left-right, key 1 = query 1 rotated 180 degrees (scaled: cosine ignores it)
    fmap_k = torch.stack([fmap_q[0].flip(2), 3.0 * fmap_q[1].flip(1, 2)])
    idx = dense_correspondence(fmap_q.flatten(2).transpose(1, 2), fmap_k.flatten(2).transpose(1, 2))
    # row-major locations (0 1 / 2 3): flip maps 0<->1, 2<->3; 180 degrees maps s -> 3 - s
    assert idx.tolist() == [[1, 0, 3, 2], [3, 2, 1, 0]]


def test_losses_match_lightly_reference_after_a_step():
    model = make(momentum=0.9)  # after one step the key encoder differs from the query encoder
    opt = build_optimizer(model, lr=0.5)
    step(model, opt, views(0))
    vs = views(1)
    ref = reference(model, vs)
    with torch.no_grad():
        out = model(vs, 1, 10)
    torch.testing.assert_close(out["loss_global"], ref["global"].mean(), rtol=0, atol=1e-5)
    torch.testing.assert_close(out["loss_dense"], ref["dense"].mean(), rtol=0, atol=1e-5)
    torch.testing.assert_close(out["loss"], 0.5 * ref["global"].mean() + 0.5 * ref["dense"].mean(), rtol=0, atol=1e-5)
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")


def test_queues_hold_keys_dense_one_pooled_key_per_image():
    model = make()
    opt = build_optimizer(model, lr=0.1)
    vs = views(3)
    ref = reference(model, vs)  # keys come from the weights before the step
    step(model, opt, vs)
    assert int(model.dense_queue.ptr) == B and int(model.queue.ptr) == B
    torch.testing.assert_close(model.dense_queue.queue[:B], ref["pooled_keys"], rtol=0, atol=1e-5)
    torch.testing.assert_close(model.queue.queue[:B], ref["keys"], rtol=0, atol=1e-5)


def test_locations_queue_holds_every_matched_key_as_lightlys_memory_bank():
    """``dense_queue_keys="locations"``: the dense queue fills with the N*S^2 matched keys, in the order lightly's
    NTXentLoss banks them (images, then locations), and the next step's dense loss reads them as negatives."""
    model = make(momentum=0.9, dense_queue_size=256, dense_queue_keys="locations")
    opt = build_optimizer(model, lr=0.5)
    vs = views(3)
    ref = reference(model, vs)
    step(model, opt, vs)
    n_keys = ref["t_pos"].shape[0] * ref["t_pos"].shape[1]
    assert n_keys > B and int(model.dense_queue.ptr) == n_keys and int(model.queue.ptr) == B
    # what lightly's recipe banks: its NTXentLoss given the flattened matched keys (and any query with a gradient)
    lightly_bank = lightly_loss.NTXentLoss(temperature=0.2, memory_bank_size=(256, TINY["out_dim"]))
    lightly_bank(torch.randn(n_keys, TINY["out_dim"], requires_grad=True), ref["t_pos"].flatten(end_dim=1))
    torch.testing.assert_close(model.dense_queue.queue[:n_keys], lightly_bank.memory_bank.bank[:n_keys], rtol=0, atol=1e-5)
    vs = views(4)
    ref = reference(model, vs)
    with torch.no_grad():
        out = model(vs, 1, 10)
    torch.testing.assert_close(out["loss_dense"], ref["dense"].mean(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="dense_queue_keys"):
        make(dense_queue_keys="grid")


def _enqueue_on_ranks(rank: int, world: int, vs: list[torch.Tensor], keys: str) -> torch.Tensor:
    model = make(dense_queue_size=256, dense_queue_keys=keys)
    with torch.no_grad():
        model([rank_slice(v, rank, world) for v in vs], 0, 10)
    model.after_step(0, 10)
    return model.dense_queue.queue[:int(model.dense_queue.ptr)].clone()


@pytest.mark.parametrize("keys", ["pooled", "locations"])
def test_dense_queue_gathers_keys_from_all_ranks(keys):
    vs = views(4)
    ref = reference(make(), vs)
    expected = ref["pooled_keys"] if keys == "pooled" else ref["t_pos"].flatten(end_dim=1)
    for queue in run_ranks(_enqueue_on_ranks, 2, vs, keys):
        torch.testing.assert_close(queue, expected, rtol=0, atol=1e-5)


def test_key_dense_head_follows_ema():
    m = 0.9
    model = make(momentum=m)
    opt = build_optimizer(model, lr=0.5)
    before_k = [p.detach().clone() for p in model.dense_head_k.parameters()]
    before_q = [p.detach().clone() for p in model.dense_head.parameters()]
    step(model, opt, views(5))
    after_q = [p.detach() for p in model.dense_head.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before_q, after_q)), "dense head got no gradient"
    for kb, ka, qa in zip(before_k, model.dense_head_k.parameters(), after_q):
        torch.testing.assert_close(ka, m * kb + (1 - m) * qa, rtol=0, atol=1e-6)


class MapBackbone(nn.Module):
    """The 'image' is the feature map itself: lets a test choose backbone features directly."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


def _unit_2d(degrees: list[float]) -> torch.Tensor:
    rad = torch.tensor(degrees) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], 1)


def test_matching_uses_backbone_features_not_head_outputs():
    model = DenseCL(MapBackbone(), 2, hidden_dim=2, out_dim=2, queue_size=8, channels_last=False)
    stretch = torch.diag(torch.tensor([1.0, 10.0]))  # dense head = x -> diag(1, 10) x on positive features
    with torch.no_grad():
        for h in (model.dense_head, model.dense_head_k):
            h[0].weight.copy_(torch.eye(2))
            h[2].weight.copy_(stretch)
            h[0].bias.zero_()
            h[2].bias.zero_()
    a = _unit_2d([45.0] * 4)  # every query location at 45 degrees
    b = _unit_2d([30.0, 65.0, 5.0, 85.0])  # backbone: 30 is closest; after the stretch 65 is closest
    r, t = F.normalize(a @ stretch, dim=1), F.normalize(b @ stretch, dim=1)
    assert (a @ b.T).argmax(1).tolist() == [0] * 4 and (r @ t.T).argmax(1).tolist() == [1] * 4
    as_map = lambda v: v.T.reshape(1, 2, 2, 2)  # noqa: E731 - [S2, C] -> [1, C, 2, 2]
    with torch.no_grad():
        got = model([as_map(a), as_map(b)], 0, 1)["loss_dense"]

    def dense_loss(pos: int) -> torch.Tensor:
        return model.criterion(r, t[pos].expand_as(r), model.dense_queue.queue).mean()

    torch.testing.assert_close(got, dense_loss(0), rtol=0, atol=1e-6)
    assert abs(float(got - dense_loss(1))) > 1e-3


def test_pair_weights_weight_each_image_loss():
    model = make()
    vs = views(6)
    plain = model(vs, 0, 10)["loss"]
    torch.testing.assert_close(model(vs, 0, 10, pair_weights=torch.ones(B))["loss"], plain)
    only0 = model(vs, 0, 10, pair_weights=torch.tensor([float(B)] + [0.0] * (B - 1)))["loss"]
    ref = reference(model, vs)
    torch.testing.assert_close(only0, 0.5 * ref["global"][0] + 0.5 * ref["dense"][0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        model(vs, 0, 10, pair_weights=torch.ones(B - 1))


def test_lambda_zero_is_exactly_mocov2():
    dense, moco = make(dense_weight=0.0), make(MoCoV2)
    for i in range(2):  # the second step also compares the queues and key encoders after a step
        vs = views(10 + i)
        outs = [m(vs, i, 10) for m in (dense, moco)]
        assert torch.equal(outs[0]["loss"], outs[1]["loss"])
        for o, m in zip(outs, (dense, moco)):
            m.zero_grad()
            o["loss"].backward()
            with torch.no_grad():
                for p in list(m.backbone.parameters()) + list(m.head.parameters()):
                    p -= 0.5 * p.grad
            m.after_step(i, 10)
        for name, p in moco.named_parameters():
            torch.testing.assert_close(dict(dense.named_parameters())[name], p, rtol=0, atol=0)
        assert torch.equal(dense.queue.queue, moco.queue.queue)


def test_dense_warmup_sets_lambda_zero_first():
    model = make(warmup_steps_dense=2)
    vs = views(7)
    with torch.no_grad():
        early, late = model(vs, 1, 10), model(vs, 2, 10)
    assert torch.equal(early["loss"], early["loss_global"])
    torch.testing.assert_close(late["loss"], 0.5 * late["loss_global"] + 0.5 * late["loss_dense"])


def test_trajectory_equals_lightly_recipe_with_locations_queue():
    """From the same weights, heads, queues and batches, steps of our DenseCL (``dense_queue_keys:
    locations``, pretrain defaults: shuffle-BN, fused queue InfoNCE, EMA after the step, every parameter
    decayed) follow lightly's recipe (bench/lightly_steps.py: its heads, select_most_similar, one NTXentLoss
    memory bank per branch, update_momentum before the step, torch SGD over every parameter): losses to
    1e-5, weights to 1e-4 of how far they moved, and the same keys in the same queue slots."""
    import copy

    torch.manual_seed(0)
    base, dim = build_backbone("tiny_convnet")
    s2 = base.forward_features(views()[0]).flatten(2).shape[-1]
    model = DenseCL(copy.deepcopy(base), dim, hidden_dim=32, out_dim=16, queue_size=4 * B,
                    dense_queue_size=2 * B * s2, momentum=0.9, dense_queue_keys="locations")
    opt = build_optimizer(model, "sgd", lr=0.05, weight_decay=1e-2)
    ref = nn.ModuleDict({"backbone": copy.deepcopy(base), "g": lightly_head(model.head),
                         "l": lightly_head(model.dense_head)})
    twin = copy.deepcopy(ref)
    lightly_utils.deactivate_requires_grad(twin)
    crit_g, crit_l = ntxent(model.queue.queue), ntxent(model.dense_queue.queue)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)

    def encode(net, x):
        fmap = net["backbone"].forward_features(x)
        feats = fmap.flatten(2).transpose(1, 2)
        return feats, net["g"](fmap.mean((2, 3))), net["l"](feats)

    start = [p.detach().clone() for p in base.parameters()]
    for i in range(4):
        x_q, x_k = views(seed=20 + i)
        ours = train_step(model, opt, [x_q, x_k], i, 100, lr=0.05)["loss"]
        for name in ("backbone", "g", "l"):
            lightly_utils.update_momentum(ref[name], twin[name], m=0.9)
        q_feats, q_g, q_l = encode(ref, x_q)
        with torch.no_grad():
            k_feats, k_g, k_l = encode(twin, x_k)
            k_l = lightly_utils.select_most_similar(q_feats, k_feats, k_l)
        loss = 0.5 * (crit_g(q_g, k_g) + crit_l(q_l.flatten(end_dim=1), k_l.flatten(end_dim=1)))
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        assert ours == pytest.approx(float(loss.detach()), abs=1e-5)
        apart, moved = gap(model.backbone.parameters(), ref["backbone"].parameters(), start)
        assert apart <= 1e-4 * moved
    torch.testing.assert_close(model.queue.queue, crit_g.memory_bank.bank, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.dense_queue.queue, crit_l.memory_bank.bank, atol=1e-5, rtol=0)
