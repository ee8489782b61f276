"""lightly's implementations of the MoCo v3, BYOL, SwAV and DenseCL recipes, built from its public modules
as its examples do: the "lightly" side of bench/methods.py and bench/knn.py (what each recipe contains, and
where lightly lacks a piece, is in bench/methods.py's docstring). Each builder returns a step
``views -> None`` with the trained ``step.backbone`` attached; ``matched=True`` puts model and inputs in
channels_last and the forward under our default autocast (bench/common.py), as ours runs.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import autocast
from bench.methods import HIDDEN, LR, MAX_STEPS, OUT, PROTOTYPES, QUEUE, WD, Step, _nhwc


def start_like(pairs: list[tuple[nn.Module, nn.Module]], banks: list[tuple[torch.Tensor, torch.Tensor]] = ()) -> bool:
    """Give lightly's heads our heads' initial weights, ``(lightly module, our module)`` pairs, parameter by
    parameter in order, and its memory banks our queues' initial contents, so that a comparison's two sides
    differ only in their implementations (bench/knn.py: with the backbone, views and batch order already
    shared). lightly's module may end with one more BN's affine pair at its identity init (weight 1, bias 0:
    MoCo v3's last projector BN, affine in lightly's MoCoProjectionHead, affine-free in ours and the paper),
    which computes what ours does at the start. Returns False, copying nothing, when the layouts differ
    otherwise -- then each side keeps its own random init."""
    for dst, src in pairs:
        d, s = list(dst.parameters()), list(src.parameters())
        extra = d[len(s):]
        if [p.shape for p in d[:len(s)]] != [p.shape for p in s] or not (
                not extra or (len(extra) == 2 and bool((extra[0] == 1).all()) and bool((extra[1] == 0).all()))):
            return False
    with torch.no_grad():
        for dst, src in pairs:
            for a, b in zip(dst.parameters(), src.parameters()):  # stops at ours' last parameter
                a.copy_(b)
        for bank, queue in banks:
            bank.copy_(queue)
    return True


def _lightly_sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=WD)


def _frozen_twin(module: nn.Module) -> nn.Module:
    from lightly.models.utils import deactivate_requires_grad

    twin = copy.deepcopy(module)
    deactivate_requires_grad(twin)
    return twin


def _lightly_two_view(base: nn.Module, feat_dim: int, matched: bool, method: str, like: nn.Module | None = None) -> Step:
    """BYOL / MoCo v3 built from lightly's modules: online backbone + projector + predictor, momentum
    backbone + projector, both views through both branches. ``like``: our model, whose initial head weights
    lightly's heads take where the layouts agree (:func:`start_like`)."""
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, MoCoProjectionHead
    from lightly.models.modules.heads import ProjectionHead
    from lightly.models.utils import update_momentum
    from lightly.utils.scheduler import cosine_schedule

    out = OUT[method]

    class TwoBranch(nn.Module):
        def __init__(self, backbone: nn.Module):
            super().__init__()
            self.backbone = backbone
            if method == "byol":
                self.projection_head = BYOLProjectionHead(feat_dim, HIDDEN, out)
                self.prediction_head = BYOLPredictionHead(out, HIDDEN, out)
            else:  # MoCo v3, ResNet variant: 2-layer BN projector, predictor without bias and last BN
                self.projection_head = MoCoProjectionHead(feat_dim, HIDDEN, out, num_layers=2, batch_norm=True)
                self.prediction_head = ProjectionHead([(out, HIDDEN, nn.BatchNorm1d(HIDDEN), nn.ReLU()),
                                                       (HIDDEN, out, None, None, False)])
            self.started_like = like is not None and start_like([(self.projection_head, like.projector),
                                                                  (self.prediction_head, like.predictor)])
            self.backbone_momentum = _frozen_twin(self.backbone)
            self.projection_head_momentum = _frozen_twin(self.projection_head)

        def forward(self, x):
            return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

        def forward_momentum(self, x):
            return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    model = TwoBranch(copy.deepcopy(base))
    if matched:
        model.to(memory_format=torch.channels_last)
    opt = _lightly_sgd(model)
    if method == "byol":
        criterion = NegativeCosineSimilarity()

        def loss_fn(p0, p1, z0, z1):
            return 0.5 * (criterion(p0, z1) + criterion(p1, z0))
    else:
        tau = 1.0  # MoCo v3's ResNet temperature, as ours uses for CNNs

        def ctr(q, k):
            logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / tau
            return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device)) * (2 * tau)

        def loss_fn(p0, p1, z0, z1):
            return ctr(p0, z1) + ctr(p1, z0)
    state = {"step": 0}

    def step(views):
        x0, x1 = views
        if matched:
            x0, x1 = _nhwc(x0), _nhwc(x1)
        m = cosine_schedule(state["step"], MAX_STEPS, 0.99, 1.0)
        update_momentum(model.backbone, model.backbone_momentum, m=m)
        update_momentum(model.projection_head, model.projection_head_momentum, m=m)
        with autocast(matched):
            p0, p1 = model(x0), model(x1)
            z0, z1 = model.forward_momentum(x0), model.forward_momentum(x1)
            loss = loss_fn(p0, p1, z0, z1)
        loss.backward()
        opt.step()
        opt.zero_grad()
        float(loss.detach())  # ours converts its metrics to floats too
        state["step"] += 1
    step.backbone = model.backbone
    step.started_like = getattr(model, "started_like", False)
    return step


def _lightly_swav(base: nn.Module, feat_dim: int, matched: bool, like: nn.Module | None = None) -> Step:
    from lightly.loss import SwaVLoss
    from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes

    out = OUT["swav"]

    class SwaV(nn.Module):
        def __init__(self, backbone: nn.Module):
            super().__init__()
            self.backbone = backbone
            self.projection_head = SwaVProjectionHead(feat_dim, HIDDEN, out)
            self.prototypes = SwaVPrototypes(out, n_prototypes=PROTOTYPES)
            # lightly's prototype layer has a bias (ours, the paper's, none): it keeps its own init; the
            # prototype vectors themselves start as ours
            self.started_like = like is not None and start_like(
                [(self.projection_head, like.head)], [(next(self.prototypes.parameters()), like.prototypes.weight)])

        def forward(self, x):
            z = F.normalize(self.projection_head(self.backbone(x).flatten(start_dim=1)), dim=1, p=2)
            return self.prototypes(z)

    model = SwaV(copy.deepcopy(base))
    if matched:
        model.to(memory_format=torch.channels_last)
    criterion = SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)
    opt = _lightly_sgd(model)

    def step(views):
        if matched:
            views = [_nhwc(x) for x in views]
        model.prototypes.normalize()
        with autocast(matched):
            scores = [model(x) for x in views]
            loss = criterion(scores[:2], scores[2:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        float(loss.detach())
    step.backbone = model.backbone
    step.started_like = getattr(model, "started_like", False)
    return step


def _lightly_densecl(base: nn.Module, feat_dim: int, matched: bool, momentum: float = 0.999,
                     like: nn.Module | None = None) -> Step:
    from lightly.loss import NTXentLoss
    from lightly.models.modules import DenseCLProjectionHead
    from lightly.models.utils import select_most_similar, update_momentum

    out = OUT["densecl"]

    class DenseCL(nn.Module):
        def __init__(self, backbone: nn.Module):
            super().__init__()
            self.backbone = backbone
            # hidden = the C5 width, as lightly's example (512, 512, 128 on resnet18) and the paper (2048 on R50)
            self.projection_head_global = DenseCLProjectionHead(feat_dim, feat_dim, out)
            self.projection_head_local = DenseCLProjectionHead(feat_dim, feat_dim, out)
            self.started_like = like is not None and start_like([(self.projection_head_global, like.head),
                                                                  (self.projection_head_local, like.dense_head)])
            self.backbone_momentum = _frozen_twin(self.backbone)
            self.projection_head_global_momentum = _frozen_twin(self.projection_head_global)
            self.projection_head_local_momentum = _frozen_twin(self.projection_head_local)
            self.pool = nn.AdaptiveAvgPool2d((1, 1))

        def _encode(self, backbone, head_global, head_local, x):
            fmap = backbone.forward_features(x)  # lightly's example backbone returns the C5 map
            g = head_global(self.pool(fmap).flatten(start_dim=1))
            feats = fmap.flatten(start_dim=2).permute(0, 2, 1)  # [B, H*W, C]
            return feats, g, head_local(feats)

        def forward(self, x):
            return self._encode(self.backbone, self.projection_head_global, self.projection_head_local, x)

        def forward_momentum(self, x):
            return self._encode(self.backbone_momentum, self.projection_head_global_momentum,
                                self.projection_head_local_momentum, x)

    model = DenseCL(copy.deepcopy(base))
    if matched:
        model.to(memory_format=torch.channels_last)
    criterion_global = NTXentLoss(temperature=0.2, memory_bank_size=(QUEUE, out))
    criterion_local = NTXentLoss(temperature=0.2, memory_bank_size=(QUEUE, out))
    if like is not None:
        start_like([], [(criterion_global.memory_bank.bank, like.queue.queue),
                        (criterion_local.memory_bank.bank, like.dense_queue.queue)])
    opt = _lightly_sgd(model)

    def step(views):
        x_q, x_k = views
        if matched:
            x_q, x_k = _nhwc(x_q), _nhwc(x_k)
        update_momentum(model.backbone, model.backbone_momentum, m=momentum)
        update_momentum(model.projection_head_global, model.projection_head_global_momentum, m=momentum)
        update_momentum(model.projection_head_local, model.projection_head_local_momentum, m=momentum)
        with autocast(matched):
            q_feats, q_global, q_local = model(x_q)
            k_feats, k_global, k_local = model.forward_momentum(x_k)
            k_local = select_most_similar(q_feats, k_feats, k_local)
            loss_global = criterion_global(q_global, k_global)
            loss_local = criterion_local(q_local.flatten(end_dim=1), k_local.flatten(end_dim=1))
            loss = 0.5 * (loss_global + loss_local)
        loss.backward()
        opt.step()
        opt.zero_grad()
        float(loss.detach())
    step.backbone = model.backbone
    step.started_like = getattr(model, "started_like", False)
    return step
