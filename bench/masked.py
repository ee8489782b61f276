"""Training steps of the masked / predictive methods (I-JEPA, MixedAE, MoCE) over MAE's, at the same encoder.

Every method gets the same timm ViT (``vit_small_patch16_224`` at ``img_size`` S, ``class_token=False,
global_pool="avg", fc_norm=False``, as these methods need; built once, every method starts from a copy of
the same weights) and its paper-default head, scaled as the method scales it to the encoder:

* MAE: decoder 8 blocks x 512 wide x 16 heads (the paper's), width capped at the encoder's (384 for ViT-S).
* I-JEPA: its defaults, predictor 384 wide but at most half the encoder's width (192 for ViT-S), depth 6, the
  encoder's heads; 4 targets. ``ijepa-wide`` (printed, no goal): the predictor as wide as the encoder.
* MixedAE, MoCE: their defaults plus MAE's decoder. MoCE at top-1 routing over its default 8 experts in every
  other block, gated by 8 random cluster centroids; the images' cluster ids are drawn uniformly per step.

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

I-JEPA's token counts depend on the grid and the batch: the multi-block sampler cuts every mask of a step
to the batch's shortest (so a larger global batch means shorter contexts), and on ``--quick``'s 8 x 8 grid a
block side is at most 7, so its tokens relative to MAE's are not those at 224 px (context ~1.1x MAE's 49
kept tokens there); the goals are about the full-size figures. ``--quick`` runs at 128 px, not 112: MixedAE
needs the patch count (49 at 112 px) to be a multiple of its group of 4.

``BENCH_MASKED_TINY=1`` shrinks everything (a 2-block 32-wide ViT on 32 px, batch 4, 1 round) for a smoke
test; its numbers mean nothing. ``BENCH_MASKED_ROUNDS=N`` sets the timed rounds (default 10, 12 with ``--quick``):
on a 2-core slice whose step time drifts by 10-30 % between neighbouring rounds, one round's ratio spreads by
~10 %, so the median's standard error is about 1.25 x 10 % / sqrt(rounds): ~4 % at 10 rounds, ~2 % at 30.
"""
from __future__ import annotations

import copy
import os
import statistics
import time
from typing import Callable

import torch
from torch import nn

from bench.common import (AUTOCAST, env_positive, interleaved_medians, median_ratio, precision_name, report,
                          setup_threads)
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
CLUSTERS = 8
PLAIN_MIXEDAE = "mixedae-plain"
WIDE_IJEPA = "ijepa-wide"  # I-JEPA with a predictor as wide as a ViT-S encoder (384): printed, no goal

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
    # bf16 on AMX, 2 threads: MAE 3.3-4.3 s, I-JEPA 4.4-4.9 s a step at full size (ijepa alone: ~2 min);
    # 0.7-0.9 s a step each with --quick (masked --quick with MAE, I-JEPA, MixedAE: ~50 s). fp32 on an AVX2-only
    # 2-core slice: MAE ~9 s, I-JEPA ~7 s a step at full size (masked at 20 rounds: ~24 min; mixedae alone ~6 min).
    rounds = env_positive("BENCH_MASKED_ROUNDS", 12 if quick else 10, int)
    if quick:  # 8 x 8 patch grid (MixedAE needs a patch count divisible by its group of 4: 112 px has 49)
        return dict(size=128, batch=16, rounds=rounds, warmup=2, **common)
    return dict(size=224, batch=32, rounds=rounds, warmup=1, **common)


# ---------------------------------------------------------------------------------------------- setup


def _encoder(sz: dict) -> tuple[nn.Module, int]:
    name, extra = sz["encoder"]
    torch.manual_seed(0)
    return build_backbone(name, img_size=sz["size"], **VIT_KWARGS, **extra)


def _kwargs(name: str, sz: dict) -> tuple[dict, str]:
    """Constructor kwargs for ``name`` and a description of them."""
    if name.startswith("ijepa"):
        kw = dict(sz["ijepa"])
        if name == WIDE_IJEPA and not sz["tiny"]:
            kw["predictor_dim"] = 384
        return kw, "defaults" + (f" but {kw}" if kw else " (predictor min(384, encoder width / 2), depth 6, "
                                                         "encoder's heads)")
    kw = dict(sz["decoder"])
    desc = "decoder {decoder_depth} x {decoder_dim} (capped at the encoder's) x {decoder_heads} heads".format(**kw)
    if name == PLAIN_MIXEDAE:  # the floor: mixing, segment embeddings and the HC loss, no top-K layer
        kw["homologous_layers"] = ()
        desc += "; no homologous (top-K) attention layer: what mixing alone costs"
    if name == "moce":
        # 8 clusters (random centroids) over 8 experts, top-1; the images' cluster ids are drawn uniformly,
        # so every expert is busy in a step, as with a balanced clustering
        kw.update(top_k=1, centroids=torch.randn(CLUSTERS, 64, generator=torch.Generator().manual_seed(0)))
        desc += f"; {CLUSTERS} clusters, 8 experts (default), top-1, MoE in every other block (default)"
    return kw, desc


def _build(name: str, base: nn.Module, feat_dim: int, sz: dict) -> tuple[nn.Module, str]:
    from tasks.pretrain.methods import get_method

    cls = get_method(name.split("-")[0])
    kw, desc = _kwargs(name, sz)
    torch.manual_seed(1)  # same head init whatever was built before
    return cls(copy.deepcopy(base), feat_dim, **kw), desc


def _inputs(method: nn.Module, batch: int, n: int) -> tuple[list[dict], float]:
    """``n`` steps' collate outputs (steps 0..n-1) and the median ms per call."""
    out, ms = [], []
    for step in range(n):
        t0 = time.perf_counter()
        out.append(method.collate(batch, step, 0))
        ms.append(1e3 * (time.perf_counter() - t0))
        if getattr(method, "needs_clusters", False):  # MoCE: each image's cluster id (the feeder's image_inputs)
            out[-1]["cluster"] = torch.randint(0, CLUSTERS, (batch,), generator=torch.Generator().manual_seed(step))
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
    ij_pred = 3 * m * (kc + kt) * len(pred.blocks) * (pred.embed.out_features / ijepa.backbone.embed_dim) ** 2
    ij_tb = 3 * kc * enc_depth + n * enc_depth + ij_pred
    print(f"# encoder tokens I-JEPA context / MAE kept = {kc / k:.2f}; token-blocks per image at encoder width "
          f"(fwd+bwd = 3 fwd): MAE {mae_tb:.0f} (encoder {3 * k * enc_depth}), I-JEPA {ij_tb:.0f} (context "
          f"{3 * kc * enc_depth:.0f}, target {n * enc_depth}, predictor {ij_pred:.0f}) -> {ij_tb / mae_tb:.2f}x")


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
    extra = ((PLAIN_MIXEDAE,) if "mixedae" in names and _registered("mixedae") else ()) + \
        ((WIDE_IJEPA,) if "ijepa" in names and _registered("ijepa") else ())
    for name in ("mae",) + names + extra:
        if name != "mae" and not _registered(name.split("-")[0]):
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
    timed = [n for n in names + extra if n in steps]
    if not timed:
        return

    arch = sz["encoder"][0] + (" (tiny: 2 blocks x 32)" if sz["tiny"] else "")
    print(f"# masked: {arch} at {sz['size']} px ({grid[0]}x{grid[1]} patches), {VIT_KWARGS}, batch {sz['batch']}, "
          f"AdamW, {precision_name()}, {sz['rounds']} interleaved rounds after {sz['warmup']} warm-up; masks "
          "drawn before timing (the trainer draws them in a background thread), fresh each step")
    if sz["size"] < 224 and not sz["tiny"]:
        print(f"# quick: the {grid[0]}x{grid[1]} grid keeps I-JEPA's blocks small (a block side is < {grid[0]}), so "
              "its token counts relative to MAE's differ from 224 px; the goals are about the full-size figures")
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
    mean = {k: statistics.mean(v) for k, v in times.items()}
    print("# mean s/step: " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items()) + "; mean over MAE's: " +
          ", ".join(f"{k} {mean[k] / mean['mae']:.3f}" for k in timed) + " (a step's cost varies with its masks' "
          "lengths: I-JEPA's context and target blocks are cut to the batch's shortest)")
    print("# collate (mask sampling) ms/step, outside the timed step: " +
          ", ".join(f"{k} {ms[k]:.1f}" for k in fns))
    if PLAIN_MIXEDAE in steps:
        print(f"# {PLAIN_MIXEDAE} (no top-K layer) over MAE: {median_ratio(times, PLAIN_MIXEDAE, 'mae'):.3f} -- the "
              "mixed encoder attends over all N tokens of B/G sequences instead of N/4 of B: 4x the attention work")
    if WIDE_IJEPA in steps:
        print(f"# {WIDE_IJEPA} (predictor as wide as the encoder) over MAE: "
              f"{median_ratio(times, WIDE_IJEPA, 'mae'):.3f}")
    for name in timed:
        if name in GOALS:
            report(f"{name}.step_over_mae", median_ratio(times, name, "mae"), GOALS[name])
            _MEASURED.add((name, quick))


def _single(name: str, quick: bool) -> None:
    if (name, quick) in _MEASURED:
        print(f"# {name}: measured (or skipped) above in this run")
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
