"""MoCo v2 training step: ours vs the bare backbone work it needs, and vs lightly's MoCo v2 recipe.

All steps use the same backbone weights, batch and thread count and are timed interleaved (median over
rounds, after warm-up, of the ratio within each round). "Bare backbone work" = backbone fwd + bwd (from a
fixed dense gradient on the pooled features) on the query view + backbone fwd (no grad) on the key view +
SGD step over the backbone parameters, in the same memory layout (channels_last) and precision as ours
(the pretrain stage's defaults: ``pretrain.precision: auto`` is bf16 autocast on a CPU with AMX).
lightly's step follows its MoCo example: MoCoProjectionHead, NTXentLoss(memory_bank_size=...),
update_momentum, deactivate_requires_grad, plain NCHW fp32 tensors; ``lightly_matched`` is the same recipe
given our layout and precision (what is left once those are equal).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from bench.common import AUTOCAST, autocast, interleaved_medians, median_ratio, precision_name, report, setup_threads
from tasks.models.backbone import build_backbone
from tasks.pretrain.loop import build_optimizer, train_step
from tasks.pretrain.methods.mocov2 import MoCoV2

QUEUE, HIDDEN, OUT, LR = 4096, 2048, 128, 0.03


def _bare_step(backbone_cl: bool, base: nn.Module):
    q = copy.deepcopy(base)
    k = copy.deepcopy(base).requires_grad_(False)
    if backbone_cl:
        q.to(memory_format=torch.channels_last)
        k.to(memory_format=torch.channels_last)
    opt = build_optimizer(q, lr=LR)
    grad = {}

    def step(views):
        x_q, x_k = views
        if backbone_cl:
            x_q, x_k = (x.contiguous(memory_format=torch.channels_last) for x in (x_q, x_k))
        opt.zero_grad(set_to_none=True)
        with autocast():
            feats = q(x_q)
        # A dense upstream gradient, as the head sends; ``.sum()`` would send a stride-0 one.
        if "g" not in grad:
            grad["g"] = torch.randn(feats.shape, generator=torch.Generator().manual_seed(1)).to(feats.dtype)
        feats.backward(grad["g"])
        with torch.no_grad(), autocast():
            k(x_k)
        opt.step()
    return step


def _ours_step(base: nn.Module, feat_dim: int, channels_last: bool = True):
    model = MoCoV2(copy.deepcopy(base), feat_dim, hidden_dim=HIDDEN, out_dim=OUT, queue_size=QUEUE,
                   channels_last=channels_last)
    opt = build_optimizer(model, lr=LR)
    state = {"step": 0}

    def step(views):
        train_step(model, opt, views, state["step"], 10_000, LR, autocast_dtype=AUTOCAST)
        state["step"] += 1
    step.backbone = model.backbone  # what bench/knn.py evaluates after training
    return step


def _lightly_step(base: nn.Module, feat_dim: int, matched: bool = False, momentum: float = 0.999,
                  like: MoCoV2 | None = None):
    """lightly's MoCo example; ``matched``: model and inputs channels_last and the forward under our autocast;
    ``like``: our model, whose initial head weights and queue lightly's head and memory bank take."""
    channels_last = matched
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    from bench.lightly_steps import start_like

    class LightlyMoCo(nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone
            self.projection_head = MoCoProjectionHead(feat_dim, HIDDEN, OUT)
            self.started_like = like is not None and start_like([(self.projection_head, like.head)])
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)

        def forward(self, x):
            return self.projection_head(self.backbone(x).flatten(start_dim=1))

        def forward_momentum(self, x):
            return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    model = LightlyMoCo(copy.deepcopy(base))
    if channels_last:
        model.to(memory_format=torch.channels_last)
    criterion = NTXentLoss(temperature=0.2, memory_bank_size=(QUEUE, OUT))
    if like is not None:
        start_like([], [(criterion.memory_bank.bank, like.queue.queue)])
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)

    def step(views):
        x_q, x_k = views
        if channels_last:
            x_q, x_k = (x.contiguous(memory_format=torch.channels_last) for x in (x_q, x_k))
        update_momentum(model.backbone, model.backbone_momentum, m=momentum)
        update_momentum(model.projection_head, model.projection_head_momentum, m=momentum)
        with autocast(matched):
            loss = criterion(model(x_q), model.forward_momentum(x_k))
        loss.backward()
        opt.step()
        opt.zero_grad()
        float(loss.detach())  # ours converts its metrics to floats too
    step.backbone = model.backbone
    step.started_like = getattr(model, "started_like", False)
    return step


def run(quick: bool = False) -> None:
    setup_threads(2)
    batch, size, rounds = (32, 64, 10) if quick else (64, 64, 15)  # rounds: see bench/methods.py _sizes
    print(f"# mocov2: resnet18 cifar stem, {size}px, batch {batch}, queue {QUEUE}, head {HIDDEN}->{OUT}, "
          f"{rounds} interleaved rounds after 1 warm-up; ours and bare in {precision_name()}")
    torch.manual_seed(0)
    base, feat_dim = build_backbone("resnet18", cifar_stem=True)
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(batch, 3, size, size, generator=g) for _ in range(2)]
    steps = {
        "bare": _bare_step(True, base),
        "ours": _ours_step(base, feat_dim),
        "lightly": _lightly_step(base, feat_dim),
        "lightly_matched": _lightly_step(base, feat_dim, matched=True),
    }
    med, times = interleaved_medians({k: (lambda f=f: f(views)) for k, f in steps.items()}, rounds=rounds)
    print("# median s/step: " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()))
    report("mocov2.step_over_backbone", median_ratio(times, "ours", "bare"), "<=1.05")
    report("mocov2.ours_over_lightly", median_ratio(times, "ours", "lightly"), "<=0.9")
    # lightly given our layout and precision: what is left besides those two defaults.
    report("mocov2.ours_over_lightly_matched", median_ratio(times, "ours", "lightly_matched"), "<=1.0")
