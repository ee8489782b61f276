"""Training steps of MoCo v3, BYOL, SwAV and DenseCL: ours vs the bare backbone work each needs, and vs
lightly's implementation of the same recipe (as bench/mocov2.py does for MoCo v2).

Per method, on resnet18 (CIFAR stem), 2 torch threads, one fixed set of view tensors (sizes from the
method's ``view_augments``), every step built from the same backbone weights and timed interleaved (median
over rounds, after warm-up, of the ratio within each round):

* ``ours``: ``train_step`` with our method and SGD, the method in channels_last and the forward in the
  precision the pretrain stage uses by default (``pretrain.channels_last: true``, ``pretrain.precision:
  auto``: bf16 autocast on a CPU with AMX, else fp32).
* ``bare``: the backbone work that step needs, in the same layout and precision: backbone fwd + bwd (from a fixed dense
  gradient on its output) for every view that gets gradients, grouped into backbone passes as ours groups
  them; backbone fwd under ``no_grad`` on a frozen copy for every view a momentum/target branch encodes; an
  SGD step over the backbone parameters.

  - MoCo v3, BYOL: both views fwd+bwd (one pass each), both views fwd-only on the momentum copy.
  - SwAV: every crop fwd+bwd (same-size crops concatenated into one pass, as ours and main_swav.py do);
    no momentum encoder.
  - DenseCL: query view fwd+bwd, key view fwd-only, through ``forward_features`` (the unpooled map; the
    dense gradient is on the map), i.e. MoCo v2's bare work on the C5 map.
* ``lightly``: the recipe built from lightly's public modules as its examples do, plain NCHW fp32 tensors,
  torch SGD (lr 0.03, momentum 0.9, wd 1e-4); ``lightly_matched``: the same with model and inputs in
  channels_last and the forward under our autocast, i.e. what is left once layout and precision are equal.

  - BYOL: BYOLProjectionHead + BYOLPredictionHead, NegativeCosineSimilarity (symmetrised), update_momentum
    with lightly's cosine_schedule(0.99 -> 1).
  - SwAV: SwaVProjectionHead + SwaVPrototypes (normalised before each step), SwaVLoss over 2 high- and the
    low-resolution crops, one backbone pass per crop as lightly's example does.
  - DenseCL: DenseCLProjectionHead global + local, momentum copies (update_momentum, m 0.999),
    select_most_similar, NTXentLoss with a memory bank per branch, loss = 0.5 (global + local).
  - MoCo v3: lightly 1.6 has no MoCo v3 model, loss or example, only heads. The lightly side is
    MoCoProjectionHead(batch_norm=True) as projector (2 layers for a ResNet; its last BN keeps affine
    parameters, ours has none), lightly's ProjectionHead shaped as the ResNet predictor
    (Linear-BN-ReLU-Linear, no bias), update_momentum + cosine_schedule(0.99 -> 1), and the paper's
    ``ctr(q1, k2) + ctr(q2, k1)`` (in-batch negatives) written here in plain torch.

Head sizes are identical between ours and lightly's: hidden 2048, out 256 (MoCo v3, BYOL) or 128 (SwAV);
DenseCL's two heads (and the MoCo v2 head it is compared with) are C5-wide, 512 -> 512 -> 128, as the paper's
2048 -> 2048 -> 128 on ResNet-50 and lightly's resnet18 example (their default here). SwAV has 3000
prototypes, DenseCL (and its MoCo v2) a 4096-entry queue.
``densecl.step_over_mocov2`` times our MoCo v2 step (same head sizes, same queue) in the same rounds.

``BENCH_METHODS_TINY=1`` shrinks everything (batch 8, 32 px, 1 round) for a smoke test; its numbers mean
nothing.
"""
from __future__ import annotations

import copy
import itertools
import os
from typing import Callable

import torch
from torch import nn

from bench.common import AUTOCAST, autocast, interleaved_medians, median_ratio, precision_name, report, setup_threads
from tasks.models.backbone import build_backbone
from tasks.pretrain.loop import build_optimizer, train_step

HIDDEN, LR, WD, MAX_STEPS, QUEUE = 2048, 0.03, 1e-4, 10_000, 4096
OUT = {"mocov3": 256, "byol": 256, "swav": 128, "densecl": 128}
PROTOTYPES = 3000
METHOD_NAMES = ("mocov3", "byol", "swav", "densecl")

Step = Callable[[list[torch.Tensor]], None]


# ---------------------------------------------------------------------------------------------- sizes


def _sizes(quick: bool) -> dict:
    """batch, view side, rounds, warm-up rounds, SwAV local crops."""
    if os.environ.get("BENCH_METHODS_TINY"):
        return dict(batch=8, size=32, rounds=1, warmup=1, local=2)
    # Two identical steps timed back to back on this 2-core machine differ by 5 % (sd of their ratio, up to
    # +-12 %), so a median of ~10 per-round ratios is needed to resolve a 5 % goal.
    if quick:  # 1 warm-up + 10 timed rounds of 4 steps of 1-3 s each (bf16 on AMX) per method
        return dict(batch=32, size=64, rounds=10, warmup=1, local=2)
    return dict(batch=64, size=64, rounds=15, warmup=1, local=6)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _fixed_grad(out: torch.Tensor, seed: int) -> torch.Tensor:
    """A dense upstream gradient in ``out``'s own layout (``.sum()`` would send a stride-0 one)."""
    g = torch.empty_like(out)  # preserves channels_last strides
    g.copy_(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)))
    return g


# ---------------------------------------------------------------------------------------- our steps


def _ours(model: nn.Module, lr: float = LR, weight_decay: float = WD, decay_norm_and_bias: str = "auto") -> Step:
    """``train_step`` with SGD, the method in channels_last and the stage's default precision."""
    model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, lr=lr, weight_decay=weight_decay, decay_norm_and_bias=decay_norm_and_bias)
    state = {"step": 0}

    def step(views):
        train_step(model, opt, views, state["step"], MAX_STEPS, lr, autocast_dtype=AUTOCAST)
        state["step"] += 1
    step.backbone = model.backbone  # what bench/knn.py evaluates after training
    return step


def _bare(base: nn.Module, grad_groups: list[list[int]], target_views: list[int], dense: bool = False) -> Step:
    """Backbone fwd+bwd on each group of ``grad_groups`` (view indices concatenated into one pass), fwd
    under no_grad on a frozen copy for each of ``target_views``, SGD step over the backbone; channels_last,
    forwards under the stage's default autocast.
    ``dense``: through ``forward_features`` (gradient on the unpooled map) instead of the pooled output."""
    online = copy.deepcopy(base).to(memory_format=torch.channels_last)
    frozen = copy.deepcopy(online).requires_grad_(False) if target_views else None
    opt = build_optimizer(online, lr=LR)
    grads: dict[int, torch.Tensor] = {}

    def encode(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = _nhwc(x)
        return net.forward_features(x) if dense else net(x)

    def step(views):
        opt.zero_grad(set_to_none=True)
        with autocast():
            outs = [encode(online, torch.cat([views[i] for i in g]) if len(g) > 1 else views[g[0]])
                    for g in grad_groups]
        for i, o in enumerate(outs):
            if i not in grads:
                grads[i] = _fixed_grad(o, seed=i + 1)
        torch.autograd.backward(outs, [grads[i] for i in range(len(outs))])
        with torch.no_grad(), autocast():
            for i in target_views:
                encode(frozen, views[i])
        opt.step()
    return step


def _step_flops(step: Step, views: list[torch.Tensor]) -> int:
    """Matmul/convolution FLOPs of one call of ``step`` (torch's FlopCounterMode; elementwise work not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(views)
    return counter.get_total_flops()


def _same_size_groups(views: list[torch.Tensor]) -> list[list[int]]:
    """Runs of consecutive same-size views (how SwAV batches its crops through the backbone)."""
    idx = list(range(len(views)))
    return [list(g) for _, g in itertools.groupby(idx, key=lambda i: tuple(views[i].shape[-2:]))]


# ---------------------------------------------------------------------------------------- per method


def _setup(quick: bool):
    sz = _sizes(quick)
    torch.manual_seed(0)
    base, feat_dim = build_backbone("resnet18", cifar_stem=True)
    return sz, base, feat_dim


def _views(model: nn.Module, sz: dict) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(sz["batch"], 3, a.size, a.size, generator=g) for a in model.view_augments(sz["size"])]


def _time(method: str, sz: dict, views: list[torch.Tensor], steps: dict[str, Step], heads: str) -> dict:
    print(f"# {method}: resnet18 cifar stem, views {'/'.join(str(v.shape[-1]) for v in views)} px, "
          f"batch {sz['batch']}, {heads}, {sz['rounds']} interleaved rounds after {sz['warmup']} warm-up; "
          f"ours and bare in {precision_name()}")
    med, times = interleaved_medians({k: (lambda f=f: f(views)) for k, f in steps.items()},
                                     rounds=sz["rounds"], warmup=sz["warmup"])
    print(f"# {method}: median s/step: " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()))
    return times


def _report_lightly(method: str, times: dict) -> None:
    report(f"{method}.ours_over_lightly", median_ratio(times, "ours", "lightly"), "<=0.9")
    # lightly given our layout and precision: what is left besides those two defaults.
    report(f"{method}.ours_over_lightly_matched", median_ratio(times, "ours", "lightly_matched"), "<=1.0")


def _two_view(method: str, quick: bool) -> None:
    from bench.lightly_steps import _lightly_two_view

    if method == "byol":
        from tasks.pretrain.methods.byol import BYOL as cls
    else:
        from tasks.pretrain.methods.mocov3 import MoCoV3 as cls
    sz, base, feat_dim = _setup(quick)
    model = cls(copy.deepcopy(base), feat_dim, hidden_dim=HIDDEN, out_dim=OUT[method])
    views = _views(model, sz)
    if len(views) != 2:
        raise RuntimeError(f"{method}: expected 2 views, view_augments gives {len(views)}")
    steps = {
        "bare": _bare(base, [[0], [1]], [0, 1]),
        "ours": _ours(model),
        "lightly": _lightly_two_view(base, feat_dim, False, method),
        "lightly_matched": _lightly_two_view(base, feat_dim, True, method),
    }
    if method == "mocov3":
        print("# mocov3: lightly 1.6 has no MoCo v3 model/loss/example; its side is MoCoProjectionHead(batch_norm"
              "=True) + ProjectionHead predictor + update_momentum, with the ctr loss written in the bench")
    times = _time(method, sz, views, steps, f"head {HIDDEN}->{OUT[method]}")
    report(f"{method}.step_over_backbone", median_ratio(times, "ours", "bare"), "<=1.05")
    _report_lightly(method, times)


def _swav(quick: bool) -> None:
    from bench.lightly_steps import _lightly_swav
    from tasks.pretrain.methods.swav import SwAV

    sz, base, feat_dim = _setup(quick)
    model = SwAV(copy.deepcopy(base), feat_dim, hidden_dim=HIDDEN, out_dim=OUT["swav"], num_prototypes=PROTOTYPES,
                 num_local_crops=sz["local"])
    views = _views(model, sz)
    steps = {
        "bare": _bare(base, _same_size_groups(views), []),
        "ours": _ours(model),
        "lightly": _lightly_swav(base, feat_dim, False),
        "lightly_matched": _lightly_swav(base, feat_dim, True),
    }
    times = _time("swav", sz, views, steps, f"head {HIDDEN}->{OUT['swav']}, {PROTOTYPES} prototypes, "
                                            f"2 global + {sz['local']} local crops")
    report("swav.step_over_backbone", median_ratio(times, "ours", "bare"), "<=1.05")
    _report_lightly("swav", times)


def _densecl(quick: bool) -> None:
    from bench.lightly_steps import _lightly_densecl
    from tasks.pretrain.methods.densecl import DenseCL
    from tasks.pretrain.methods.mocov2 import MoCoV2

    sz, base, feat_dim = _setup(quick)
    out = OUT["densecl"]
    # Both heads' hidden width is the backbone's C5 width (the methods' default, see DenseCL's docstring).
    model = DenseCL(copy.deepcopy(base), feat_dim, hidden_dim=feat_dim, out_dim=out, queue_size=QUEUE)
    moco = MoCoV2(copy.deepcopy(base), feat_dim, hidden_dim=feat_dim, out_dim=out, queue_size=QUEUE)
    views = _views(model, sz)
    steps = {
        "bare": _bare(base, [[0]], [1], dense=True),
        "ours": _ours(model),
        "mocov2": _ours(moco),
        "lightly": _lightly_densecl(base, feat_dim, False),
        "lightly_matched": _lightly_densecl(base, feat_dim, True),
    }
    flops = {k: _step_flops(steps[k], views) for k in ("ours", "mocov2", "bare")}
    print(f"# densecl: matmul/conv FLOPs per step {flops['ours'] / flops['mocov2']:.3f}x MoCo v2's (dense head and "
          f"dense loss), {flops['ours'] / flops['bare']:.3f}x the bare backbone's (MoCo v2: "
          f"{flops['mocov2'] / flops['bare']:.3f}x): where the step is compute-bound these ratios are floors for "
          "step_over_mocov2 and step_over_backbone")
    times = _time("densecl", sz, views, steps, f"heads {feat_dim}->{feat_dim}->{out}, queues {QUEUE}")
    report("densecl.step_over_backbone", median_ratio(times, "ours", "bare"), "<=1.05")
    report("densecl.step_over_mocov2", median_ratio(times, "ours", "mocov2"), "<=1.01")
    _report_lightly("densecl", times)


_RUNNERS: dict[str, Callable[[bool], None]] = {
    "mocov3": lambda quick: _two_view("mocov3", quick),
    "byol": lambda quick: _two_view("byol", quick),
    "swav": _swav,
    "densecl": _densecl,
}
# ``python -m bench`` (no name) runs every registry entry, i.e. "methods" and each method's own entry:
# measure each (method, quick) once per process.
_MEASURED: set[tuple[str, bool]] = set()


def _measure(method: str, quick: bool) -> None:
    if (method, quick) in _MEASURED:
        print(f"# {method}: measured above in this run")
        return
    _MEASURED.add((method, quick))
    _RUNNERS[method](quick)


def _single(method: str, quick: bool) -> None:
    if (method, quick) not in _MEASURED:
        setup_threads(2)
    _measure(method, quick)


def run(quick: bool = False) -> None:
    """Every method in turn (registry name "methods")."""
    setup_threads(2)
    for method in METHOD_NAMES:
        _measure(method, quick)


def mocov3(quick: bool = False) -> None:
    _single("mocov3", quick)


def byol(quick: bool = False) -> None:
    _single("byol", quick)


def swav(quick: bool = False) -> None:
    _single("swav", quick)


def densecl(quick: bool = False) -> None:
    _single("densecl", quick)
