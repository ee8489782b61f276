"""GenView's two Ray Data stages vs a plain sequential loop over the same model, same batch size, same machine.

* ``views.stage_over_loop``: images/s of the views stage's generation (the tiny random Stable unCLIP
  pipeline, 20 denoising steps, guidance 10: the real call path) over a loop that loads the same pipeline
  once and calls it batch after batch with torch's default threads; as for the masks, both after their first
  batch (``warm_images_per_s``), with the end-to-end ratio (actor start and model load included) printed.
* ``masks.stage_over_loop``: the masks stage's prediction (tiny random ViT: patch tokens, PCA score,
  threshold, PNG) over a loop doing the same per batch, both *after their first output* (the stage's
  ``warm_images_per_s``: rows after the first block over the time after it; the loop: after its first batch).
  The work per image is a millisecond, so on 2 cores the fixed start-up -- each actor starts a process and
  imports torch and timm, ~5-10 s here, against the loop that runs inside this already-warm process -- is
  longer than the whole run of a few thousand images; it is printed on both sides, with the end-to-end ratio,
  but the figure is the rate a real dataset (10^5-10^6 images) runs at.

Both stages run on a local Ray cluster with every CPU of the machine, on the built-in sample (no
download). The goal is >= 1.0: distributing the work must not cost throughput even on one small machine.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from bench.common import report


def _pipeline(tmp: Path, n: int) -> list[str]:
    cfg = {
        "name": "bench-genview", "experiment": "sslforge-bench",
        "curate": {"input": "builtin://shapes", "sample_size": n, "sample_resolution": 64},
        "masks": {"encoder": "vit_tiny_patch16_224", "encoder_kwargs": {"depth": 4}, "resolution": 64,
                  "pca_sample": min(n, 128), "batch_size": 16},
        "views": {"generator": "unclip", "model": "tiny-random", "size": 32, "steps": 20, "batch_size": 4},
    }
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return [str(path), "--storage", str(tmp / "store"), "--tracking-uri", f"sqlite:///{tmp}/mlflow.db"]


def _stage(name: str, args: list[str]) -> dict:
    from pipelines.cli import main
    from tasks.store import Storage

    if main(["stage", name, *args, "--force", name]) != 0:
        raise RuntimeError(f"the {name} stage failed")
    return Storage(args[args.index("--storage") + 1]).manifest(name)


def _rates(n: int, batch: int, t0: float, t_first: float) -> dict:
    """A loop's images/s end to end (from ``t0``, model load included) and after its first batch."""
    t_end = time.perf_counter()
    return {"images_per_s": n / (t_end - t0), "first_s": t_first - t0,
            "warm_images_per_s": (n - min(batch, n)) / (t_end - t_first)}


def _views_loop(storage: str, cfg: dict) -> dict:
    import torch

    from tasks.data.images import to_square
    from tasks.store import Storage
    from tasks.views.generate import GenerationSettings, encode_jpeg, generate, load_pipeline, view_seed

    st = Storage(storage)
    images = dict(zip(*(st.read_table("curate", columns=["id", "image"])[c].to_pylist() for c in ("id", "image"))))
    views = st.read_table("views", columns=["id", "noise_level"]).to_pylist()
    views.sort(key=lambda r: (r["noise_level"], r["id"]))
    settings = GenerationSettings(**{k: cfg[k] for k in ("size", "steps")})
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    pipe = load_pipeline(cfg["model"])
    b, t_first = cfg["batch_size"], None
    for i in range(0, len(views), b):
        chunk = views[i:i + b]
        for level in sorted({r["noise_level"] for r in chunk}):  # one call per noise level, as the stage
            rows = [r for r in chunk if r["noise_level"] == level]
            out = generate(pipe, [to_square(images[r["id"]], settings.size) for r in rows], level,
                           [view_seed(r["id"]) for r in rows], settings)
            [encode_jpeg(v) for v in out]
        if t_first is None:
            t_first = time.perf_counter()
    return _rates(len(views), b, t0, t_first)


def _masks_loop(storage: str, cfg: dict) -> dict:
    import json

    import torch

    from tasks.data.images import batch_to_array, mask_to_png
    from tasks.store import Storage
    from tasks.views.masks import build_vit, patch_tokens, score_maps, upsample_nearest

    st = Storage(storage)
    images = st.read_table("curate", columns=["image"])["image"].to_pylist()
    u = np.load(Path(storage) / "masks" / "pca_direction.npy")
    alpha = json.loads(st.read_file("masks", "pca.json"))["alpha"]
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build_vit(cfg["encoder"], "", cfg["resolution"], **cfg["encoder_kwargs"])
    b, t_first = cfg["batch_size"], None
    for i in range(0, len(images), b):
        imgs = batch_to_array(images[i:i + b], cfg["resolution"])
        grids = score_maps(patch_tokens(model, imgs), u) > alpha
        [mask_to_png(upsample_nearest(g, cfg["resolution"])) for g in grids]
        if t_first is None:
            t_first = time.perf_counter()
    return _rates(len(images), b, t0, t_first)


def run(quick: bool = False) -> None:
    import ray

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    n_views, n_masks = (48, 1920) if quick else (192, 7680)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        args = _pipeline(tmp, n_masks)
        cfg = yaml.safe_load(Path(args[0]).read_text())
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            _stage("curate", args)
            masks = _stage("masks", args)
            m = masks["metrics"]
            loop = _masks_loop(args[2], cfg["masks"])
            print(f"# masks: {n_masks} images at {cfg['masks']['resolution']} px, batch {cfg['masks']['batch_size']}: "
                  f"stage {m['images_per_s']:.1f} images/s end to end (first block after {m['first_block_s']:.1f} s), "
                  f"{m['warm_images_per_s']:.1f} after it; plain loop {loop['images_per_s']:.1f} end to end (first batch "
                  f"after {loop['first_s']:.1f} s), {loop['warm_images_per_s']:.1f} after it")
            report("masks.stage_over_loop", m["warm_images_per_s"] / loop["warm_images_per_s"], ">=1.0")
            print(f"# masks.end_to_end_over_loop {m['images_per_s'] / loop['images_per_s']:.3f} (start-up included on "
                  f"both sides: the stage's actors start processes and import torch/timm, the loop runs in this one)")
            # The views stage on the first n_views images only: diffusion is the slow part.
            (tmp / "v").mkdir()
            args_v = _pipeline(tmp / "v", n_views)
            _stage("curate", args_v)
            _stage("masks", args_v)
            views = _stage("views", args_v)
            m = views["metrics"]
            loop = _views_loop(args_v[2], cfg["views"])
            print(f"# views: {n_views} variations at {cfg['views']['size']} px, {cfg['views']['steps']} steps, batch "
                  f"{cfg['views']['batch_size']}: stage {m['images_per_s']:.2f} images/s end to end (first batch after "
                  f"{m['first_block_s']:.1f} s), {m['warm_images_per_s']:.2f} after it; plain loop "
                  f"{loop['images_per_s']:.2f} end to end (first batch after {loop['first_s']:.1f} s), "
                  f"{loop['warm_images_per_s']:.2f} after it")
            report("views.stage_over_loop", m["warm_images_per_s"] / loop["warm_images_per_s"], ">=1.0")
            print(f"# views.end_to_end_over_loop {m['images_per_s'] / loop['images_per_s']:.3f}")
        finally:
            ray.shutdown()
