"""Representation quality after the same CPU budget: kNN top-1 on imagenette224 val, per method, ours vs
lightly's implementation of the same recipe (bench/mocov2.py, bench/methods.py), and against the same
backbone at random init and the raw-pixel floor.

Each run starts from the same random resnet18 (CIFAR stem, 32 px, batch 128) -- and lightly's heads and memory
banks from our heads' and queues' initial values (bench.lightly_steps.start_like; SwAV's prototype bias, which
only lightly has, keeps lightly's init), so one seed's two sides differ only in the implementations --, sees the
same augmented views
(our augmentation, seeded; its cost is not counted) and trains until its *step time* reaches the budget;
lr 0.03 at batch 128 (0.06 per 256, lightly's benchmark value), constant, on both sides. Measured on this
set: 32 px with the CIFAR stem learns far more per CPU-second than 64 px with the ImageNet stem (2x2 maps
at C5), and 10x that lr stalls MoCo v2 below the raw-pixel floor.
Ours runs the pretrain stage's defaults (channels_last, ``precision: auto`` = bf16 autocast on an AMX CPU);
lightly's recipes run as its examples do (fp32, NCHW), so ours takes more steps in the same budget. kNN (k=20, T=0.07, cosine) uses
the centre-resized train subset as the bank and the val subset as queries; raw pixels = the 32 px image
flattened. ``BENCH knn.<method>.ours_over_lightly`` compares top-1 after equal budgets (goal >= 1.0);
``knn.<method>.ours`` is the top-1 itself; its goal is above every floor: raw pixels (ours and the
issue's 0.335) and the random init, also with BN statistics recomputed on the data.

Needs ../shared/data/imagenette224 (skipped with a comment otherwise). Quick: 30 s per run, 100 train
images per class; full: 420 s per run (BYOL: 900 s, see BUDGET_FACTOR), all 3,000 train and 1,000 val images --
on 2 CPU cores neither budget is near a real pretraining, so the absolute accuracies stay low; the figures are
comparisons at equal budget.
DenseCL: lightly's recipe stores every location's matched key in the dense queue, the paper one pooled key per
image (our default); ``knn.densecl`` runs ours with lightly's choice (``dense_queue_keys: locations``), so both
sides are one recipe, and ``BENCH_KNN_METHODS=densecl_paper`` adds our default against lightly's recipe.
``BENCH_KNN_METHODS=mocov3,byol`` runs only those methods; ``BENCH_KNN_SEED=N`` (default 0) changes the shared
initial weights, the view draws and the batch order of both sides (a second seed of the same comparison);
``BENCH_KNN_SEED=0,1,2`` runs the comparison once per seed and reports the ratio of the mean top-1s, with the
paired difference and its standard error over seeds: at these budgets one run's top-1 moves by about its
binomial standard error (0.015 on 1,000 val images), as large as any difference between two implementations
of one recipe, so a single seed's ratio is a coin flip around 1.0.
"""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import env_positive, report, setup_threads, train_for_budget

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette224"
SIZE, BATCH, CIFAR_STEM = 32, 128, True
# MoCo v2 / DenseCL key-encoder momentum on both sides: 0.999 is an EMA time constant of 1000 steps, longer
# than a budget's run, so the keys would come from a nearly random encoder; 0.99 suits runs of a few hundred.
MOMENTUM = 0.99
# Loss scale: our BYOL loss is the paper's, per image l(p1, z2) + l(p2, z1) with l = 2 - 2cos; lightly's
# example halves the sum of -cos, so ours has 4x its gradient. Under SGD the same update then needs lr / 4
# (and weight decay x 4, so that lr * wd stays); the comparison is of implementations of one recipe, so ours
# gets the lr that makes its update lightly's.
# (MoCo v2/v3, SwAV and DenseCL use the same loss scale on both sides.)
LR_SCALE = {"byol": 0.25}
# Weight decay: lightly's examples decay every parameter (torch SGD over model.parameters()), as MoCo v2's and
# DenseCL's own recipes do (our default for those two); BYOL, MoCo v3 and SwAV leave biases and norm parameters
# out by default (their papers), so here they decay them too: one recipe on both sides.
DECAY_ALL = "yes"
# Run only when named in BENCH_KNN_METHODS: our DenseCL default (the paper's pooled dense queue) against lightly's
# recipe, which differs from it (see "densecl" in _pairs) -- a comparison of two methods, not of implementations.
OPT_IN = ("densecl_paper",)
# BYOL's budget over the others' (full and quick alike). At 300 s (stop 14) and 420 s (stop 21: ours 0.348, lightly
# 0.353, the floor 0.348) neither side's BYOL has left the floor -- no predictor-only method learns much in ~100-300
# SGD steps at this lr -- so the ratio would compare two untrained encoders; at 900 s both sides learn (stop 14:
# ours >= lightly on two seeds). The ratio is still one of equal budgets.
BUDGET_FACTOR = {"byol": 900 / 420}
RAW_PIXEL_FLOOR = 0.335  # the raw-pixel kNN on this set; the goal is the max of it and our baselines


def _load(split: str, per_class: int | None) -> tuple[np.ndarray, np.ndarray]:
    from tasks.data.images import to_square

    imgs, labels = [], []
    for c, cls in enumerate(sorted(os.listdir(DATA / split))):
        names = sorted(os.listdir(DATA / split / cls))[:per_class]
        for n in names:
            imgs.append(to_square((DATA / split / cls / n).read_bytes(), SIZE))
            labels.append(c)
    return np.stack(imgs), np.array(labels)


def _knn(feats_train, y_train, feats_val, y_val) -> float:
    from tasks.evaluate.knn import knn_accuracy

    return knn_accuracy(torch.as_tensor(feats_train).float(), torch.as_tensor(y_train), torch.as_tensor(feats_val).float(),
                        torch.as_tensor(y_val), k=20, T=0.07, num_classes=int(y_train.max()) + 1)


def _pixel_features(train: np.ndarray, val: np.ndarray, side: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The data README's raw-pixel floor: images area-resized to ``side`` x ``side``, each feature
    standardised with the train set's mean and std."""
    import torch.nn.functional as F

    def small(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x).float()
        t = t.permute(0, 3, 1, 2) if t.shape[-1] == 3 else t
        return F.interpolate(t, size=(side, side), mode="area").flatten(1)

    a, b = small(train), small(val)
    mu, sd = a.mean(0), a.std(0) + 1e-6
    return ((a - mu) / sd).numpy(), ((b - mu) / sd).numpy()


def _encoder_knn(backbone, train, y_train, val, y_val) -> float:
    from tasks.models.backbone import extract_features

    enc = copy.deepcopy(backbone).to(memory_format=torch.contiguous_format)
    return _knn(extract_features(enc, torch.from_numpy(train)), y_train, extract_features(enc, torch.from_numpy(val)), y_val)


def _with_data_bn_stats(backbone, images: np.ndarray, batches: int = 8) -> torch.nn.Module:
    """A copy whose BatchNorm running statistics come from the data (train-mode forwards, no gradient):
    a random init evaluated with BN's default statistics (mean 0, var 1) is an artificially weak baseline
    -- a single training step already moves kNN by refreshing them."""
    from tasks.models.backbone import normalize

    enc = copy.deepcopy(backbone).train()
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for _ in range(batches):
            enc(normalize(torch.from_numpy(images[rng.choice(len(images), BATCH, replace=False)])))
    return enc.eval()


def _pairs(base, feat_dim, name: str):
    """(our model, our step, lightly's step) for ``name``, each from a copy of ``base``; identical head sizes on
    both sides."""
    from bench import lightly_steps as L
    from bench import methods as M
    from bench import mocov2 as B
    from tasks.pretrain.methods import get_method

    if name == "mocov2":
        moco = get_method("mocov2")(copy.deepcopy(base), feat_dim, hidden_dim=B.HIDDEN, out_dim=B.OUT,
                                    queue_size=B.QUEUE, momentum=MOMENTUM)
        return moco, M._ours(moco), B._lightly_step(base, feat_dim, momentum=MOMENTUM, like=moco)
    if name in ("mocov3", "byol"):
        m = get_method(name)(copy.deepcopy(base), feat_dim, hidden_dim=M.HIDDEN, out_dim=M.OUT[name])
        scale = LR_SCALE.get(name, 1.0)
        return (m, M._ours(m, lr=M.LR * scale, weight_decay=M.WD / scale, decay_norm_and_bias=DECAY_ALL),
                L._lightly_two_view(base, feat_dim, False, name, like=m))
    if name == "swav":
        swav = get_method("swav")(copy.deepcopy(base), feat_dim, hidden_dim=M.HIDDEN, out_dim=M.OUT["swav"],
                                  num_prototypes=M.PROTOTYPES, num_local_crops=2)
        return swav, M._ours(swav, decay_norm_and_bias=DECAY_ALL), L._lightly_swav(base, feat_dim, False, like=swav)
    # DenseCL's heads are C5-wide (its default; lightly's side in bench.lightly_steps likewise). lightly's recipe
    # banks every location's matched key as a dense negative, so "densecl" compares ours with the same
    # dense_queue_keys="locations"; "densecl_paper" runs our default, the paper's one pooled key per image.
    dense = get_method("densecl")(copy.deepcopy(base), feat_dim, hidden_dim=feat_dim, out_dim=M.OUT["densecl"],
                                  queue_size=M.QUEUE, momentum=MOMENTUM,
                                  dense_queue_keys="pooled" if name == "densecl_paper" else "locations")
    return dense, M._ours(dense), L._lightly_densecl(base, feat_dim, False, momentum=MOMENTUM, like=dense)


def run(quick: bool = False) -> None:
    if not DATA.exists():
        print(f"# knn: {DATA} not present, skipped")
        return
    setup_threads(2)
    budget = env_positive("BENCH_KNN_BUDGET_S", 30 if quick else 420)
    seeds = _seeds(os.environ.get("BENCH_KNN_SEED", "0"))
    per_class = 100 if quick else None
    t0 = time.perf_counter()
    train, y_train = _load("train", per_class)
    val, y_val = _load("val", 50 if quick else None)
    print(f"# knn: imagenette224 {len(train)} train / {len(val)} val at {SIZE} px, resnet18 "
          f"({'CIFAR' if CIFAR_STEM else 'ImageNet'} stem), "
          f"batch {BATCH}, {budget:.0f} s of step time per run (loaded in {time.perf_counter() - t0:.0f} s)")
    from tasks.models.backbone import build_backbone

    wanted = [m for m in os.environ.get("BENCH_KNN_METHODS", "").split(",") if m]
    pixels = _knn(train.reshape(len(train), -1), y_train, val.reshape(len(val), -1), y_val)
    p16_train, p16_val = _pixel_features(train, val)
    pixels16 = _knn(p16_train, y_train, p16_val, y_val)
    floor = max(pixels, pixels16, RAW_PIXEL_FLOOR)
    print(f"# knn: raw pixels {pixels:.3f} at {SIZE} px, {pixels16:.3f} at 16 px standardised (the data README's "
          f"floor: 0.335 on the full set)")
    per_seed = {}
    for seed in seeds:  # each seed: its own initial weights, view draws and batch order, the same on both sides
        torch.manual_seed(seed)
        base, feat_dim = build_backbone("resnet18", cifar_stem=CIFAR_STEM)
        random_init = _encoder_knn(base, train, y_train, val, y_val)
        random_bn = _encoder_knn(_with_data_bn_stats(base, train), train, y_train, val, y_val)
        print(f"# knn: seed {seed}: random init {random_init:.3f} (BN statistics from the data: {random_bn:.3f})")
        floor = max(floor, random_init, random_bn)
        per_seed[seed] = (base, feat_dim)
    known = ("mocov2", "mocov3", "byol", "swav", "densecl", "densecl_paper")
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise SystemExit(f"BENCH_KNN_METHODS: unknown {unknown}; known: {list(known)}")
    print(f"# knn: seeds {','.join(map(str, seeds))}" + (f", methods {','.join(wanted)}" if wanted else ""))
    for name in known:
        if (wanted and name not in wanted) or (not wanted and name in OPT_IN):
            continue
        accs = []
        for seed, (base, feat_dim) in per_seed.items():
            torch.manual_seed(seed)  # the heads' init: the same whichever methods run before this one
            model, ours, lightly = _pairs(base, feat_dim, name)
            augments = model.view_augments(SIZE)
            secs = budget * BUDGET_FACTOR.get(name, 1.0)
            n_ours = train_for_budget(lambda v, s, i: ours(v), augments, train, secs, BATCH, seed=seed)
            acc_ours = _encoder_knn(ours.backbone, train, y_train, val, y_val)
            n_l = train_for_budget(lambda v, s, i: lightly(v), augments, train, secs, BATCH, seed=seed)
            acc_l = _encoder_knn(lightly.backbone, train, y_train, val, y_val)
            se = (acc_ours * (1 - acc_ours) / len(val)) ** 0.5  # binomial standard error of one top-1 on this val set
            print(f"# knn: {name} seed {seed}: ours {acc_ours:.3f} (+-{se:.3f} s.e.) after {n_ours} steps, "
                  f"lightly {acc_l:.3f} after {n_l} steps ({secs:.0f} s each; lightly's heads "
                  f"{'started from ours' if lightly.started_like else 'from their own init'})")
            accs.append((acc_ours, acc_l))
        a = np.array(accs)
        if len(a) > 1:  # the paired difference over seeds, with its standard error
            d = a[:, 0] - a[:, 1]
            print(f"# knn: {name} over {len(a)} seeds: ours {a[:, 0].mean():.3f}, lightly {a[:, 1].mean():.3f}, "
                  f"ours - lightly {d.mean():+.3f} (+-{d.std(ddof=1) / len(d) ** 0.5:.3f} s.e.)")
        report(f"knn.{name}.ours_over_lightly", a[:, 0].mean() / max(a[:, 1].mean(), 1e-9), ">=1.0")
        report(f"knn.{name}.ours", a[:, 0].mean(), f">{floor:.3f}")


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"BENCH_KNN_SEED: expected integers separated by commas, got {text!r}") from None
    if not seeds:
        raise SystemExit("BENCH_KNN_SEED: no seed given")
    return seeds
