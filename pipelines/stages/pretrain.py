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
import queue
import tempfile
import threading
import time

STATE = "state.pt"


def _load_images(paths: list[str], resolution: int):
    import numpy as np
    import pyarrow.parquet as pq

    from tasks.data.images import batch_to_array

    ids, imgs = [], []
    for p in paths:
        t = pq.read_table(p, columns=["id", "image"])
        ids += t["id"].to_pylist()
        imgs.append(batch_to_array(t["image"].to_pylist(), resolution))
    return ids, np.concatenate(imgs) if imgs else np.zeros((0, resolution, resolution, 3), np.uint8)


class ViewFeeder:
    """Background thread: per step, the worker's batch indices -> augmented views (prefetch 2)."""

    def __init__(self, images, per_worker: int, rank: int, world: int, seed: int, start_step: int, max_steps: int,
                 augments: list):
        import numpy as np

        from tasks.data.transforms import MultiView

        self.np = np
        self.images, self.per, self.rank, self.world, self.seed = images, per_worker, rank, world, seed
        self.steps_per_epoch = max(1, len(images) // (per_worker * world))
        self.views = MultiView(augments, seed=seed * 1000 + rank + 7919 * start_step)
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.t = threading.Thread(target=self._work, args=(start_step, max_steps), daemon=True)
        self.t.start()

    def indices(self, step: int):
        epoch, i = divmod(step, self.steps_per_epoch)
        perm = self.np.random.default_rng(self.seed + epoch).permutation(len(self.images))
        glob = perm[i * self.per * self.world:(i + 1) * self.per * self.world]
        return glob[self.rank::self.world]  # each rank its slice of the global batch: global semantics

    def _work(self, start: int, stop: int) -> None:
        # (no torch.set_num_threads here: it is process-wide and would throttle the training step)
        for step in range(start, stop):
            idx = self.indices(step)
            self.q.put(self.views([self.images[j] for j in idx]))

    def next(self):
        t0 = time.perf_counter()
        v = self.q.get()
        return v, time.perf_counter() - t0


def train_loop(config: dict) -> None:
    import mlflow
    import ray.train
    import ray.train.torch
    import torch
    from mlflow.entities import Metric

    from tasks.data.transforms import with_overrides
    from tasks.models.backbone import build_backbone
    from tasks.pretrain.loop import build_optimizer, train_step, unwrap
    from tasks.pretrain.methods import get_method
    from tasks.pretrain.schedules import scaled_lr, warmup_cosine_lr

    c = config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(c["threads_per_worker"])
    torch.manual_seed(c["seed"])
    backbone, dim = build_backbone(c["backbone"], cifar_stem=c["cifar_stem"], **c["backbone_kwargs"])
    method = get_method(c["method"])(backbone, dim, **c["method_kwargs"])
    model = ray.train.torch.prepare_model(method, parallel_strategy_kwargs={"find_unused_parameters": False, "broadcast_buffers": False}) \
        if world > 1 else method
    lr = scaled_lr(c["lr"], c["batch_size"])
    opt = build_optimizer(model, "sgd", lr, c["momentum"], c["weight_decay"])
    _, images = _load_images(c["paths"], c["resolution"])
    per = c["batch_size"] // world
    steps_per_epoch = max(1, len(images) // c["batch_size"])
    max_steps = c["max_steps"] or c["epochs"] * steps_per_epoch
    start, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, STATE), map_location="cpu", weights_only=False)
        unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
        if rank == 0:
            print(f"[pretrain] resumed from step {start}", flush=True)
    client = None
    if rank == 0 and c.get("tracking_uri"):
        mlflow.set_tracking_uri(c["tracking_uri"])
        client = mlflow.MlflowClient()
    augments = with_overrides(unwrap(model).view_augments(c["resolution"]), c["augment"])
    feeder = ViewFeeder(images, per, rank, world, c["seed"], start, max_steps, augments)
    t_start = time.perf_counter()
    for step in range(start, max_steps):
        views, wait = feeder.next()
        t0 = time.perf_counter()
        m = train_step(model, opt, views, step, max_steps,
                       warmup_cosine_lr(step, max_steps, lr, c["warmup_steps"]))
        m.update(step_time=time.perf_counter() - t0, data_wait=wait, epoch=step / steps_per_epoch)
        last = step + 1 == max_steps
        if rank == 0:
            history.append({"step": step, **{k: float(v) for k, v in m.items()}})
            if step % c["log_every"] == 0 or last:
                print(f"[pretrain] step {step + 1}/{max_steps} loss {m['loss']:.4f} lr {m['lr']:.4f} "
                      f"{m['step_time']:.2f}s/step (waited {m['data_wait']:.2f}s for data)", flush=True)
            if client and (step % c["log_every"] == 0 or last):
                ts = int(time.time() * 1000)
                client.log_batch(c["run_id"], metrics=[Metric(k, float(v), ts, step) for k, v in m.items()])
        if (step + 1) % c["checkpoint_every"] == 0 or last:
            with tempfile.TemporaryDirectory() as d:
                checkpoint = None
                if rank == 0:
                    torch.save({"model": unwrap(model).state_dict(), "optimizer": opt.state_dict(), "step": step + 1,
                                "history": history, "encoder": unwrap(model).encoder().state_dict()},
                               os.path.join(d, STATE))
                    checkpoint = ray.train.Checkpoint.from_directory(d)
                ray.train.report({"step": step + 1, "loss": float(m["loss"])}, checkpoint=checkpoint)
    if rank == 0:
        print(f"[pretrain] {max_steps - start} steps in {time.perf_counter() - t_start:.1f}s", flush=True)


def run(ctx) -> dict:
    import shutil

    import pyarrow as pa
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tasks.config import to_dict

    cfg = ctx.cfg
    c = to_dict(cfg)
    c.update(paths=ctx.storage.table_paths("curate"), tracking_uri=ctx.tracker.uri, run_id=ctx.run_id)
    name = f"pretrain-{ctx.cache_key[:16]}"
    work = ctx.work_uri
    if ctx.forced and ctx.storage.is_local and os.path.isdir(os.path.join(work, name)):
        shutil.rmtree(os.path.join(work, name))  # --force: train again instead of resuming a finished run
    trainer = TorchTrainer(
        train_loop, train_loop_config=c,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=False,
                                     resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=name, storage_path=work, failure_config=FailureConfig(max_failures=3),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE), map_location="cpu", weights_only=False)
    buf = io.BytesIO()
    torch.save(state["encoder"], buf)
    ctx.writer.write_file("encoder.pt", buf.getvalue())
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
    return {"metrics": metrics, "encoder": {"backbone": cfg.backbone, "cifar_stem": cfg.cifar_stem,
                                            "backbone_kwargs": cfg.backbone_kwargs, "file": "encoder.pt"}}


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
    ctx.tracker.log_dict({"history": hist[-200:]}, "history_tail.json")
