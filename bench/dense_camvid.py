"""Dense transfer on CamVid (``../shared/data/camvid``) after equal CPU budgets (issue 6's "must be shown").

``dense_camvid.densecl_over_mocov2``: DenseCL vs MoCo v2, each trained for the same seconds of step time
(``BENCH_DENSE_BUDGET_S``: 300 full, 30 ``--quick``) on the CamVid train frames (unlabelled, 64 px random
resized crops) from the same resnet18 (CIFAR stem) init, then frozen: linear segmentation (1x1 conv on
the C5 map, METHODS.md 8.3) trained on CamVid train, mIoU on CamVid val; inputs 128 px (16 x 16 maps),
logits and masks compared at 64 x 64; the head is trained 100 epochs at lr 0.1 (the protocol's 25 epochs at
0.01 are for ~10k images; CamVid has 367). The ratio of the two mIoUs (the paper: DenseCL better, > 1);
the random init (BN statistics from the data) is printed too.

``dense_camvid.neco_over_start``: NeCo's post-training vs its start, Hummingbird in-context mIoU on CamVid
val (memory: every labelled patch of CamVid train, k 30, temperature 0.02). No DINOv2 weights can be
downloaded here, so the start is made on the spot: a small ViT with 4 registers (192 wide, 6 blocks,
patch 8, 64 px, dynamic input size) trained with MAE for the budget on the CamVid train frames; NeCo then
post-trains it for the budget (global 64 px, local 32 px crops, batch 16); both evaluated at 128 px
(16 x 16 patches). As a control, the start trained with MAE for the same extra budget is printed too (is
NeCo better than simply training longer?). Ratio post / start (the paper's direction: > 1).

On 2 CPU cores these budgets are minutes, not GPU-days: the figures say which way the claims point at
this scale, not the paper's magnitudes.
"""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import torch

from bench.common import method_stepper, report, setup_threads, train_for_budget

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"
PRETRAIN_SIZE, EVAL_SIZE, OUT_SIZE, CLASSES = 64, 128, 64, 11
VIT = dict(img_size=PRETRAIN_SIZE, patch_size=8, embed_dim=192, depth=6, num_heads=3)


def _frames(split: str, size: int, limit: int | None):
    from tasks.data.segmentation import load_segmentation_split

    return load_segmentation_split(str(DATA), split, size, limit, ignore_values=(11,), num_classes=CLASSES)


# ---------------------------------------------------------------------------------------------- DenseCL


def _linear_miou(encoder, train, val) -> float:
    from tasks.evaluate.segmentation import evaluate_dense

    enc = copy.deepcopy(encoder).to(memory_format=torch.contiguous_format)
    r = evaluate_dense(enc, train.images, train.masks, val.images, val.masks, CLASSES, in_context=False,
                       linear_epochs=100, linear_lr=0.1, out_size=OUT_SIZE)
    return r["linear_miou"]


def densecl_vs_mocov2(quick: bool, budget: float) -> None:
    from bench.knn import _with_data_bn_stats
    from tasks.models.backbone import build_backbone
    from tasks.pretrain.methods import get_method

    limit = 100 if quick else None
    train, val = _frames("train", EVAL_SIZE, limit), _frames("val", EVAL_SIZE, 30 if quick else None)
    frames = _frames("train", 96, limit).images  # pretraining: crops of the train frames
    torch.manual_seed(0)
    base, dim = build_backbone("resnet18", cifar_stem=True)
    rand = _linear_miou(_with_data_bn_stats(base, _frames("train", PRETRAIN_SIZE, None).images), train, val)
    print(f"# dense_camvid: CamVid {len(frames)} train frames for pretraining, linear segmentation {len(train.images)} "
          f"train / {len(val.images)} val at {EVAL_SIZE} px; resnet18 (CIFAR stem), {budget:.0f} s of step time each; "
          f"random init (data BN stats) mIoU {rand:.3f}")
    out = {}
    for name in ("mocov2", "densecl"):
        method = get_method(name)(copy.deepcopy(base), dim, queue_size=4096).to(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        steps = train_for_budget(method_stepper(method, "sgd", 0.03, 1e-4), method.view_augments(PRETRAIN_SIZE), frames,
                                 budget, 64)
        out[name] = _linear_miou(method.backbone, train, val)
        print(f"# dense_camvid: {name}: linear mIoU {out[name]:.3f} after {steps} steps "
              f"({time.perf_counter() - t0:.0f} s wall)")
    report("dense_camvid.densecl_over_mocov2", out["densecl"] / max(out["mocov2"], 1e-9), ">1.0")


# ---------------------------------------------------------------------------------------------- NeCo


def _hbird_miou(vit, train, val) -> float:
    from tasks.evaluate.segmentation import evaluate_dense

    r = evaluate_dense(copy.deepcopy(vit), train.images, train.masks, val.images, val.masks, CLASSES, linear=False)
    return r["hbird_miou"]


def neco_vs_start(quick: bool, budget: float) -> None:
    from tasks.models.backbone import build_backbone
    from tasks.pretrain.methods import get_method

    limit = 100 if quick else None
    train, val = _frames("train", EVAL_SIZE, limit), _frames("val", EVAL_SIZE, 30 if quick else None)
    frames = _frames("train", 96, limit).images
    torch.manual_seed(0)
    # MAE needs a fixed-size ViT; NeCo and the evaluation feed other sizes: the same weights in a dynamic one
    fixed, dim = build_backbone("vit_small_patch14_reg4_dinov2", **VIT)
    dynamic, _ = build_backbone("vit_small_patch14_reg4_dinov2", **VIT, dynamic_img_size=True)

    def as_dynamic(module):
        out = copy.deepcopy(dynamic)
        out.load_state_dict(module.state_dict())
        return out

    mae = get_method("mae")(fixed, dim, decoder_dim=128, decoder_depth=2, decoder_heads=4)
    step = method_stepper(mae, "adamw", 1e-3, 0.05, betas=(0.9, 0.95))
    n_mae = train_for_budget(step, mae.view_augments(PRETRAIN_SIZE), frames, budget, 64,
                             before=lambda idx, s: mae.collate(len(idx), s, 0))
    start = as_dynamic(mae.backbone)
    start_miou = _hbird_miou(start, train, val)
    # control: the same budget again on MAE
    n_more = train_for_budget(step, mae.view_augments(PRETRAIN_SIZE), frames, budget, 64,
                              before=lambda idx, s: mae.collate(len(idx), n_mae + s, 0))
    longer = _hbird_miou(as_dynamic(mae.backbone), train, val)

    neco = get_method("neco")(copy.deepcopy(start), dim, momentum=0.996)
    n_neco = train_for_budget(method_stepper(neco, "adamw", 1e-4, 0.04), neco.view_augments(PRETRAIN_SIZE), frames,
                              budget, 16, overlap=neco.view_overlap, before=lambda idx, s: neco.collate(len(idx), s, 0))
    post = _hbird_miou(neco.backbone, train, val)
    print(f"# dense_camvid: ViT 192 x 6, patch 8, 4 registers; Hummingbird mIoU on CamVid val ({len(val.images)} "
          f"images at {EVAL_SIZE} px, memory {len(train.images)} train images): start (MAE, {n_mae} steps) "
          f"{start_miou:.3f}; MAE {n_more} steps more {longer:.3f}; NeCo post-training ({n_neco} steps, "
          f"momentum 0.996 for a short run) {post:.3f}")
    report("dense_camvid.neco_over_start", post / max(start_miou, 1e-9), ">1.0")
    report("dense_camvid.neco_over_longer_mae", post / max(longer, 1e-9), "none")


def run(quick: bool = False) -> None:
    if not DATA.exists():
        print(f"# dense_camvid: {DATA} not present, skipped")
        return
    setup_threads(2)
    budget = float(os.environ.get("BENCH_DENSE_BUDGET_S", 30 if quick else 300))
    densecl_vs_mocov2(quick, budget)
    neco_vs_start(quick, budget)
