"""views: per image, the noise level from its foreground ratio, and with ``generator: unclip`` GenView's image
variations from a diffusers pipeline on a Ray Data actor pool (METHODS.md 1.2).

* The pipeline is loaded once per actor; one actor per GPU (fp16) when the cluster has GPUs, else CPU actors.
* Rows are sorted by noise level before batching, so nearly every batch is one pipeline call.
* Resumable: each finished view is appended to a cache under ``<storage>/.cache/views/<settings key>/``
  (one Parquet part per flush, written under a temporary name then renamed). A rerun -- after a crash,
  or after an upstream change that moved some images to another noise level -- generates only the views
  whose (image bytes, noise level, view index) are not in the cache.
* A failed image is retried (``retries``) and then quarantined with its reason; the stage goes on.
* Each variation gets its own foreground mask from the masks stage's PCA direction, so GenView's quality
  weighting can pool a generated view's foreground as it does an original's.

With ``generator: none`` both views are augmentations of the original image; the table still records the
noise level each image would get.
"""
from __future__ import annotations

import json
import os
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.store import sha256_bytes, stable_hash
from tasks.views.noise import noise_level

CACHE_COLUMNS = ["id", "view_index", "source_sha", "noise_level", "seed", "view", "model", "revision", "weights"]
FAIL_IDS_ENV = "SSLFORGE_TEST_FAIL_VIEW_IDS"  # comma-separated ids whose generation fails (tests only)


def run(ctx) -> dict:
    cfg = ctx.cfg
    masks = ctx.storage.read_table("masks", columns=["id", "fg_ratio", "mask"])
    ids = masks["id"].to_pylist()
    levels = [noise_level(r, cfg.noise_bins, cfg.noise_levels) for r in masks["fg_ratio"].to_pylist()]
    columns = {"id": masks["id"], "fg_ratio": masks["fg_ratio"], "noise_level": pa.array(levels, pa.int32()),
               # the foreground mask travels with the views: GenView's quality weighting crops it with each
               # view's geometry in the pretrain stage
               "mask": masks["mask"]}
    hist = {str(lv): levels.count(lv) for lv in cfg.noise_levels}
    counts = {"images": len(ids), "generated": 0, "reused": 0, "quarantined": 0}
    metrics = {f"noise_{k}": v for k, v in hist.items()}
    per_id: dict[str, list[dict]] = {}
    quarantine = []
    if cfg.generator != "none":
        curate = ctx.storage.read_table("curate", columns=["id", "image"])
        images = dict(zip(curate["id"].to_pylist(), curate["image"].to_pylist()))
        rows, quarantine, gen_stats = _generate(ctx, ids, levels, images)
        counts.update(gen_stats["counts"])
        metrics.update(gen_stats["metrics"])
        view_masks = _variation_masks(ctx, rows)
        for r, m in zip(rows, view_masks):
            per_id.setdefault(r["id"], []).append({**r, "mask": m})
        _log_grid(ctx, ids, levels, masks, images, per_id)
    lists = [sorted(per_id.get(i, []), key=lambda r: r["view_index"]) for i in ids]
    columns.update({
        "generated": pa.array([bool(v) for v in lists]),
        "view_images": pa.array([[r["view"] for r in v] for v in lists], pa.list_(pa.binary())),
        "view_masks": pa.array([[r["mask"] for r in v] for v in lists], pa.list_(pa.binary())),
        "view_seeds": pa.array([[r["seed"] for r in v] for v in lists], pa.list_(pa.int64())),
        "view_model": pa.array([v[0]["model"] if v else "" for v in lists]),
        "view_revision": pa.array([v[0]["revision"] if v else "" for v in lists]),
        "view_weights": pa.array([v[0]["weights"] if v else "" for v in lists]),
    })
    ctx.writer.write_table("data", pa.table(columns))
    # How pretraining pairs views is part of this stage's output (and content hash): change it and the
    # pretrain stage reruns, without regenerating anything.
    ctx.writer.write_file("pairing.json", json.dumps({"prob_generated": cfg.prob_generated}).encode())
    ctx.writer.write_table("quarantine", pa.Table.from_pylist(
        quarantine, schema=pa.schema([("id", pa.string()), ("view_index", pa.int32()), ("reason", pa.string())])))
    return {"counts": counts, "noise_histogram": hist, "metrics": metrics}


# ---------------------------------------------------------------------------------------------- generation


def _settings(cfg) -> dict:
    return {"guidance_scale": cfg.guidance_scale, "steps": cfg.steps, "size": cfg.size, "prompt": cfg.prompt}


class _ViewCache:
    """Finished views of one generation setting, as Parquet parts under the storage's ``.cache``."""

    def __init__(self, storage, key: str):
        self.fs, self.dir = storage.fs, storage.path(".cache", "views", key)
        self.fs.create_dir(self.dir, recursive=True)
        self.pending: list[dict] = []

    def load(self) -> dict[tuple, dict]:
        from pyarrow import fs as pafs

        done = {}
        for info in self.fs.get_file_info(pafs.FileSelector(self.dir)):
            if info.base_name.startswith("part-") and info.base_name.endswith(".parquet"):
                for r in pq.read_table(info.path, filesystem=self.fs).to_pylist():
                    done[(r["id"], r["view_index"], r["source_sha"], r["noise_level"])] = r
        return done

    def add(self, rows: list[dict]) -> None:
        self.pending.extend(rows)

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = f"{self.dir}/.tmp-{name}"
        pq.write_table(pa.Table.from_pylist(self.pending), tmp, filesystem=self.fs)
        self.fs.move(tmp, f"{self.dir}/{name}")
        self.pending = []


def _generate(ctx, ids: list[str], levels: list[int], images: dict[str, bytes]):
    """Every (image, view index) -> a cached or newly generated view; failures -> quarantine rows."""
    import ray

    from pipelines.ray_runtime import actor_pool_size, in_blocks, timed_blocks
    from tasks.views.generate import VariationGenerator

    cfg = ctx.cfg
    key = stable_hash({"model": cfg.model, "revision": cfg.revision, "settings": _settings(cfg), "seed": cfg.seed})[:16]
    cache = _ViewCache(ctx.storage, key)
    done = cache.load()
    wanted, rows = [], []
    for i, lv in zip(ids, levels):
        sha = sha256_bytes(images[i])
        for k in range(cfg.views_per_image):
            hit = done.get((i, k, sha, lv))
            if hit:
                rows.append(hit)
            else:
                wanted.append({"id": i, "view_index": k, "noise_level": lv, "source_sha": sha})
    reused = len(rows)
    ctx.log(f"{reused} views reused from {cache.dir}, {len(wanted)} to generate with {cfg.model} "
            f"({cfg.steps} steps, guidance {cfg.guidance_scale}, {cfg.size} px)")
    quarantine, t0, made, timing = [], time.perf_counter(), 0, {}
    if wanted:
        wanted.sort(key=lambda r: (r["noise_level"], r["id"], r["view_index"]))  # batches share a noise level
        sha_of = {(r["id"], r["view_index"]): r["source_sha"] for r in wanted}
        table = pa.Table.from_pylist([{**r, "image": images[r["id"]]} for r in wanted]).drop(["source_sha"])
        gpus = 0 if cfg.use_gpu == "no" else int(ray.cluster_resources().get("GPU", 0))
        if cfg.use_gpu == "yes" and not gpus:
            raise RuntimeError("views.use_gpu: yes, but the Ray cluster has no GPU")
        fail_ids = tuple(x for x in os.environ.get(FAIL_IDS_ENV, "").split(",") if x)
        actor = dict(model=cfg.model, settings=_settings(cfg), seed=cfg.seed, device="cuda" if gpus else "cpu",
                     threads=0 if gpus else 1, retries=cfg.retries, revision=cfg.revision or None, fail_ids=fail_ids)
        resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        out = ray.data.from_arrow(in_blocks(table, cfg.batch_size)).map_batches(
            VariationGenerator, fn_constructor_kwargs=actor, batch_size=cfg.batch_size,
            concurrency=gpus or actor_pool_size(reserve=0), **resources)
        last_log = t0
        for batch in timed_blocks(out, timing, t0):
            for r in batch.to_pylist():
                if r["error"]:
                    quarantine.append({"id": r["id"], "view_index": r["view_index"], "reason": r["error"]})
                    continue
                row = {c: r[c] for c in CACHE_COLUMNS if c != "source_sha"}
                row["source_sha"] = sha_of[(r["id"], r["view_index"])]
                cache.add([row])
                rows.append(row)
                made += 1
            if len(cache.pending) >= 32 or time.perf_counter() - last_log > 30:
                cache.flush()  # what is flushed survives a crash: a rerun starts after it
                last_log = time.perf_counter()
                ctx.log(f"generated {made + len(quarantine)}/{len(wanted)} "
                        f"({made / max(1e-9, last_log - t0):.2f} images/s)")
        cache.flush()
    seconds = time.perf_counter() - t0
    warm = {"warm_images_per_s": timing["warm_images_per_s"], "first_block_s": timing["first_s"]} \
        if "warm_images_per_s" in timing else {}
    if quarantine:
        reasons = {}
        for q in quarantine:
            reasons[q["reason"]] = reasons.get(q["reason"], 0) + 1
        ctx.log(f"quarantined {len(quarantine)} view(s): " + json.dumps(reasons)[:500])
    ctx.log(f"{made} views generated in {seconds:.1f}s, {reused} reused, {len(quarantine)} quarantined")
    stats = {"counts": {"generated": made, "reused": reused, "quarantined": len(quarantine)},
             "metrics": {"generated": made, "reused": reused, "quarantined": len(quarantine),
                         "images_per_s": made / seconds if made and seconds > 0 else 0.0, **warm}}
    return rows, quarantine, stats


def _variation_masks(ctx, rows: list[dict]) -> list[bytes]:
    """Foreground mask of every generated view, with the masks stage's direction and threshold."""
    import io

    import ray

    from pipelines.ray_runtime import actor_pool_size, in_blocks
    from tasks.views.masks import MaskPredictor

    if not rows:
        return []
    mcfg = ctx.pipeline.masks
    u = np.load(io.BytesIO(ctx.storage.read_file("masks", "pca_direction.npy")))
    alpha = json.loads(ctx.storage.read_file("masks", "pca.json"))["alpha"]
    keys = [f"{r['id']}#{r['view_index']}" for r in rows]
    table = pa.table({"id": keys, "image": pa.array([r["view"] for r in rows], pa.binary())})
    pool = actor_pool_size(reserve=0)
    ds = ray.data.from_arrow(in_blocks(table, mcfg.batch_size, actors=pool))
    out = ds.map_batches(MaskPredictor, fn_constructor_kwargs=dict(
        encoder=mcfg.encoder, direction=u, alpha=alpha, resolution=mcfg.resolution, checkpoint=mcfg.checkpoint,
        encoder_kwargs=mcfg.encoder_kwargs, seed=mcfg.seed), concurrency=pool,
        batch_size=mcfg.batch_size, num_cpus=1)
    got = {}
    for ref in out.to_arrow_refs():
        t = ray.get(ref)
        got.update(zip(t["id"].to_pylist(), t["mask"].to_pylist()))
    return [got[k] for k in keys]


def _log_grid(ctx, ids, levels, masks, images, per_id, per_level: int = 2) -> None:
    """original | mask | variation, a few images per noise level (what a person checks first)."""
    from pipelines.plots import views_grid_figure
    from tasks.data.images import png_to_mask, to_square

    mask_of = dict(zip(ids, masks["mask"].to_pylist()))
    ratio_of = dict(zip(ids, masks["fg_ratio"].to_pylist()))
    picked: dict[int, list[str]] = {}
    for i, lv in zip(ids, levels):
        if per_id.get(i) and len(picked.setdefault(lv, [])) < per_level:
            picked[lv].append(i)
    rows = []
    side = ctx.pipeline.masks.resolution
    for lv in sorted(picked):
        for i in picked[lv]:
            rows.append((to_square(images[i], side), png_to_mask(mask_of[i]), to_square(per_id[i][0]["view"], side),
                         f"noise {lv}, fg {ratio_of[i]:.2f}"))
    if rows:
        ctx.tracker.log_figure(views_grid_figure(rows), "views_grid.png")
