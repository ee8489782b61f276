"""Dense evaluations of a frozen encoder: linear segmentation (METHODS.md 8.3) and Hummingbird in-context
retrieval (METHODS.md 8.4), on features from :func:`tasks.evaluate.dense.dense_features` (``[N, D, h, w]``)
and uint8 class-id masks (``[N, H, W]``, ``ignore_index`` for unlabelled pixels).

mIoU everywhere is dataset-level: one confusion matrix over all pixels of all images, IoU per class, mean
over the classes that occur in the ground truth or the prediction.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tasks.data.segmentation import hw_size


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _check_masks(masks: torch.Tensor, num_classes: int, ignore_index: int, what: str) -> None:
    bad = masks[(masks != ignore_index) & ((masks < 0) | (masks >= num_classes))]
    if bad.numel():
        raise ValueError(f"{what} hold values {sorted(set(bad.unique().tolist()))[:8]} outside 0..{num_classes - 1} "
                         f"that are not the ignore index {ignore_index}")


def confusion(pred, target, num_classes: int, ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """(``[C, C]`` pixel counts, rows = ground truth, columns = prediction; ``[C]`` ground-truth pixels per
    class). Ignored target pixels are left out; a predicted id outside ``0..C-1`` has no column and counts
    only as a miss of its true class."""
    p, t = _np(pred).reshape(-1).astype(np.int64), _np(target).reshape(-1).astype(np.int64)
    if p.shape != t.shape:
        raise ValueError(f"prediction has {p.size} pixels, target {t.size}")
    keep = t != ignore_index
    p, t = p[keep], t[keep]
    if t.size and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"target ids outside 0..{num_classes - 1} (and not {ignore_index})")
    inside = (p >= 0) & (p < num_classes)
    conf = np.bincount(t[inside] * num_classes + p[inside], minlength=num_classes ** 2)
    return conf.reshape(num_classes, num_classes), np.bincount(t, minlength=num_classes)


def miou(pred, target, num_classes: int, ignore_index: int = 255) -> tuple[float, np.ndarray]:
    """(mean IoU, per-class IoU ``[C]``): IoU_c = TP / (TP + FP + FN) over the pixels whose target is not
    ``ignore_index``; a class in neither target nor prediction is NaN and left out of the mean."""
    conf, target_total = confusion(pred, target, num_classes, ignore_index)
    tp = np.diag(conf).astype(np.float64)
    union = target_total + conf.sum(0) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    return (float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")), iou


def _resize_masks(masks, size: tuple[int, int]) -> torch.Tensor:
    m = torch.as_tensor(_np(masks)).long()
    if tuple(m.shape[-2:]) == size:
        return m
    # "nearest-exact" samples pixel centres, as PIL's NEAREST does
    return F.interpolate(m[:, None].float(), size=size, mode="nearest-exact")[:, 0].long()


# -- 8.3 linear segmentation

def linear_segmentation(train_feats: torch.Tensor, train_masks, val_feats: torch.Tensor, val_masks,
                        num_classes: int, *, out_size: int | Sequence[int] = 100, epochs: int = 25,
                        lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 1e-4,
                        batch_size: int = 128, seed: int = 0, ignore_index: int = 255) -> dict:
    """A 1x1 convolution D -> C trained on frozen features (NeCo / Leopart protocol, METHODS.md 8.3).

    Logits are bilinearly upsampled to ``out_size`` (100 for a 448 px input in the protocol) and scored
    against the masks nearest-downsampled to ``out_size``, with cross-entropy ignoring ``ignore_index``; SGD
    (``lr``, ``momentum``, ``weight_decay``), the lr x0.1 after 80 % of the epochs; mIoU on the val features
    at ``out_size``, predicted ids taken directly. The head is applied before the upsampling: a 1x1 conv
    and bilinear interpolation (weights summing to 1) commute, so this equals upsampling the D-channel
    features first, at C/D of the cost. Zero-initialised head and seeded batch order: deterministic on CPU.
    No augmentation (the protocol's random resized crops need the encoder in the loop).

    Returns ``{"miou", "per_class_iou", "pred" (uint8 [N_val, *out_size]), "target" (the val masks at
    out_size), "train_loss" (mean over the last epoch)}``.
    """
    size = hw_size(out_size)
    device = train_feats.device
    x, xv = train_feats.float(), val_feats.float().to(device)
    y, yv = _resize_masks(train_masks, size).to(device), _resize_masks(val_masks, size)
    _check_masks(y, num_classes, ignore_index, "train masks")
    if len(x) != len(y) or len(xv) != len(yv):
        raise ValueError(f"features/masks counts differ: train {len(x)}/{len(y)}, val {len(xv)}/{len(yv)}")
    head = nn.Conv2d(x.shape[1], num_classes, 1).to(device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(1, int(0.8 * epochs))], gamma=0.1)
    gen = torch.Generator().manual_seed(seed)
    bs = max(1, min(batch_size, len(x)))

    def logits(f: torch.Tensor) -> torch.Tensor:
        return F.interpolate(head(f), size=size, mode="bilinear", align_corners=False)

    last = float("nan")
    with torch.enable_grad():
        for _ in range(epochs):
            order, losses = torch.randperm(len(x), generator=gen).to(device), []
            for i in range(0, len(x), bs):
                idx = order[i:i + bs]
                if not (y[idx] != ignore_index).any():
                    continue  # an all-ignored batch has no loss (the mean would be NaN)
                loss = F.cross_entropy(logits(x[idx]), y[idx], ignore_index=ignore_index)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            sched.step()
            last = float(np.mean(losses)) if losses else float("nan")
    with torch.no_grad():
        pred = torch.cat([logits(xv[i:i + bs]).argmax(1).to(torch.uint8).cpu() for i in range(0, len(xv), bs)])
    m, per_class = miou(pred, yv, num_classes, ignore_index)
    return {"miou": m, "per_class_iou": per_class, "pred": pred.numpy(), "target": yv.to(torch.uint8).numpy(),
            "train_loss": last}


# -- 8.4 Hummingbird

def patch_labels(masks, grid: tuple[int, int], num_classes: int, ignore_index: int = 255,
                 chunk: int = 16) -> torch.Tensor:
    """Soft patch labels ``[N, h*w, C]`` (raster order): per patch of the ``grid``, the fraction of its
    *labelled* pixels in each class. Ignored pixels are left out of the fractions (a patch with no labelled
    pixel gets all zeros); the open implementation instead maps 255 to class 0, which is VOC's background
    but would be a real class (CamVid's sky) elsewhere. Patch bins are adaptive-average-pool bins, so mask
    sizes that are not a multiple of the grid work too."""
    m = torch.as_tensor(_np(masks)).long()
    out = []
    for i in range(0, len(m), chunk):
        c = m[i:i + chunk]
        c = torch.where(c == ignore_index, num_classes, c)  # the extra column collects ignored pixels
        onehot = F.one_hot(c, num_classes + 1)[..., :num_classes].permute(0, 3, 1, 2).float()
        frac = F.adaptive_avg_pool2d(onehot, grid)  # fraction of all pixels of the patch
        frac = frac / frac.sum(1, keepdim=True).clamp_min(1e-12)
        out.append(frac.flatten(2).transpose(1, 2))
    return torch.cat(out)


def sample_memory(labels: torch.Tensor, per_image: int, seed: int = 0) -> torch.Tensor:
    """Flat indices into ``labels.view(-1, C)`` of the patches kept in a bounded memory.

    Per image (``labels`` ``[N, P, C]``) keep the ``per_image`` patches with the smallest score
    ``sum_{c in patch} (#patches of the image containing c) * U(0, 1)``: patches of rare classes score low
    and are preferred, the noise keeps the choice from being all-or-nothing. Unlabelled patches are never
    kept; an image with fewer labelled patches keeps all of them.
    """
    n, p, _ = labels.shape
    gen = torch.Generator().manual_seed(seed)
    present = labels > 0
    counts = present.sum(1, keepdim=True)  # [N, 1, C]
    score = (present * counts).sum(2).float() * torch.rand(n, p, generator=gen)
    score = torch.where(present.any(2), score, torch.inf)
    keep = []
    for i in range(n):
        k = min(per_image, int(present[i].any(1).sum()))
        keep.append(score[i].topk(k, largest=False).indices + i * p)
    return torch.cat(keep) if keep else torch.empty(0, dtype=torch.long)


def faiss_knn(memory: torch.Tensor, queries: torch.Tensor, k: int, chunk: int = 8192):
    """Exact inner-product neighbours with ``faiss.IndexFlatIP``: (similarities, indices) ``[Q, k]``; on
    L2-normalised rows this is cosine similarity. Queries go through in chunks of ``chunk``."""
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())  # not more threads than torch's next to it
    index = faiss.IndexFlatIP(memory.shape[1])
    index.add(np.ascontiguousarray(_np(memory), dtype=np.float32))
    sims, idx = [], []
    for i in range(0, len(queries), chunk):
        s, j = index.search(np.ascontiguousarray(_np(queries[i:i + chunk]), dtype=np.float32), k)
        sims.append(torch.from_numpy(s))
        idx.append(torch.from_numpy(j))
    return torch.cat(sims), torch.cat(idx)


def torch_knn(memory: torch.Tensor, queries: torch.Tensor, k: int, chunk: int = 4096):
    """The same exact search as :func:`faiss_knn` by chunked matmul + topk (2.5x faster than faiss' flat
    index on a 2-core AVX-512 CPU at CamVid's size; faiss' value is its approximate indexes for memories of
    millions of patches)."""
    sims, idx = [], []
    mem_t = memory.float().T.contiguous()
    for i in range(0, len(queries), chunk):
        s, j = (queries[i:i + chunk].float() @ mem_t).topk(k, dim=1)
        sims.append(s)
        idx.append(j)
    return torch.cat(sims), torch.cat(idx)


SEARCH = {"faiss": faiss_knn, "torch": torch_knn}


def hungarian_remap(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """``pred`` with its ids permuted by the one-to-one matching to ground-truth ids that maximises the
    number of agreeing pixels (``scipy.optimize.linear_sum_assignment``)."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as err:
        raise ImportError("hungarian=True needs scipy (pip install scipy)") from err
    conf, _ = confusion(pred, target, num_classes, ignore_index)
    rows, cols = linear_sum_assignment(conf.T, maximize=True)  # rows: predicted ids, cols: true ids
    lut = np.arange(256, dtype=np.uint8)
    lut[rows] = cols
    return lut[np.asarray(pred, dtype=np.uint8)]


def hummingbird(train_feats: torch.Tensor, train_masks, val_feats: torch.Tensor, val_masks, num_classes: int, *,
                k: int = 30, temperature: float = 0.02, memory_size: int | None = None, seed: int = 0,
                ignore_index: int = 255, hungarian: bool = False, chunk: int = 8192, search: str = "faiss") -> dict:
    """Hummingbird in-context segmentation by patch retrieval (Balazevic et al. 2023; METHODS.md 8.4).

    Memory: every train patch's L2-normalised feature with its soft label (:func:`patch_labels`), or with
    ``memory_size`` set, ``memory_size // N_train`` patches per image chosen by :func:`sample_memory`
    (for augmented memories pass the augmented views as the train set,
    :func:`tasks.data.segmentation.memory_views`: the per-image share then counts views, as M / (#images x
    #epochs) does). Each val patch, L2-normalised too (so the softmax sees cosines, not norm-scaled inner
    products), takes its ``k`` nearest memory patches (exact search: ``search="faiss"``, ``faiss.IndexFlatIP``,
    or ``"torch"``, matmul + topk -- the same neighbours), weights
    ``softmax(cos / temperature)`` and the weighted sum of their soft labels; the ``[C, h, w]`` label map
    is bilinearly upsampled to the mask size and its argmax is the prediction. The predicted ids are class
    ids, scored directly; the open implementation Hungarian-matches predicted to true ids first:
    ``hungarian=True`` does so too, matching to maximise agreeing pixels (:func:`hungarian_remap`; the open
    code's exact matching cost is not reproduced here). ``patches_per_s`` times the retrieval and transfer.
    Memory use: the memory (M x D float32), the neighbours (Q x k similarities and int64 ids for Q val
    patches) and ``chunk x k x C`` floats per transfer chunk. Exact search costs Q x M x D multiply-adds.

    Returns ``{"miou", "per_class_iou", "pred" (uint8 [N_val, H, W]), "patches_per_s", "memory_patches"}``.
    """
    n, d, h, w = train_feats.shape
    if val_feats.shape[1:] != train_feats.shape[1:]:
        raise ValueError(f"train features {tuple(train_feats.shape[1:])} and val {tuple(val_feats.shape[1:])} differ")
    train_m = torch.as_tensor(_np(train_masks))
    _check_masks(train_m.long(), num_classes, ignore_index, "train masks")
    labels = patch_labels(train_m, (h, w), num_classes, ignore_index)  # [N, P, C]
    feats = train_feats.float().flatten(2).transpose(1, 2)  # [N, P, D]
    if memory_size is None:
        keep = torch.nonzero(labels.sum(2).flatten() > 0).flatten()
    else:
        if memory_size // n < 1:
            raise ValueError(f"memory_size {memory_size} is smaller than the {n} train images")
        keep = sample_memory(labels, memory_size // n, seed)
    memory = F.normalize(feats.reshape(-1, d)[keep], dim=1)
    mem_labels = labels.reshape(-1, num_classes)[keep]
    if not len(memory):
        raise ValueError("the Hummingbird memory is empty: no train patch has a labelled pixel")
    kk = min(k, len(memory))

    queries = F.normalize(val_feats.float().flatten(2).transpose(1, 2).reshape(-1, d), dim=1)
    start = time.perf_counter()
    if search not in SEARCH:
        raise ValueError(f"unknown neighbour search {search!r} (known: {', '.join(SEARCH)})")
    sims, idx = SEARCH[search](memory, queries, kk, chunk)
    soft = []
    for i in range(0, len(queries), chunk):
        weights = torch.softmax(sims[i:i + chunk] / temperature, dim=1)
        soft.append(torch.einsum("qk,qkc->qc", weights, mem_labels[idx[i:i + chunk]]))
    elapsed = time.perf_counter() - start
    soft = torch.cat(soft).reshape(len(val_feats), h, w, num_classes).permute(0, 3, 1, 2)

    val_m = _np(val_masks)
    size = tuple(val_m.shape[-2:])
    pred = np.concatenate([F.interpolate(soft[i:i + 16], size=size, mode="bilinear", align_corners=False)
                           .argmax(1).to(torch.uint8).numpy() for i in range(0, len(soft), 16)])
    if hungarian:
        pred = hungarian_remap(pred, val_m, num_classes, ignore_index)
    m, per_class = miou(pred, val_m, num_classes, ignore_index)
    return {"miou": m, "per_class_iou": per_class, "pred": pred,
            "patches_per_s": len(queries) / max(elapsed, 1e-9), "memory_patches": int(len(memory))}


def hummingbird_encoder(encoder: nn.Module, train_images, train_masks, val_images, val_masks, num_classes: int,
                        *, augment_epochs: int = 0, batch_size: int = 32, seed: int = 0, **kwargs) -> dict:
    """:func:`hummingbird` from images: the memory's views (``augment_epochs`` passes of paired random
    resized crops + colour jitter, or the train images as they are when 0) and the val images go through
    :func:`~tasks.evaluate.dense.dense_features`; ``kwargs`` go to :func:`hummingbird`."""
    from tasks.data.segmentation import memory_views
    from tasks.evaluate.dense import dense_features

    mem_images, mem_masks = memory_views(_np(train_images), _np(train_masks), augment_epochs, seed)
    train_feats = dense_features(encoder, mem_images, batch_size)
    val_feats = dense_features(encoder, val_images, batch_size)
    return hummingbird(train_feats, mem_masks, val_feats, val_masks, num_classes, seed=seed, **kwargs)


# -- both protocols for one encoder (the evaluate stage's dense evaluation)

def evaluate_dense(encoder: nn.Module, train_images, train_masks, val_images, val_masks, num_classes: int, *,
                   linear: bool = True, in_context: bool = True, linear_epochs: int = 25, linear_lr: float = 0.01,
                   out_size: int = 100, k: int = 30, temperature: float = 0.02, memory_size: int | None = None,
                   augment_epochs: int = 0, batch_size: int = 32, seed: int = 0, ignore_index: int = 255,
                   search: str = "faiss") -> dict:
    """Linear segmentation and Hummingbird in-context segmentation of one frozen encoder (ResNet maps or
    ViT patch tokens, :func:`~tasks.evaluate.dense.dense_features`). The train features are extracted once
    and serve both (unless the memory is augmented: ``augment_epochs`` > 0).

    Returns ``{"linear_miou", "linear_per_class_iou", "linear_pred", "hbird_miou", "hbird_per_class_iou",
    "hbird_pred", "hbird_patches_per_s", "hbird_memory_patches", "feature_grid"}`` (those asked for)."""
    from tasks.data.segmentation import memory_views
    from tasks.evaluate.dense import dense_features

    train_feats = dense_features(encoder, _np(train_images), batch_size)
    val_feats = dense_features(encoder, _np(val_images), batch_size)
    out: dict = {"feature_grid": list(train_feats.shape[-2:])}
    if linear:
        r = linear_segmentation(train_feats, train_masks, val_feats, val_masks, num_classes, out_size=out_size,
                                epochs=linear_epochs, lr=linear_lr, seed=seed, ignore_index=ignore_index)
        out.update(linear_miou=r["miou"], linear_per_class_iou=r["per_class_iou"].tolist(), linear_pred=r["pred"])
    if in_context:
        mem_feats, mem_masks = train_feats, train_masks
        if augment_epochs > 0:
            mem_images, mem_masks = memory_views(_np(train_images), _np(train_masks), augment_epochs, seed)
            mem_feats = dense_features(encoder, mem_images, batch_size)
        r = hummingbird(mem_feats, mem_masks, val_feats, val_masks, num_classes, k=k, temperature=temperature,
                        memory_size=memory_size, seed=seed, ignore_index=ignore_index, search=search)
        out.update(hbird_miou=r["miou"], hbird_per_class_iou=r["per_class_iou"].tolist(), hbird_pred=r["pred"],
                   hbird_patches_per_s=r["patches_per_s"], hbird_memory_patches=r["memory_patches"])
    return out
