"""pretrain: Ray Train ``TorchTrainer`` (DDP, gloo on CPU), any method from ``METHODS``, resumable.

Each worker reads its share of the curated Parquet shards itself (a worker-side loader: Ray Data tasks
would compete with the training workers for the same CPUs on a small cluster) and builds the views in a
background thread, so augmentation overlaps the step; the time the step waits for data is logged.
Checkpoints go through ``ray.train.report`` every ``checkpoint_every`` steps; a rerun with the same
cache key, or Ray Train's own restart after a worker failure, resumes from the latest one.
"""
from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
import time

STATE = "state.pt"


def _say(message: str) -> None:
    """One line on the worker's real stdout (Ray forwards it to the driver). Ray Train patches ``print`` to
    also go through its logger, which printed every line twice."""
    print(message, file=sys.__stdout__, flush=True)


def monitor_split(labels: list[str], size: int, seed: int):
    """The online kNN monitor's labelled images: (indices, integer labels, bank part, held-out part), or
    None without at least two labelled classes. At most ``size`` images, drawn with a fixed seed; 30 % of
    each class is held out (the evaluate stage's stratified split)."""
    import numpy as np

    from tasks.evaluate.classification import stratified_split

    idx = np.array([i for i, x in enumerate(labels) if x])
    if len(idx) == 0 or len({labels[i] for i in idx}) < 2:
        return None
    if len(idx) > size:
        idx = np.sort(np.random.default_rng(seed).choice(idx, size, replace=False))
    classes = sorted({labels[i] for i in idx})
    y = np.array([classes.index(labels[i]) for i in idx])
    bank, held_out = stratified_split(y, 0.3, seed)
    return idx, y, bank, held_out


def _resume_state(latest_file: str, rank: int, world: int) -> dict | None:
    """The newest saved state: Ray Train's latest registered checkpoint or our own ``latest_file``.

    Ray Train V2 registers a reported checkpoint only when its controller next polls the workers (every
    2 s), so a worker killed just after ``report`` can lose it; rank 0 therefore also writes every
    checkpoint atomically to ``latest_file`` (when the run directory is a local/shared path), which keeps
    the steps lost to a failure within one checkpoint interval. Rank 0 chooses and broadcasts the state,
    so every rank resumes from the same step even where only rank 0 can read the file.
    """
    import ray.train
    import torch
    import torch.distributed as dist

    state = None
    if rank == 0:
        ckpt = ray.train.get_checkpoint()
        if ckpt:
            with ckpt.as_directory() as d:
                state = torch.load(os.path.join(d, STATE), map_location="cpu", weights_only=False)
        if latest_file and os.path.exists(latest_file):
            own = torch.load(latest_file, map_location="cpu", weights_only=False)
            if state is None or own["step"] > state["step"]:
                state = own
    if world > 1 and dist.is_initialized():
        box = [state]
        dist.broadcast_object_list(box, src=0)
        state = box[0]
    return state


def train_loop(config: dict) -> None:
    import mlflow
    import ray.train
    import ray.train.torch
    import torch
    from mlflow.entities import Metric

    from tasks.data.transforms import with_overrides
    from tasks.evaluate.classification import knn_monitor
    from tasks.models.backbone import build_backbone
    from tasks.pretrain.feeder import ViewFeeder, load_clusters, load_images, load_masks, load_variations
    from tasks.pretrain.loop import autocast_dtype, build_optimizer, train_step
    from tasks.pretrain.methods import get_method
    from tasks.pretrain.quality import QualityWeighter
    from tasks.pretrain.schedules import scaled_lr, warmup_cosine_lr
    from tasks.pretrain.syncbn import convert_sync_bn

    c = config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(c["threads_per_worker"])
    torch.manual_seed(c["seed"])
    device = ray.train.torch.get_device()
    ids, labels, images = load_images(c["paths"], c["resolution"])
    per = c["batch_size"] // world
    steps_per_epoch = max(1, len(images) // c["batch_size"])
    max_steps = c["max_steps"] or c["epochs"] * steps_per_epoch
    backbone, dim = build_backbone(c["backbone"], cifar_stem=c["cifar_stem"], checkpoint=c["init_checkpoint"],
                                   **c["backbone_kwargs"])
    method_cls = get_method(c["method"])
    image_inputs, method_kwargs = {}, dict(c["method_kwargs"])
    if getattr(method_cls, "needs_clusters", False):  # MoCE: gate on the cluster stage's centroids
        image_inputs["cluster"] = load_clusters(c["cluster_paths"], ids)
        method_kwargs["centroids"] = torch.tensor(c["centroids"], dtype=torch.float32)
    method = method_cls(backbone, dim, **method_kwargs)
    method.steps_per_epoch = steps_per_epoch
    sparse = getattr(method, "sparse_parameters", False)  # e.g. MoCE experts no local image routes to
    if c["sync_bn"] and world > 1:
        method = convert_sync_bn(method, gpu=device.type == "cuda")
    if c["channels_last"]:
        method = method.to(memory_format=torch.channels_last)  # 4-D weights only; others are unaffected
    if c["compile"]:
        method.compile()  # in place: state-dict keys stay the same
    model = ray.train.torch.prepare_model(method, parallel_strategy_kwargs={"find_unused_parameters": sparse, "broadcast_buffers": False}) \
        if world > 1 else method.to(device)
    # linear scaling by the true global batch: per-worker batch x workers on every node
    lr = scaled_lr(c["lr"], per * world)
    opt = build_optimizer(method, c["optimizer"], lr, c["momentum"], c["weight_decay"], betas=tuple(c["adamw_betas"]),
                          decay_norm_and_bias=c["decay_norm_and_bias"])
    autocast = autocast_dtype(c["precision"], device)
    if rank == 0:
        _say(f"[pretrain] {c['method']} on {world} worker(s), {device.type}, "
             f"{'bf16 autocast' if autocast is not None else 'fp32'}, {c['precision']} precision requested")
    start, history = 0, []
    state = _resume_state(c.get("latest_file", ""), rank, world)
    if state:
        method.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
        if rank == 0:
            _say(f"[pretrain] resumed from step {start}")
    monitor = monitor_split(labels, c["knn_monitor_size"], c["seed"]) if rank == 0 and c["knn_monitor_every"] > 0 else None
    client = None
    if rank == 0 and c.get("tracking_uri"):
        mlflow.set_tracking_uri(c["tracking_uri"])
        client = mlflow.MlflowClient()
    augments = with_overrides(method.view_augments(c["resolution"]), c["augment"])
    weighter, masks = None, None
    if c["quality_encoder"]:
        qenc, _ = build_backbone(c["quality_encoder"], checkpoint=c["quality_checkpoint"], **c["quality_encoder_kwargs"])
        weighter = QualityWeighter(qenc, c["quality_gamma"]).to(device)
        masks = load_masks(c["views_paths"], ids, c["resolution"])
    variations, variation_masks = (None, None)
    if c["prob_generated"] > 0:
        variations, variation_masks = load_variations(c["views_paths"], ids, c["resolution"], with_masks=masks is not None)
        if rank == 0 and variations is not None:
            _say(f"[pretrain] GenView pairing: {sum(len(v) > 0 for v in variations)}/{len(ids)} images have "
                 f"generated variations; one view of a pair comes from one with probability {c['prob_generated']}")
    feeder = ViewFeeder(images, per, rank, world, c["seed"], start, max_steps, augments,
                        channels_last=c["channels_last"], masks=masks, variations=variations,
                        variation_masks=variation_masks, prob_generated=c["prob_generated"], collate=method.collate,
                        image_inputs=image_inputs, overlap=getattr(method, "view_overlap", None),
                        geometry=getattr(method, "needs_geometry", False))
    t_start = time.perf_counter()
    for step in range(start, max_steps):
        (views, extra), wait = feeder.next()
        t0 = time.perf_counter()
        views = [v.to(device, non_blocking=True) for v in views]
        kw = {k: v.to(device, non_blocking=True) for k, v in extra.get("inputs", {}).items()}
        quality = {}
        if weighter is not None:
            m0, m1 = (x.to(device, non_blocking=True) for x in extra["masks"])
            kw["pair_weights"], q = weighter(views[0], views[1], m0, m1)
            quality = {"quality_q": float(q.mean()), "quality_w_max": float(kw["pair_weights"].max())}
        m = train_step(model, opt, views, step, max_steps, warmup_cosine_lr(step, max_steps, lr, c["warmup_steps"]),
                       clip_grad=c["clip_grad"], autocast_dtype=autocast, **kw)
        m.update(quality)
        m.update(step_time=time.perf_counter() - t0, data_wait=wait, epoch=step / steps_per_epoch)
        last = step + 1 == max_steps
        epoch_end = (step + 1) % steps_per_epoch == 0
        if monitor is not None and (last or (epoch_end and ((step + 1) // steps_per_epoch) % c["knn_monitor_every"] == 0)):
            idx, y, bank, held_out = monitor
            m["knn_monitor"] = knn_monitor(method.encoder(), images[idx], y, bank, held_out)
        if rank == 0:
            history.append({"step": step, **{k: float(v) for k, v in m.items()}})
            if step % c["log_every"] == 0 or last:
                _say(f"[pretrain] step {step + 1}/{max_steps} loss {m['loss']:.4f} lr {m['lr']:.4f} "
                     f"{m['step_time']:.2f}s/step (waited {m['data_wait']:.2f}s for data)")
            if "knn_monitor" in m:
                _say(f"[pretrain] step {step + 1} (epoch {(step + 1) / steps_per_epoch:.1f}): kNN monitor {m['knn_monitor']:.3f} "
                     f"(held-out labelled split)")
            if client and (step % c["log_every"] == 0 or last or "knn_monitor" in m):
                ts = int(time.time() * 1000)
                client.log_batch(c["run_id"], metrics=[Metric(k, float(v), ts, step) for k, v in m.items()])
        if (step + 1) % c["checkpoint_every"] == 0 or last:
            with tempfile.TemporaryDirectory() as d:
                checkpoint = None
                if rank == 0:
                    torch.save({"model": method.state_dict(), "optimizer": opt.state_dict(), "step": step + 1,
                                "history": history, "encoder": method.encoder().state_dict(),
                                "needs_clusters": bool(image_inputs)},
                               os.path.join(d, STATE))
                    if c.get("latest_file"):
                        tmp = c["latest_file"] + ".tmp"
                        shutil.copyfile(os.path.join(d, STATE), tmp)
                        os.replace(tmp, c["latest_file"])
                    checkpoint = ray.train.Checkpoint.from_directory(d)
                ray.train.report({"step": step + 1, "loss": float(m["loss"])}, checkpoint=checkpoint)
    if rank == 0:
        _say(f"[pretrain] {max_steps - start} steps in {time.perf_counter() - t_start:.1f}s")


def _prob_generated(storage) -> float:
    """The views stage's pairing choice (its output, so that a change reruns this stage)."""
    import json

    try:
        return float(json.loads(storage.read_file("views", "pairing.json"))["prob_generated"])
    except (FileNotFoundError, OSError, KeyError):
        return 0.0


def run(ctx) -> dict:
    import pyarrow as pa
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tasks.config import to_dict

    cfg = ctx.cfg
    c = to_dict(cfg)
    c.update(paths=ctx.storage.table_paths("curate"), views_paths=ctx.storage.table_paths("views"),
             tracking_uri=ctx.tracker.uri, run_id=ctx.run_id, prob_generated=_prob_generated(ctx.storage))
    from tasks.pretrain.methods import get_method

    if getattr(get_method(cfg.method), "needs_clusters", False):
        cent = ctx.storage.read_table("cluster", "centroids").sort_by("cluster")
        c.update(cluster_paths=ctx.storage.table_paths("cluster"), centroids=cent["centroid"].to_pylist())
    name = f"pretrain-{ctx.cache_key[:16]}"
    work = ctx.work_uri
    if ctx.storage.is_local:
        os.makedirs(os.path.join(work, name), exist_ok=True)
        c["latest_file"] = os.path.join(work, name, "latest-" + STATE)
    if ctx.forced and ctx.storage.is_local and os.path.isdir(os.path.join(work, name)):
        shutil.rmtree(os.path.join(work, name))  # --force: train again instead of resuming a finished run
    import ray

    use_gpu = cfg.use_gpu == "yes" or (cfg.use_gpu == "auto" and ray.cluster_resources().get("GPU", 0) >= cfg.num_workers)
    trainer = TorchTrainer(
        train_loop, train_loop_config=c,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=work, failure_config=FailureConfig(max_failures=3),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE), map_location="cpu", weights_only=False)
    buf = io.BytesIO()
    torch.save(state["encoder"], buf)
    ctx.writer.write_file("encoder.pt", buf.getvalue())
    if state.get("needs_clusters"):  # the whole MoCE (gates, every expert): the evaluate stage's expert search
        buf = io.BytesIO()
        torch.save(state["model"], buf)
        ctx.writer.write_file("method.pt", buf.getvalue())
    hist = state["history"]
    keys = sorted({k for h in hist for k in h})
    ctx.writer.write_table("history", pa.table({k: [h.get(k) for h in hist] for k in keys}), sort_by="step")
    ctx.writer.write_table("data", pa.table({"step": [state["step"]], "loss": [hist[-1]["loss"] if hist else float("nan")]}),
                           sort_by=None)
    _log_model_and_curve(ctx, state, hist)
    steps = state["step"]
    tail = hist[-10:] if hist else []
    metrics = {"steps": steps, "final_loss": sum(h["loss"] for h in tail) / max(1, len(tail))}
    if hist:
        metrics["step_time_mean"] = sum(h["step_time"] for h in hist) / len(hist)
        metrics["data_wait_mean"] = sum(h["data_wait"] for h in hist) / len(hist)
        knn = [h["knn_monitor"] for h in hist if "knn_monitor" in h]
        if knn:
            metrics["knn_monitor_final"] = knn[-1]
    encoder = {"backbone": cfg.backbone, "cifar_stem": cfg.cifar_stem, "backbone_kwargs": cfg.backbone_kwargs,
               "init_checkpoint": cfg.init_checkpoint, "file": "encoder.pt"}
    if state.get("needs_clusters"):
        encoder.update(method=cfg.method, method_kwargs=cfg.method_kwargs, method_file="method.pt")
    return {"metrics": metrics, "encoder": encoder}


def _log_model_and_curve(ctx, state, hist) -> None:
    from tasks.models.backbone import build_backbone

    cfg = ctx.cfg
    enc, _ = build_backbone(cfg.backbone, cifar_stem=cfg.cifar_stem, **cfg.backbone_kwargs)
    enc.load_state_dict(state["encoder"])
    try:
        import numpy as np

        example = np.zeros((1, 3, cfg.resolution, cfg.resolution), np.float32)
        info = ctx.tracker.log_encoder(enc.eval(), "sslforge-encoder" if cfg.register_model else None, example)
        ctx.tracker.set_tags({"sslforge.model_uri": info.get("model_uri", ""),
                              "sslforge.registered_model": info.get("registered", "")})
    except Exception as e:  # noqa: BLE001 - the encoder file in the stage output remains the source of truth
        ctx.log(f"warning: could not log the encoder as an MLflow model: {e}")
    if hist:
        from pipelines.plots import curve_figure

        ctx.tracker.log_figure(curve_figure(hist, "loss", f"{cfg.method} training loss"), "curves/loss.png")
        if any("knn_monitor" in h for h in hist):
            ctx.tracker.log_figure(curve_figure(hist, "knn_monitor", f"{cfg.method}: online kNN top-1 (held-out split)"),
                                   "curves/knn_monitor.png")
    ctx.tracker.log_dict({"history": hist[-200:]}, "history_tail.json")
