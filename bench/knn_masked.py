"""Representation quality of the masked / predictive family after the same CPU budget: kNN top-1 on
imagenette224 val for MAE, I-JEPA, MixedAE and MoCE, each against the same ViT at random init.

All four start from the same random ViT (ViT-Tiny width 192, 6 blocks, 3 heads, patch 4 at 32 px: an 8 x 8
grid; no class token, patch tokens layer-normed then averaged -- the features the evaluate stage takes)
and train with AdamW (lr 1e-3 constant after 10 warm-up steps, betas 0.9/0.95, weight decay 0.05, batch
128, the pretrain stage's default precision) until their *step time* reaches the budget; the views and
token masks are built outside the timed region, as the trainer's loader thread does. Heads sized for this
encoder rather than the paper's ViT-B ones: decoders 2 blocks x 128 wide x 4 heads (MAE, MixedAE, MoCE),
I-JEPA predictor 2 blocks x 96 wide (its default is 384 wide, 6 deep: more than this encoder).
MoCE is the two-round recipe of METHODS.md 4.2: its clusters are k-means (k = 8) on the features of the
MAE encoder this bench just trained (first round), and its own budget is the same as the others'.

``BENCH knn_masked.<method>.ours`` is the top-1; the goal is above the random-init ViT's (and the printed
raw-pixel floors). Needs ../shared/data/imagenette224 (skipped with a comment otherwise). Quick: 30 s per
run, 100 train images per class, 50 val; full: 300 s per run on all 3,000 / 1,000 images.
``BENCH_KNN_BUDGET_S`` overrides the budget.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch

from bench.common import env_positive, method_stepper, report, setup_threads, train_for_budget
from bench.knn import DATA, _knn, _load, _pixel_features

SIZE, BATCH = 32, 128
VIT = dict(img_size=SIZE, patch_size=4, embed_dim=192, depth=6, num_heads=3, class_token=False, global_pool="avg",
           fc_norm=False)
DECODER = dict(decoder_dim=128, decoder_depth=2, decoder_heads=4)
KWARGS = {"mae": DECODER, "mixedae": DECODER, "moce": {**DECODER, "num_experts": 4},
          "ijepa": dict(predictor_dim=96, predictor_depth=2)}
LR, WARMUP = 1e-3, 10


def _train_method(method, images, budget, clusters=None) -> int:
    """Our train_step with the method's per-step inputs (token masks; for MoCE each image's cluster id)
    drawn before the clock starts, as the trainer's loader thread does."""
    def before(idx, s):
        inputs = method.collate(len(idx), s, 0)
        if clusters is not None:
            inputs["cluster"] = torch.as_tensor(clusters[idx])
        return inputs

    step = method_stepper(method, "adamw", LR, 0.05, betas=(0.9, 0.95), warmup=WARMUP)
    return train_for_budget(step, method.view_augments(SIZE), images, budget, BATCH, before=before)


def _features(vit, images: np.ndarray) -> np.ndarray:
    from tasks.models.backbone import extract_features

    return extract_features(copy.deepcopy(vit), torch.from_numpy(images)).numpy()


def _vit_knn(vit, train, y_train, val, y_val) -> float:
    return _knn(_features(vit, train), y_train, _features(vit, val), y_val)


def run(quick: bool = False) -> None:
    if not DATA.exists():
        print(f"# knn_masked: {DATA} not present, skipped")
        return
    setup_threads(2)
    from tasks.curation.kmeans import kmeans
    from tasks.models.backbone import build_backbone
    from tasks.pretrain.methods import get_method

    budget = env_positive("BENCH_KNN_BUDGET_S", 30 if quick else 300)
    train, y_train = _load("train", 100 if quick else None)
    val, y_val = _load("val", 50 if quick else None)
    torch.manual_seed(0)
    base, dim = build_backbone("vit_tiny_patch16_224", **VIT)
    p16_train, p16_val = _pixel_features(train, val)
    pixels16 = _knn(p16_train, y_train, p16_val, y_val)
    random_init = _vit_knn(base, train, y_train, val, y_val)
    se = (random_init * (1 - random_init) / len(val)) ** 0.5
    print(f"# knn_masked: imagenette224 {len(train)} train / {len(val)} val at {SIZE} px, ViT 192 x 6 blocks, patch 4, "
          f"batch {BATCH}, {budget:.0f} s of step time per method; raw pixels (16 px standardised) {pixels16:.3f}, "
          f"random-init ViT {random_init:.3f} (+-{se:.3f} s.e.)")
    trained = {}
    for name in ("mae", "ijepa", "mixedae", "moce"):
        kwargs, clusters = dict(KWARGS[name]), None
        if name == "moce":  # round 2: clusters of the round-1 MAE encoder's features
            km = kmeans(_features(trained["mae"], train), 8, seed=0)
            clusters = km["assign"].astype(np.int64)
            sizes = np.bincount(clusters, minlength=8)
            kwargs["centroids"] = torch.from_numpy(km["centroids"])
            print(f"# knn_masked: moce clusters from the MAE encoder: sizes {sizes.tolist()}")
        method = get_method(name)(copy.deepcopy(base), dim, **kwargs)
        t0 = time.perf_counter()
        steps = _train_method(method, train, budget, clusters)
        acc = _vit_knn(method.encoder(), train, y_train, val, y_val)
        trained[name] = method.encoder()
        se = (acc * (1 - acc) / len(val)) ** 0.5
        print(f"# knn_masked: {name}: {acc:.3f} (+-{se:.3f} s.e.) after {steps} steps "
              f"({time.perf_counter() - t0:.0f} s wall)")
        report(f"knn_masked.{name}.ours", acc, f">{random_init:.3f}")
