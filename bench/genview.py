"""GenView's two Ray Data stages vs a plain sequential loop over the same model, same batch size, same machine.

* ``views.stage_over_loop``: images/s of the views stage's generation (the tiny random Stable unCLIP
  pipeline, 20 denoising steps, guidance 10: the real call path; from the stage's own ``images_per_s``,
  which counts from building the Ray Data pipeline -- actor start and model load included -- to the last
  view) over a loop that loads the same pipeline once and calls it batch after batch with torch's default
  threads (load included too).
* ``masks.stage_over_loop``: the masks stage's prediction (tiny random ViT: patch tokens, PCA score,
  threshold, PNG) over a loop doing the same per batch.

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


def _views_loop(storage: str, cfg: dict) -> float:
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
    b = cfg["batch_size"]
    for i in range(0, len(views), b):
        chunk = views[i:i + b]
        for level in sorted({r["noise_level"] for r in chunk}):  # one call per noise level, as the stage
            rows = [r for r in chunk if r["noise_level"] == level]
            out = generate(pipe, [to_square(images[r["id"]], settings.size) for r in rows], level,
                           [view_seed(r["id"]) for r in rows], settings)
            [encode_jpeg(v) for v in out]
    return len(views) / (time.perf_counter() - t0)


def _masks_loop(storage: str, cfg: dict) -> float:
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
    for i in range(0, len(images), cfg["batch_size"]):
        imgs = batch_to_array(images[i:i + cfg["batch_size"]], cfg["resolution"])
        grids = score_maps(patch_tokens(model, imgs), u) > alpha
        [mask_to_png(upsample_nearest(g, cfg["resolution"])) for g in grids]
    return len(images) / (time.perf_counter() - t0)


def run(quick: bool = False) -> None:
    import ray

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    n_views, n_masks = (48, 480) if quick else (192, 1920)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        args = _pipeline(tmp, n_masks)
        cfg = yaml.safe_load(Path(args[0]).read_text())
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            _stage("curate", args)
            masks = _stage("masks", args)
            stage_ips = masks["metrics"]["images_per_s"]
            loop_ips = _masks_loop(args[2], cfg["masks"])
            print(f"# masks: {n_masks} images at {cfg['masks']['resolution']} px, batch {cfg['masks']['batch_size']}: "
                  f"stage {stage_ips:.1f} images/s, plain loop {loop_ips:.1f} images/s")
            report("masks.stage_over_loop", stage_ips / loop_ips, ">=1.0")
            # The views stage on the first n_views images only: diffusion is the slow part.
            (tmp / "v").mkdir()
            args_v = _pipeline(tmp / "v", n_views)
            _stage("curate", args_v)
            _stage("masks", args_v)
            views = _stage("views", args_v)
            stage_ips = views["metrics"]["images_per_s"]
            loop_ips = _views_loop(args_v[2], cfg["views"])
            print(f"# views: {n_views} variations at {cfg['views']['size']} px, {cfg['views']['steps']} steps, batch "
                  f"{cfg['views']['batch_size']}: stage {stage_ips:.2f} images/s, plain loop {loop_ips:.2f} images/s")
            report("views.stage_over_loop", stage_ips / loop_ips, ">=1.0")
        finally:
            ray.shutdown()
