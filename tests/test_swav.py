"""SwAV (METHODS.md 7.4): Sinkhorn and loss against lightly 1.6 and a literal reference, prototype
normalisation and freezing, the queue schedule, pair weights, and 2 ranks == 1 rank (with queue + freeze)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightly.loss.swav_loss import SwaVLoss
from lightly.loss.swav_loss import sinkhorn as lightly_sinkhorn

from tasks.models.backbone import build_backbone
from tasks.pretrain.loop import build_optimizer, train_step
from tasks.pretrain.methods import get_method
from tasks.pretrain.methods.swav import SwAV, sinkhorn, swapped_prediction
from tasks.pretrain.syncbn import convert_sync_bn
from tests.dist_harness import ddp_gradients, mean_over_ranks, rank_slice, run_ranks

SIZE, K = 16, 10


def make(**kw) -> SwAV:
    torch.manual_seed(0)
    backbone, dim = build_backbone("tiny_convnet")
    kw = {"hidden_dim": 32, "out_dim": 16, "num_prototypes": K, "num_local_crops": 2, **kw}
    return SwAV(backbone, dim, **kw)


def views(model: SwAV, b: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, a.size, a.size, generator=g) for a in model.view_augments(SIZE)]


def random_scores(v: int, n: int, k: int = K, seed: int = 0) -> torch.Tensor:
    """Cosine scores of unit embeddings against unit prototypes, ``[v, n, k]``."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(v, n, 16, generator=g), dim=-1)
    c = F.normalize(torch.randn(k, 16, generator=g), dim=-1)
    return z @ c.t()


@torch.no_grad()
def recompute_scores(model: SwAV, vs: list[torch.Tensor]) -> torch.Tensor:
    """The scores forward computed (train-mode BN gives the same batch statistics for the same input)."""
    return (model.embed(vs) @ model.prototypes.weight.t()).view(len(vs), vs[0].shape[0], -1)


def lightly_loss(scores: torch.Tensor, queue_scores: list[torch.Tensor] | None = None) -> torch.Tensor:
    return SwaVLoss()(list(scores[:2]), list(scores[2:]), queue_scores).squeeze()


def test_registry_options_views_and_unit_prototypes():
    assert get_method("swav") is SwAV
    with pytest.raises(TypeError):
        make(not_an_option=1)
    model = make()
    assert [a.size for a in model.view_augments(SIZE)] == [16, 16, 8, 8]
    assert len(make(num_local_crops=6).view_augments(SIZE)) == 8
    assert torch.allclose(model.prototypes.weight.norm(dim=1), torch.ones(K), atol=1e-6)
    assert model.prototypes.bias is None and model.encoder() is model.backbone


def test_sinkhorn_matches_lightly():
    # lightly divides prototype sums without the 1/K factor; a per-row constant is cancelled by the next
    # sample normalisation, so the codes are the same.
    s = random_scores(2, 12)
    for eps, it in [(0.05, 3), (0.1, 1), (0.03, 7)]:
        ours = sinkhorn(s, eps, it)  # both crops in one batched call
        ref = torch.stack([lightly_sinkhorn(x, iterations=it, epsilon=eps) for x in s])
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_sinkhorn_matches_literal_reference():
    """METHODS.md 7.4 written out with loops in float64 on a 5 x 4 problem."""
    s = random_scores(1, 5, 4, seed=3)[0].double()
    eps, n, k = 0.05, 5, 4
    q = [[float(torch.exp(s[i, j] / eps)) for i in range(n)] for j in range(k)]  # Q = exp(S/eps)^T, K x N
    total = sum(map(sum, q))
    q = [[x / total for x in row] for row in q]
    for _ in range(3):
        q = [[x / (sum(row) * k) for x in row] for row in q]
        col = [sum(q[j][i] for j in range(k)) for i in range(n)]
        q = [[q[j][i] / (col[i] * n) for i in range(n)] for j in range(k)]
    ref = torch.tensor(q, dtype=torch.float64).t() * n
    torch.testing.assert_close(sinkhorn(s).double(), ref, rtol=1e-5, atol=1e-6)


def test_sinkhorn_marginals():
    s = random_scores(2, 20, K, seed=1)
    for it in (1, 3, 300):
        q = sinkhorn(s, iterations=it)
        assert (q >= 0).all()
        torch.testing.assert_close(q.sum(-1), torch.ones(2, 20))  # every sample's code is a distribution
    # equal partition: each prototype gets N / K samples' worth of mass once converged
    torch.testing.assert_close(sinkhorn(s, iterations=300).sum(-2), torch.full((2, K), 20 / K), rtol=0, atol=1e-4)


def test_loss_functions_match_lightly_with_and_without_queue():
    s = random_scores(8, 6, seed=2)
    ours = swapped_prediction(s, sinkhorn(s[:2])).mean()
    torch.testing.assert_close(ours, lightly_loss(s), rtol=1e-5, atol=1e-5)
    past = random_scores(2, 9, seed=4)
    codes = sinkhorn(torch.cat([past, s[:2]], dim=1))[:, 9:]
    torch.testing.assert_close(swapped_prediction(s, codes).mean(), lightly_loss(s, list(past)), rtol=1e-5, atol=1e-5)


def test_forward_matches_lightly_and_pair_weights():
    model = make()
    vs = views(model)
    out = model(vs, 0, 10)
    assert out["loss"].requires_grad and not out["code_entropy"].requires_grad
    assert 0 < float(out["code_entropy"]) <= torch.log(torch.tensor(float(K))) + 1e-5
    scores = recompute_scores(model, vs)
    torch.testing.assert_close(out["loss"].detach(), lightly_loss(scores), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(vs, 0, 10, torch.ones(6))["loss"], out["loss"], rtol=0, atol=0)
    w = torch.linspace(0.0, 2.0, 6)
    per_image = swapped_prediction(scores, sinkhorn(scores[:2]))
    torch.testing.assert_close(model(vs, 0, 10, w)["loss"].detach(), (w * per_image).mean(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        model(vs, 0, 10, torch.ones(5))


def test_prototypes_unit_norm_after_each_step():
    model = make()
    opt = build_optimizer(model, "sgd", 1.0, 0.9, 1e-2)
    before = model.prototypes.weight.detach().clone()
    for step in range(3):
        train_step(model, opt, views(model, seed=step), step, 10, 1.0)
        torch.testing.assert_close(model.prototypes.weight.norm(dim=1), torch.ones(K))
    assert not torch.allclose(model.prototypes.weight, before, atol=1e-4)  # not frozen: steps_per_epoch unknown


def test_freeze_schedule():
    model = make()
    assert model.freeze_steps() == 0  # steps_per_epoch unknown and no explicit count
    model.steps_per_epoch = 4
    assert model.freeze_steps() == 4
    assert make(freeze_prototypes_epochs=0.5, freeze_prototypes_steps=None).freeze_steps() == 0
    explicit = make(freeze_prototypes_steps=3)
    assert explicit.freeze_steps() == 3
    explicit.steps_per_epoch = 100
    assert explicit.freeze_steps() == 3


def test_frozen_prototypes_get_zero_gradient_then_train():
    model = make()
    model.steps_per_epoch = 2  # freeze_prototypes_epochs=1 -> steps 0 and 1 frozen
    opt = build_optimizer(model, "sgd", 0.5, 0.9, 1e-2)  # weight decay on a zero gradient must not move them
    w0 = model.prototypes.weight.detach().clone()
    for step in range(3):
        train_step(model, opt, views(model, seed=step), step, 10, 0.5)
        g = model.prototypes.weight.grad
        assert g is not None  # stays in the graph (DDP with find_unused_parameters=False)
        assert model.head[0].weight.grad.abs().sum() > 0
        if step < 2:
            assert torch.count_nonzero(g) == 0
            torch.testing.assert_close(model.prototypes.weight, w0, rtol=0, atol=1e-6)
        else:
            assert g.abs().sum() > 0
            assert not torch.allclose(model.prototypes.weight, w0, atol=1e-4)


def step_once(model: SwAV, opt: torch.optim.Optimizer, vs: list[torch.Tensor], step: int):
    """train_step's order, keeping what after_step enqueues: (metrics, global-crop keys ``[B, 2, D]``)."""
    opt.zero_grad(set_to_none=True)
    out = model(vs, step, 10)
    out["loss"].backward()
    keys = model._keys.clone()
    opt.step()
    model.after_step(step, 10)
    return {k: v.detach() for k, v in out.items()}, keys


def test_queue_used_only_from_start_step_once_full():
    b, length = 6, 12
    model = make(queue_length=length, queue_start_step=3)
    opt = build_optimizer(model, "sgd", 0.1, 0.9, 1e-4)
    recent = []
    for step in range(5):
        vs = views(model, b, seed=step)
        scores = recompute_scores(model, vs)
        past = [q.queue @ model.prototypes.weight.detach().t() for q in model.queues]
        out, keys = step_once(model, opt, vs, step)
        assert float(out["queue_used"]) == float(step >= 3)
        with_queue, without = lightly_loss(scores, past), lightly_loss(scores)
        torch.testing.assert_close(out["loss"], with_queue if step >= 3 else without, rtol=1e-5, atol=1e-5)
        if step >= 3:
            assert abs(float(with_queue - without)) > 1e-4
        recent.append(keys)
        if step >= 1:  # the queue holds the global-crop embeddings of the last 2 batches (FIFO order aside)
            kept = torch.cat(recent[-2:])
            for g in range(2):
                assert {tuple(r) for r in model.queues[g].queue.tolist()} == {tuple(r) for r in kept[:, g].tolist()}
    assert int(model.queue_filled) == length


def test_queue_not_used_until_full_and_epoch_start():
    model = make(queue_length=12, queue_start_step=0)
    opt = build_optimizer(model, "sgd", 0.1, 0.9, 1e-4)
    used = [train_step(model, opt, views(model, 6, s), s, 10, 0.1)["queue_used"] for s in range(3)]
    assert used == [0.0, 0.0, 1.0]
    by_epoch = make(queue_length=6, queue_start_epochs=1)
    by_epoch.steps_per_epoch = 4
    by_epoch.queue_filled.fill_(6)
    assert [by_epoch.queue_in_use(s) for s in (0, 3, 4)] == [False, False, True]
    assert not make().queue_in_use(100) and make().queues is None


def _dist_run(rank: int, world: int) -> dict:
    s = random_scores(2, 8, seed=5)  # raw Sinkhorn on this rank's share, plus an uneven split (7 = 4 + 3)
    codes = sinkhorn(s.tensor_split(world, dim=1)[rank])
    odd = sinkhorn(s[:, :7].tensor_split(world, dim=1)[rank])
    # The whole method with an 11-entry queue (uneven shards), in use from step 2, and one frozen step.
    model = convert_sync_bn(make(queue_length=11, queue_start_step=0, freeze_prototypes_steps=1), gpu=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses, used = [], []
    for step in range(3):
        vs = [rank_slice(v, rank, world) for v in views(model, 8, seed=10 + step)]
        opt.zero_grad(set_to_none=True)
        out = model(vs, step, 10)
        out["loss"].backward()
        if dist.is_initialized():
            grads = ddp_gradients(model)
            for n, p in model.named_parameters():
                if n in grads:
                    p.grad.copy_(grads[n])
        else:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        losses.append(mean_over_ranks(out["loss"]) if dist.is_initialized() else out["loss"].detach())
        used.append(float(out["queue_used"]))
        opt.step()
        model.after_step(step, 10)
    return {"codes": codes, "odd": odd, "losses": losses, "used": used, "grads": grads,
            "queue": [q.queue.clone() for q in model.queues]}


def test_two_ranks_equal_one_rank_sinkhorn_queue_and_freeze():
    one = _dist_run(0, 1)  # without a process group the collectives are no-ops: one rank, in this process
    two = run_ranks(_dist_run, 2)
    torch.testing.assert_close(torch.cat([r["codes"] for r in two], dim=1), one["codes"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["odd"] for r in two], dim=1), one["odd"], rtol=1e-5, atol=1e-6)
    assert one["used"] == [0.0, 0.0, 1.0]
    for r in two:
        assert r["used"] == one["used"] and r["grads"].keys() == one["grads"].keys()
        torch.testing.assert_close(torch.stack(r["losses"]), torch.stack(one["losses"]), rtol=1e-5, atol=1e-5)
        for k, g in one["grads"].items():
            torch.testing.assert_close(r["grads"][k], g, rtol=1e-4, atol=1e-5, msg=f"gradient of {k}")
        for a, b in zip(r["queue"], one["queue"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
