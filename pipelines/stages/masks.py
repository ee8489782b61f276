"""masks: fit the PCA direction on a sample (Ray task), then predict masks on a Ray Data actor pool."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa

from pipelines import sources
from pipelines.ray_runtime import actor_pool_size, collect_timed, in_blocks
from tasks.views.masks import MaskPredictor


def _fit_task(images: list, cfg) -> tuple:
    import torch

    from tasks.data.images import batch_to_array
    from tasks.views.masks import build_vit, fit_direction, patch_tokens

    torch.manual_seed(cfg.seed)
    model = build_vit(cfg.encoder, cfg.checkpoint, cfg.resolution, **cfg.encoder_kwargs)
    tokens = torch.cat([patch_tokens(model, batch_to_array(images[i:i + 64], cfg.resolution))
                        for i in range(0, len(images), 64)])
    return fit_direction(tokens, cfg.foreground_fraction)


def _gt_folder(ctx) -> str:
    cfg, cur = ctx.cfg, ctx.pipeline.curate
    if cfg.gt_masks == "builtin" or (not cfg.gt_masks and sources.is_builtin(cur.input)):
        return sources.builtin_masks_folder(ctx.storage, cur.sample_size, cur.sample_resolution)
    return cfg.gt_masks


def run(ctx) -> dict:
    import ray

    from tasks.data.images import png_to_mask, to_square
    from tasks.views.masks import iou

    cfg = ctx.cfg
    curate = ctx.storage.read_table("curate", columns=["id", "image", "relpath"])
    rng = np.random.default_rng(cfg.seed)
    idx = np.sort(rng.choice(curate.num_rows, size=min(cfg.pca_sample, curate.num_rows), replace=False))
    sample = curate.take(pa.array(idx))["image"].to_pylist()
    u, alpha, stats = ray.get(ray.remote(_fit_task).remote(sample, cfg))
    ctx.log(f"PCA direction fitted on {len(sample)} images: alpha={alpha:.4f}, {stats}")
    pool = actor_pool_size(reserve=0)  # in-memory input: no read task to leave a CPU for
    ds = ray.data.from_arrow(in_blocks(curate.select(["id", "image"]), cfg.batch_size, actors=pool))
    out = ds.map_batches(MaskPredictor, fn_constructor_kwargs=dict(
        encoder=cfg.encoder, direction=u, alpha=alpha, resolution=cfg.resolution, checkpoint=cfg.checkpoint,
        encoder_kwargs=cfg.encoder_kwargs, seed=cfg.seed), concurrency=pool, batch_size=cfg.batch_size, num_cpus=1)
    table, timing = collect_timed(out)
    table = table.sort_by("id")
    images_per_s = table.num_rows / max(1e-9, timing["seconds"])
    warm = timing.get("warm_images_per_s")
    ctx.log(f"{table.num_rows} masks on {pool} actor(s): {images_per_s:.1f} images/s end to end, first block after "
            f"{timing['first_s']:.1f} s (actor start, encoder load)" + (f", {warm:.1f} images/s after it" if warm else ""))
    ctx.writer.write_table("data", table)
    buf = io.BytesIO()
    np.save(buf, u)
    ctx.writer.write_file("pca_direction.npy", buf.getvalue())
    ctx.writer.write_file("pca.json", json.dumps({"alpha": alpha, **stats}).encode())
    metrics = {"fg_ratio_mean": float(np.mean(table["fg_ratio"].to_numpy())), "alpha": alpha,
               "explained_variance": stats["explained_variance"], "images_per_s": images_per_s,
               "first_block_s": timing["first_s"], **({"warm_images_per_s": warm} if warm else {})}
    gt = _gt_folder(ctx)
    gt_masks: dict = {}
    if gt and os.path.isdir(gt):
        rel = dict(zip(curate["id"].to_pylist(), curate["relpath"].to_pylist()))
        scores = []
        for i, m in zip(table["id"].to_pylist(), table["mask"].to_pylist()):
            path = os.path.join(gt, os.path.splitext(rel[i])[0] + ".png")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    gt_masks[i] = to_square(f.read(), cfg.resolution)[..., 0] > 127
                scores.append(iou(png_to_mask(m), gt_masks[i]))
        if scores:
            metrics["gt_iou"] = float(np.mean(scores))
            ctx.log(f"mean IoU against ground-truth masks ({len(scores)} images): {metrics['gt_iou']:.3f}")
    _log_grid(ctx, curate, table, gt_masks)
    return {"counts": {"images": table.num_rows}, "metrics": metrics}


def _log_grid(ctx, curate, table, gt_masks: dict, n: int = 8) -> None:
    from pipelines.plots import mask_grid_figure
    from tasks.data.images import png_to_mask, to_square

    images = dict(zip(curate["id"].to_pylist(), curate["image"].to_pylist()))
    ids = table["id"].to_pylist()[:n]
    masks = table["mask"].to_pylist()[:n]
    fig = mask_grid_figure([to_square(images[i], ctx.cfg.resolution) for i in ids], [png_to_mask(m) for m in masks],
                           [gt_masks[i] for i in ids] if all(i in gt_masks for i in ids) else None)
    ctx.tracker.log_figure(fig, "masks_grid.png")
