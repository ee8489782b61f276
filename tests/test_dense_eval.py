"""Dense evaluations: CamVid-style loading, frozen patch features, mIoU, linear segmentation, Hummingbird."""
import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tasks.data.segmentation import load_segmentation_split, memory_views, paired_random_resized_crop
from tasks.evaluate.dense import dense_features
from tasks.evaluate.overlay import overlay_grid
from tasks.evaluate.segmentation import (faiss_knn, torch_knn, hummingbird, hummingbird_encoder, linear_segmentation, miou,
                                         patch_labels, sample_memory)
from tasks.models.backbone import build_backbone, normalize

CAMVID = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "camvid"


# -- mIoU

def test_miou_by_hand_with_ignore():
    target = np.array([[0, 0, 1], [1, 255, 2]])
    pred = np.array([[0, 1, 1], [1, 0, 0]])  # the 0 under the ignored pixel does not count
    # class 0: TP 1, FP 1 (at the 2), FN 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 0, FN 1 -> 0
    m, iou = miou(pred, target, num_classes=4)
    assert np.allclose(iou[:3], [1 / 3, 2 / 3, 0.0]) and math.isnan(iou[3])
    assert m == pytest.approx(1 / 3)
    m_t, _ = miou(torch.tensor(pred), torch.tensor(target), num_classes=4)
    assert m_t == pytest.approx(m)
    # a class only in the prediction counts with IoU 0; an out-of-range prediction is a miss of the true class
    m, iou = miou(np.array([3, 1]), np.array([0, 1]), num_classes=4)
    assert iou.tolist()[:2] == [0.0, 1.0] and iou[3] == 0.0 and m == pytest.approx(1 / 3)
    m, iou = miou(np.array([7, 1]), np.array([0, 1]), num_classes=2)
    assert iou.tolist() == [0.0, 1.0] and m == 0.5
    with pytest.raises(ValueError):
        miou(np.array([0]), np.array([5]), num_classes=4)


# -- dense features

def _vit(**kw):
    return build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, **kw)[0]


@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_dense_features_vit_drops_prefix_tokens(reg_tokens):
    torch.manual_seed(0)
    vit = _vit(reg_tokens=reg_tokens).train()
    assert vit.num_prefix_tokens == 1 + reg_tokens
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    feats = dense_features(vit, images, batch_size=2)
    assert feats.shape == (5, 32, 4, 4) and feats.dtype == torch.float32
    assert vit.training  # mode restored
    with torch.no_grad():
        tokens = vit.eval().forward_features(normalize(images))[:, 1 + reg_tokens:]
    # token r * 4 + c is grid cell (r, c)
    assert torch.allclose(feats.flatten(2).transpose(1, 2), tokens, atol=1e-5)
    assert torch.allclose(feats[:, :, 1, 2], tokens[:, 1 * 4 + 2], atol=1e-5)
    # float input is taken as normalised, channel-last or not
    assert torch.allclose(dense_features(vit, normalize(images), 4), feats, atol=1e-5)
    assert torch.allclose(dense_features(vit, normalize(images).permute(0, 2, 3, 1), 4), feats, atol=1e-5)


def test_dense_features_cnn_maps():
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    resnet = build_backbone("resnet18", cifar_stem=True)[0]
    assert dense_features(resnet, images, batch_size=2).shape == (3, 512, 4, 4)
    tiny = build_backbone("tiny_convnet")[0]
    feats = dense_features(tiny, images)
    assert feats.shape == (3, 16, 8, 8)
    with torch.no_grad():
        assert torch.allclose(feats, tiny.forward_features(normalize(torch.from_numpy(images))))


# -- constructed patch worlds: each patch's class is known and (optionally) written into its feature

def _stripes(n, classes, grid=4, patch=4, seed=0, signal=1.0, noise=0.1, dim=16):
    """Masks of vertical stripes one patch wide (random class per stripe) and features [n, dim, grid, grid]
    holding ``signal * one_hot(class) + noise``. Stripes keep bilinear upsampling of patch scores exact
    (the own patch outweighs its neighbours at every pixel), so perfect features give mIoU 1."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.randint(0, classes, (n, grid), generator=g)  # per image, per patch column
    cell = cls[:, None, :].expand(n, grid, grid)              # [n, rows, cols]
    masks = cell.repeat_interleave(patch, 1).repeat_interleave(patch, 2).to(torch.uint8)
    feats = signal * F.one_hot(cell, dim).permute(0, 3, 1, 2).float()
    feats = feats + noise * torch.randn(n, dim, grid, grid, generator=g)
    return feats, masks


def test_patch_labels_are_fractions_of_labelled_pixels():
    mask = torch.tensor([[[0, 0, 1, 1], [1, 255, 1, 1], [255, 255, 2, 2], [255, 255, 2, 0]]], dtype=torch.uint8)
    lab = patch_labels(mask, (2, 2), num_classes=3)
    assert lab.shape == (1, 4, 3)
    assert torch.allclose(lab[0], torch.tensor([[2 / 3, 1 / 3, 0], [0, 1, 0], [0, 0, 0], [1 / 4, 0, 3 / 4]]))


def test_sample_memory_prefers_rare_classes_and_skips_unlabelled():
    labels = torch.zeros(1, 16, 3)
    labels[0, :, 0] = 1
    labels[0, 5] = torch.tensor([0.0, 1.0, 0.0])  # the only patch with class 1
    labels[0, 9] = 0                               # no labelled pixel
    for seed in range(5):
        keep = sample_memory(labels, per_image=2, seed=seed)
        assert len(keep) == 2 and 5 in keep.tolist() and 9 not in keep.tolist()
    assert sorted(sample_memory(labels, per_image=99).tolist()) == [i for i in range(16) if i != 9]
    # per-image share: two images, second offset by its patch count
    keep = sample_memory(labels.repeat(2, 1, 1), per_image=3).tolist()
    assert len(keep) == 6 and 5 in keep[:3] and 21 in keep[3:] and all(k >= 16 for k in keep[3:])


def test_faiss_neighbours_match_brute_force():
    g = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(500, 16, generator=g), dim=1)
    queries = F.normalize(torch.randn(70, 16, generator=g), dim=1)
    sims, idx = faiss_knn(memory, queries, k=30, chunk=32)
    ref_sims, ref_idx = (queries @ memory.t()).topk(30, dim=1)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(sims, ref_sims, atol=1e-5)
    t_sims, t_idx = torch_knn(memory, queries, k=30, chunk=32)  # the torch backend: the same neighbours
    assert torch.equal(t_idx, ref_idx) and torch.allclose(t_sims, ref_sims, atol=1e-6)


def test_hummingbird_recovers_encoded_classes_and_random_is_chance():
    train_f, train_m = _stripes(40, 4, seed=0)
    val_f, val_m = _stripes(12, 4, seed=1)
    r = hummingbird(train_f, train_m, val_f, val_m, num_classes=4)
    assert r["miou"] > 0.99 and r["pred"].shape == (12, 16, 16) and r["pred"].dtype == np.uint8
    assert r["memory_patches"] == 40 * 16 and r["patches_per_s"] > 0
    bounded = hummingbird(train_f, train_m, val_f, val_m, num_classes=4, memory_size=40 * 5, k=5)
    assert bounded["memory_patches"] == 200 and bounded["miou"] > 0.99
    noise_f = torch.randn(train_f.shape, generator=torch.Generator().manual_seed(2))
    noise_v = torch.randn(val_f.shape, generator=torch.Generator().manual_seed(3))
    chance = hummingbird(noise_f, train_m, noise_v, val_m, num_classes=4)
    assert chance["miou"] < 0.3  # independent predictions of 4 balanced classes: about 1/7
    matched = hummingbird(noise_f, train_m, noise_v, val_m, num_classes=4, hungarian=True)
    assert matched["miou"] >= chance["miou"] - 0.02


def test_hummingbird_predicts_the_class_ids_not_a_matching():
    # features encode the class, but the memory labels are permuted: direct ids are wrong, matching fixes it
    train_f, train_m = _stripes(20, 3, seed=4)
    val_f, val_m = _stripes(6, 3, seed=5)
    permuted = torch.tensor([1, 2, 0], dtype=torch.uint8)[train_m.long()]
    assert hummingbird(train_f, permuted, val_f, val_m, num_classes=3)["miou"] < 0.05
    assert hummingbird(train_f, permuted, val_f, val_m, num_classes=3, hungarian=True)["miou"] > 0.99


def test_linear_segmentation_separable_beats_random():
    train_f, train_m = _stripes(48, 4, seed=6, signal=1.0, noise=0.3)
    val_f, val_m = _stripes(16, 4, seed=7, signal=1.0, noise=0.3)
    kw = dict(num_classes=4, out_size=8, epochs=20, lr=0.1, batch_size=16, seed=0)
    r = linear_segmentation(train_f, train_m, val_f, val_m, **kw)
    assert r["miou"] > 0.9 and r["pred"].shape == (16, 8, 8) and r["target"].shape == (16, 8, 8)
    again = linear_segmentation(train_f, train_m, val_f, val_m, **kw)
    assert np.array_equal(again["pred"], r["pred"]) and again["train_loss"] == r["train_loss"]
    g = torch.Generator().manual_seed(8)
    rand = linear_segmentation(torch.randn(train_f.shape, generator=g), train_m,
                               torch.randn(val_f.shape, generator=g), val_m, **kw)
    assert rand["miou"] < r["miou"] - 0.4


def test_linear_segmentation_ignores_ignored_pixels():
    train_f, train_m = _stripes(16, 3, seed=9)
    val_f, val_m = _stripes(8, 3, seed=10)
    train_m[:, :8] = 255
    val_m[:, :, :4] = 255
    r = linear_segmentation(train_f, train_m, val_f, val_m, 3, out_size=16, epochs=20, lr=0.1, batch_size=8, seed=0)
    assert np.isfinite(r["train_loss"]) and r["miou"] > 0.9


# -- loader

def _write_set(root: Path) -> None:
    (root / "img").mkdir(parents=True)
    (root / "lab").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, mode in enumerate(["RGB", "L", "RGB", "RGB"]):
        shape = (30, 40, 3) if mode == "RGB" else (30, 40)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / "img" / f"{i}.jpg")
        mask = np.zeros((30, 40), np.uint8)
        mask[:, 20:] = 3
        mask[:10] = 11  # void
        if i == 3:
            mask[0, 0] = 12  # neither a class nor void
        Image.fromarray(mask).save(root / "lab" / f"{i}.png")
        rows.append((f"img/{i}.jpg", f"lab/{i}.png", "train"))
    (root / "img" / "bad.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    rows.insert(1, ("img/bad.jpg", "lab/0.png", "train"))
    rows.append(("img/0.jpg", "lab/0.png", "val"))
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "mask", "split"), *rows])


def test_loader_resizes_maps_void_and_skips_bad_files(tmp_path):
    _write_set(tmp_path)
    split = load_segmentation_split(str(tmp_path), "train", 16, num_classes=11)
    assert split.images.shape == (3, 16, 16, 3) and split.images.dtype == np.uint8
    assert split.masks.shape == (3, 16, 16) and split.masks.dtype == np.uint8
    assert set(np.unique(split.masks).tolist()) == {0, 3, 255}  # nearest: no new ids at the edges
    assert split.names == ["img/0.jpg", "img/1.jpg", "img/2.jpg"]  # img/1.jpg is a grayscale JPEG
    reasons = dict(split.skipped)
    assert set(reasons) == {"img/bad.jpg", "img/3.jpg"}
    assert "12" in reasons["img/3.jpg"] and reasons["img/bad.jpg"]
    rect = load_segmentation_split(str(tmp_path), "train", (12, 20), limit=1)
    assert rect.images.shape == (1, 12, 20, 3) and rect.masks.shape == (1, 12, 20) and not rect.skipped
    kept_void = load_segmentation_split(str(tmp_path), "val", 8, ignore_values=())
    assert 11 in kept_void.masks


def test_loader_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_segmentation_split(str(tmp_path / "nowhere"), "train", 16)
    with pytest.raises(FileNotFoundError, match="manifest.csv"):
        load_segmentation_split(str(tmp_path), "train", 16)
    _write_set(tmp_path / "set")
    with pytest.raises(ValueError, match="test"):
        load_segmentation_split(str(tmp_path / "set"), "test", 16)


def test_paired_crop_and_memory_views():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
    masks = np.repeat(np.repeat(rng.integers(0, 4, (3, 3, 3), dtype=np.uint8), 8, 1), 8, 2)
    im, m = paired_random_resized_crop(images[0], masks[0], 16, np.random.default_rng(1))
    assert im.shape == (16, 16, 3) and m.shape == (16, 16) and set(np.unique(m)) <= set(np.unique(masks[0]))
    same = memory_views(images, masks, 0)
    assert same[0] is images and same[1] is masks
    a, b = memory_views(images, masks, 2, seed=3), memory_views(images, masks, 2, seed=3)
    assert a[0].shape == (6, 24, 24, 3) and a[1].shape == (6, 24, 24)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # the crop takes the mask along: a mask equal to the image's red channel stays equal to it (no jitter)
    im, m = paired_random_resized_crop(images[1], images[1][..., 0], 12, np.random.default_rng(2), jitter=0)
    box_mask = np.asarray(Image.fromarray(images[1][..., 0]))
    assert m.shape == (12, 12) and set(np.unique(m)) <= set(np.unique(box_mask))


def test_hummingbird_from_an_encoder_with_augmented_memory():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    masks = np.repeat(rng.integers(0, 3, (6, 1, 32), dtype=np.uint8), 32, 1)
    encoder = build_backbone("tiny_convnet")[0]
    r = hummingbird_encoder(encoder, images[:4], masks[:4], images[4:], masks[4:], 3, augment_epochs=2,
                            memory_size=4 * 2 * 10)
    assert r["memory_patches"] == 80 and r["pred"].shape == (2, 32, 32) and 0 <= r["miou"] <= 1


@pytest.mark.skipif(not (CAMVID / "manifest.csv").exists(), reason="shared CamVid data not present")
def test_real_camvid_train_images():
    split = load_segmentation_split(str(CAMVID), "train", 64, limit=4, num_classes=11)
    assert split.images.shape == (4, 64, 64, 3) and split.masks.shape == (4, 64, 64) and not split.skipped
    values = set(np.unique(split.masks).tolist())
    assert values <= set(range(11)) | {255} and len(values - {255}) >= 3
    assert split.images.std() > 10  # real pictures, not blank


# -- overlay

def test_overlay_grid_shape_and_ignore_keeps_image():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    gt = rng.integers(0, 4, (5, 16, 16)).astype(np.uint8)
    gt[:, :4] = 255
    pred = rng.integers(0, 4, (5, 8, 8)).astype(np.uint8)  # another resolution, e.g. the linear head's
    grid = overlay_grid(images, gt, pred, num_classes=4, max_images=3)
    assert grid.dtype == np.uint8 and grid.shape == (3 * 16 + 2 * 2, 3 * 16 + 2 * 2, 3)
    row1 = grid[18:34]
    assert np.array_equal(row1[:, :16], images[1])
    gt_panel = row1[:, 18:34]
    assert np.array_equal(gt_panel[:4], images[1][:4])          # ignored: the image's own colours
    assert (gt_panel[4:] != images[1][4:]).any(axis=-1).mean() > 0.9  # labelled: tinted
