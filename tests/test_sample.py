"""Built-in shapes sample: balanced, deterministic, colour carries no class, masks match, fast, idempotent."""
from __future__ import annotations

import json
import os
import time

import numpy as np
from PIL import Image

from tasks.data.sample import CLASSES, generate_sample, write_sample


def test_generate_balanced_shapes_and_masks():
    recs = generate_sample(60, resolution=48, seed=3)
    assert len(recs) == 60 and len(CLASSES) == 6
    assert [r["class"] for r in recs[:6]] == list(CLASSES)
    counts = {c: sum(r["class"] == c for r in recs) for c in CLASSES}
    assert set(counts.values()) == {10}
    for i, r in enumerate(recs):
        assert r["image"].shape == (48, 48, 3) and r["image"].dtype == np.uint8
        assert r["mask"].shape == (48, 48) and r["mask"].dtype == np.uint8
        assert set(np.unique(r["mask"])) <= {0, 1}
        assert 0.08 <= r["mask"].mean() <= 0.40, (r["name"], r["mask"].mean())
        assert r["name"] == f"{r['class']}/{i:05d}.png"
        fg = r["image"][r["mask"] == 1].astype(float).mean(0)
        bg = r["image"][r["mask"] == 0].astype(float).mean(0)
        assert np.linalg.norm(fg - bg) > 40  # the object is visible against its background
        # grey levels (see tasks/data/sample.py): channels differ only by faint tint and noise
        assert np.abs(fg - fg.mean()).max() < 25 and np.abs(bg - bg.mean()).max() < 25
    ring = next(r for r in recs if r["class"] == "ring")["mask"]
    ys, xs = np.nonzero(ring)
    assert ring[int(round(ys.mean())), int(round(xs.mean()))] == 0  # hole in the middle


def test_deterministic_and_prefix_stable():
    a = generate_sample(12, 32, seed=1)
    b = generate_sample(20, 32, seed=1)
    c = generate_sample(12, 32, seed=2)
    for x, y in zip(a, b):
        assert (x["image"] == y["image"]).all() and (x["mask"] == y["mask"]).all()
    assert any((x["image"] != z["image"]).any() for x, z in zip(a, c))


def test_colour_does_not_predict_class():
    recs = generate_sample(600, 32, seed=0)
    y = np.array([CLASSES.index(r["class"]) for r in recs])
    feats = np.stack([np.concatenate([r["image"].reshape(-1, 3).mean(0),
                                      r["image"][r["mask"] == 1].mean(0)]) for r in recs])
    train, test = slice(0, 300), slice(300, 600)
    centroids = np.stack([feats[train][y[train] == k].mean(0) for k in range(6)])
    pred = np.argmin(((feats[test][:, None] - centroids[None]) ** 2).sum(-1), 1)
    assert (pred == y[test]).mean() < 0.35  # chance is 1/6; colour alone is no shortcut
    area = np.array([r["mask"].mean() for r in recs])
    means = [area[y == k].mean() for k in range(6)]
    assert max(means) - min(means) < 0.05  # object size is no shortcut either


def test_generation_is_fast():
    t = time.perf_counter()
    generate_sample(600, 64, seed=0)
    assert time.perf_counter() - t < 4.0


def test_write_sample_layout_and_idempotent(tmp_path):
    out = tmp_path / "shapes"
    folder = write_sample(str(out), 13, resolution=32, seed=0)
    assert folder == str(out)
    imgs = sorted(os.path.relpath(os.path.join(d, f), out / "images")
                  for d, _, fs in os.walk(out / "images") for f in fs)
    masks = sorted(os.path.relpath(os.path.join(d, f), out / "masks")
                   for d, _, fs in os.walk(out / "masks") for f in fs)
    assert len(imgs) == 13 and imgs == masks
    assert "circle/00000.png" in imgs and "cross/00011.png" in imgs
    ref = generate_sample(13, 32, 0)
    for rec in ref:
        img = np.asarray(Image.open(out / "images" / rec["name"]))
        mask = np.asarray(Image.open(out / "masks" / rec["name"]))
        assert (img == rec["image"]).all()
        assert set(np.unique(mask)) <= {0, 255} and ((mask // 255) == rec["mask"]).all()
    assert json.loads((out / "DONE").read_text())["n"] == 13

    stamp = (out / "DONE").stat().st_mtime_ns
    write_sample(str(out), 13, resolution=32, seed=0)  # same params: nothing rewritten
    assert (out / "DONE").stat().st_mtime_ns == stamp
    write_sample(str(out), 7, resolution=32, seed=0)  # new params: replaced atomically
    assert json.loads((out / "DONE").read_text())["n"] == 7
    assert sum(len(fs) for _, _, fs in os.walk(out / "images")) == 7
    assert sorted(os.listdir(tmp_path)) == ["shapes"]  # no temp folders left behind
