"""Training steps of the masked / predictive methods (I-JEPA, MixedAE, MoCE) over MAE's, at the same encoder.

Every method gets the same timm ViT (``vit_small_patch16_224`` at ``img_size`` S, ``class_token=False,
global_pool="avg", fc_norm=False``, as these methods need; built once, every method starts from a copy of
the same weights) and its paper-default head, scaled as the method scales it to the encoder:

* MAE: decoder 8 blocks x 512 wide x 16 heads (the paper's), width capped at the encoder's (384 for ViT-S).
* I-JEPA: its defaults, predictor 384 wide (capped at the encoder's), depth 6, the encoder's heads; 4 targets.
* MixedAE, MoCE (measured only once ``tasks/pretrain/methods/mixedae.py`` / ``moce.py`` are registered):
  their default kwargs plus MAE's decoder kwargs where the constructor takes them; MoCE at top-1 routing
  (its top-k option set to 1 where it has one).

Each step is ``train_step`` with AdamW (``build_optimizer(method, "adamw", 1.5e-4, 0.9, 0.05)``), the forward
in the pretrain stage's default precision (``pretrain.precision: auto``: bf16 autocast on a CPU with AMX,
else fp32), on 2 torch threads, one fixed batch of images for every method. The per-step inputs of
``method.collate`` (token masks, fresh each step, for an increasing step counter) are drawn before timing and
cycled through: the trainer draws them in the loader's background thread, so a step does not pay for them;
their sampling time is printed separately. Steps are timed interleaved (median over rounds of the ratio
within each round, after warm-up).

Printed as comments: each method's seconds per step, each collate's ms per step, the encoder tokens per
image (I-JEPA's context tokens vs MAE's kept 25 %, and what else each step runs) and the matmul FLOPs ratio
of one whole step (torch's FlopCounterMode), a floor for the time ratio where the step is compute-bound.

``BENCH_MASKED_TINY=1`` shrinks everything (a 2-block 32-wide ViT on 32 px, batch 4, 1 round) for a smoke
test; its numbers mean nothing.
"""
from __future__ import annotations

import copy
import inspect
import os
import statistics
import time
from typing import Callable

import torch
from torch import nn

from bench.common import AUTOCAST, interleaved_medians, median_ratio, precision_name, report, setup_threads
from tasks.models.backbone import build_backbone
from tasks.pretrain.loop import build_optimizer, train_step

ENCODER = "vit_small_patch16_224"
VIT_KWARGS = dict(class_token=False, global_pool="avg", fc_norm=False)
LR, MAX_STEPS = 1.5e-4, 10_000
# MAE's decoder as the paper has it (width capped at the encoder's by MAE itself); the same kwargs go to
# MixedAE and MoCE where their constructors take them.
DECODER = dict(decoder_dim=512, decoder_depth=8, decoder_heads=16)
GOALS = {"ijepa": "<=1.10", "mixedae": "<=1.05", "moce": "<=1.15"}
OTHERS = tuple(GOALS)
# Names a MoCE constructor may give its number of experts each token is routed to.
TOPK_NAMES = ("top_k", "topk", "k", "num_active", "num_active_experts", "experts_per_token", "routing_top_k")

Step = Callable[[], None]


# ---------------------------------------------------------------------------------------------- sizes


def _sizes(quick: bool) -> dict:
    """image side, batch, timed rounds, warm-up rounds, encoder and head kwargs."""
    if os.environ.get("BENCH_MASKED_TINY"):
        return dict(size=32, batch=4, rounds=1, warmup=1, tiny=True,
                    encoder=("vit_tiny_patch16_224", dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)),
                    decoder=dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
                    ijepa=dict(predictor_dim=32, predictor_depth=1))
    common = dict(tiny=False, encoder=(ENCODER, {}), decoder=dict(DECODER), ijepa={})
    if quick:  # 7 x 7 patch grid; MAE ~0.15 s, I-JEPA ~0.2 s a step here
        return dict(size=112, batch=16, rounds=12, warmup=2, **common)
    return dict(size=224, batch=32, rounds=10, warmup=1, **common)


# ---------------------------------------------------------------------------------------------- setup


def _encoder(sz: dict) -> tuple[nn.Module, int]:
    name, extra = sz["encoder"]
    torch.manual_seed(0)
    return build_backbone(name, img_size=sz["size"], **VIT_KWARGS, **extra)


def _init_params(cls) -> set[str]:
    """The keyword names ``cls``'s constructor takes: its own, and while it passes ``**kwargs`` on (MixedAE's
    ``**mae_kwargs``), those of the next constructor up the MRO."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is nn.Module:
            continue
        params = inspect.signature(klass.__init__).parameters
        names |= {k for k, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return names


def _accepted(cls, wanted: dict) -> dict:
    """The items of ``wanted`` that ``cls``'s constructor takes by name."""
    params = _init_params(cls)
    return {k: v for k, v in wanted.items() if k in params}


def _kwargs(name: str, cls, sz: dict) -> tuple[dict, str]:
    """Constructor kwargs for ``name`` and a description of them."""
    if name == "mae":
        kw = dict(sz["decoder"])
        return kw, "decoder {decoder_depth} x {decoder_dim} (capped at the encoder's) x {decoder_heads} heads".format(**kw)
    if name == "ijepa":
        kw = dict(sz["ijepa"])
        return kw, "defaults" + (f" but {kw}" if kw else " (predictor 384 wide capped, depth 6, encoder's heads)")
    kw = _accepted(cls, sz["decoder"])
    desc = f"defaults + {kw}" if kw else "defaults (takes no decoder kwargs)"
    if name == "moce":
        params = _init_params(cls)
        topk = next((k for k in TOPK_NAMES if k in params), None)
        if topk is None:
            desc += "; no top-k option found in its signature, routing as its default"
        else:
            kw[topk] = 1
            desc += f"; {topk}=1 (top-1 routing)"
    return kw, desc


def _build(name: str, base: nn.Module, feat_dim: int, sz: dict) -> tuple[nn.Module, str]:
    from tasks.pretrain.methods import get_method

    cls = get_method(name)
    kw, desc = _kwargs(name, cls, sz)
    torch.manual_seed(1)  # same head init whatever was built before
    return cls(copy.deepcopy(base), feat_dim, **kw), desc


def _inputs(method: nn.Module, batch: int, n: int) -> tuple[list[dict], float]:
    """``n`` steps' collate outputs (steps 0..n-1) and the median ms per call."""
    out, ms = [], []
    for step in range(n):
        t0 = time.perf_counter()
        out.append(method.collate(batch, step, 0))
        ms.append(1e3 * (time.perf_counter() - t0))
    return out, statistics.median(ms)


def _stepper(method: nn.Module, views: list[torch.Tensor], inputs: list[dict]) -> Step:
    """One ``train_step`` per call, the step counter advancing and the precomputed inputs cycled."""
    opt = build_optimizer(method, "adamw", LR, 0.9, 0.05)
    state = {"step": 0}

    def step():
        i = state["step"]
        train_step(method, opt, views, i, MAX_STEPS, LR, autocast_dtype=AUTOCAST, **inputs[i % len(inputs)])
        state["step"] = i + 1
    return step


def _flops(step: Step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def _token_comment(mae: nn.Module, ijepa: nn.Module | None, mae_in: list[dict], ij_in: list[dict] | None,
                   grid: tuple[int, int]) -> None:
    n = grid[0] * grid[1]
    k = mae_in[0]["keep"].shape[1]
    dec = mae.decoder
    print(f"# tokens/image ({grid[0]}x{grid[1]} grid, N={n}): MAE encoder {k} kept (fwd+bwd, "
          f"{len(mae.backbone.blocks)} blocks), decoder "
          f"{n} tokens x {len(dec.blocks)} blocks x {dec.embed.out_features} wide (fwd+bwd)")
    if ijepa is None or ij_in is None:
        return
    kc = statistics.mean(d["context"].shape[1] for d in ij_in)
    m, kt = ij_in[0]["targets"].shape[1], statistics.mean(d["targets"].shape[2] for d in ij_in)
    pred = ijepa.predictor
    enc_depth = len(ijepa.backbone.blocks)
    print(f"# tokens/image: I-JEPA context {kc:.1f} (mean over the drawn steps; fwd+bwd, {enc_depth} blocks), "
          f"target encoder {n} (fwd only, {enc_depth} blocks), predictor {m} x ({kc:.1f} + {kt:.1f}) tokens x "
          f"{len(pred.blocks)} blocks x {pred.embed.out_features} wide (fwd+bwd)")
    # token-blocks, fwd+bwd counted as 3 fwd (a rough FLOPs proxy, attention's quadratic part not counted)
    mae_tb = 3 * (k * enc_depth + n * len(dec.blocks) * (dec.embed.out_features / ijepa.backbone.embed_dim) ** 2)
    ij_tb = 3 * kc * enc_depth + n * enc_depth + 3 * m * (kc + kt) * len(pred.blocks) * \
        (pred.embed.out_features / ijepa.backbone.embed_dim) ** 2
    print(f"# encoder tokens I-JEPA context / MAE kept = {kc / k:.2f}; token-blocks per image at encoder width "
          f"(fwd+bwd = 3 fwd): MAE {mae_tb:.0f} (encoder {3 * k * enc_depth}), I-JEPA {ij_tb:.0f} (context "
          f"{3 * kc * enc_depth:.0f}, target {n * enc_depth}, predictor {ij_tb - 3 * kc * enc_depth - n * enc_depth:.0f})"
          f" -> {ij_tb / mae_tb:.2f}x")


# ---------------------------------------------------------------------------------------------- the bench

_MEASURED: set[tuple[str, bool]] = set()


def _registered(name: str) -> bool:
    from tasks.pretrain.methods import METHODS

    return name in METHODS


def _measure(names: tuple[str, ...], quick: bool) -> None:
    names = tuple(n for n in names if (n, quick) not in _MEASURED)
    if not names:
        return
    sz = _sizes(quick)
    base, feat_dim = _encoder(sz)
    grid = tuple(int(g) for g in base.patch_embed.grid_size)
    n_inputs = sz["warmup"] + sz["rounds"] + 2  # + the probe step and the FLOP-counted step
    g = torch.Generator().manual_seed(0)
    image = torch.randn(sz["batch"], 3, sz["size"], sz["size"], generator=g)

    methods: dict[str, nn.Module] = {}
    inputs: dict[str, list[dict]] = {}
    steps: dict[str, Step] = {}
    ms: dict[str, float] = {}
    descs: dict[str, str] = {}
    for name in ("mae",) + names:
        if name != "mae" and not _registered(name):
            print(f"# skipped: {name} not registered (no tasks/pretrain/methods/{name}.py)")
            _MEASURED.add((name, quick))
            continue
        try:
            method, descs[name] = _build(name, base, feat_dim, sz)
            n_views = len(method.view_augments(sz["size"]))
            # the same images for every method; a method with more views gets further fixed tensors
            views = [image] + [torch.randn(image.shape, generator=torch.Generator().manual_seed(i))
                               for i in range(1, n_views)]
            inputs[name], ms[name] = _inputs(method, sz["batch"], n_inputs)
            steps[name] = _stepper(method, views, inputs[name])
            steps[name]()  # probe: a method that cannot step is skipped here, not mid-timing
        except Exception as err:  # noqa: BLE001 -- a method being written may not build or step yet
            if name == "mae":
                raise
            print(f"# {name}: {type(err).__name__}: {err}")
            print(f"# skipped: {name} (the error above)")
            steps.pop(name, None)
            _MEASURED.add((name, quick))
            continue
        methods[name] = method
    timed = [n for n in names if n in steps]
    if not timed:
        return

    arch = sz["encoder"][0] + (" (tiny: 2 blocks x 32)" if sz["tiny"] else "")
    print(f"# masked: {arch} at {sz['size']} px ({grid[0]}x{grid[1]} patches), {VIT_KWARGS}, batch {sz['batch']}, "
          f"AdamW, {precision_name()}, {sz['rounds']} interleaved rounds after {sz['warmup']} warm-up; masks "
          "drawn before timing (the trainer draws them in a background thread), fresh each step")
    for name in ("mae",) + tuple(timed):
        print(f"# {name}: {descs[name]}")
    _token_comment(methods["mae"], methods.get("ijepa"), inputs["mae"], inputs.get("ijepa"), grid)
    try:
        flops = {k: _flops(steps[k]) for k in ("mae",) + tuple(timed)}
        print("# matmul FLOPs per step (FlopCounterMode) over MAE's: " + ", ".join(
            f"{k} {flops[k] / flops['mae']:.3f}x" for k in timed) + f" (MAE {flops['mae'] / 1e9:.3g} GFLOP)")
    except Exception as err:  # noqa: BLE001 -- a comment only
        print(f"# FLOP count failed: {type(err).__name__}: {err}")

    fns = {k: steps[k] for k in ("mae",) + tuple(timed)}
    med, times = interleaved_medians(fns, rounds=sz["rounds"], warmup=sz["warmup"])
    print("# median s/step: " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()))
    print("# collate (mask sampling) ms/step, outside the timed step: " +
          ", ".join(f"{k} {ms[k]:.1f}" for k in fns))
    for name in timed:
        report(f"{name}.step_over_mae", median_ratio(times, name, "mae"), GOALS[name])
        _MEASURED.add((name, quick))


def _single(name: str, quick: bool) -> None:
    if (name, quick) in _MEASURED:
        print(f"# {name}: measured above in this run")
        return
    setup_threads(2)
    _measure((name,), quick)


def run(quick: bool = False) -> None:
    """I-JEPA, MixedAE and MoCE over MAE, in the same interleaved rounds (registry name "masked")."""
    setup_threads(2)
    _measure(OTHERS, quick)


def ijepa(quick: bool = False) -> None:
    _single("ijepa", quick)


def mixedae(quick: bool = False) -> None:
    _single("mixedae", quick)


def moce(quick: bool = False) -> None:
    _single("moce", quick)
