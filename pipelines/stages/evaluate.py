"""evaluate: kNN and linear probe on frozen features of the labelled images, in a Ray task.

The randomly initialised backbone of the same architecture (same seed) is evaluated beside the
pretrained one, so every report says whether pretraining helped.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa


def _evaluate_task(encoder_bytes: bytes, enc_cfg: dict, images, labels, cfg: dict, seed: int) -> dict:
    import torch

    from tasks.evaluate.classification import evaluate_encoder
    from tasks.models.backbone import build_backbone

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = {}
    kw = dict(k=cfg["knn_k"], temperature=cfg["knn_temperature"], test_fraction=cfg["test_fraction"],
              linear_epochs=cfg["linear_epochs"], linear_lr=cfg["linear_lr"], seed=cfg["seed"],
              batch_size=cfg["batch_size"])
    torch.manual_seed(seed)
    enc, _ = build_backbone(enc_cfg["backbone"], cifar_stem=enc_cfg["cifar_stem"], **enc_cfg["backbone_kwargs"])
    if cfg["baseline_random"]:
        out["random"] = evaluate_encoder(enc, images, labels, **kw)  # the init pretraining started from
    enc.load_state_dict(torch.load(io.BytesIO(encoder_bytes), map_location="cpu", weights_only=True))
    out["pretrained"] = evaluate_encoder(enc, images, labels, **kw)
    return out


def run(ctx) -> dict:
    import ray

    from tasks.data.images import batch_to_array

    cfg = ctx.cfg
    cur = ctx.storage.read_table("curate", columns=["id", "image", "label"])
    cur = cur.filter(pa.compute.not_equal(cur["label"], ""))
    if cur.num_rows == 0:
        ctx.log("no labelled images: nothing to evaluate")
        ctx.writer.write_table("data", pa.table({"encoder": pa.array([], pa.string())}), sort_by=None)
        return {"metrics": {}, "counts": {"labelled": 0}}
    classes = sorted(set(cur["label"].to_pylist()))
    labels = np.array([classes.index(x) for x in cur["label"].to_pylist()])
    images = batch_to_array(cur["image"].to_pylist(), cfg.resolution)
    pre = ctx.upstream["pretrain"]
    enc_cfg = pre["encoder"]
    blob = ctx.storage.read_file("pretrain", enc_cfg["file"])
    from tasks.config import to_dict

    res = ray.get(ray.remote(num_cpus=1)(_evaluate_task).remote(blob, enc_cfg, images, labels, to_dict(cfg),
                                                                pre["config"]["seed"]))
    rows = [{"encoder": name, **vals} for name, vals in res.items()]
    ctx.writer.write_table("data", pa.Table.from_pylist(rows), sort_by="encoder")
    report = {"classes": classes, "results": res, "pretrain_run_id": pre.get("mlflow_run_id", ""),
              "pretrain_content_hash": pre["content_hash"]}
    ctx.writer.write_file("report.json", json.dumps(report, indent=2).encode())
    ctx.tracker.log_dict(report, "report.json")
    metrics = {"knn_top1": res["pretrained"]["knn_top1"], "linear_top1": res["pretrained"]["linear_top1"]}
    if "random" in res:
        metrics.update(knn_top1_random=res["random"]["knn_top1"], linear_top1_random=res["random"]["linear_top1"])
        from pipelines.plots import bar_figure

        ctx.tracker.log_figure(bar_figure({"random init": res["random"]["knn_top1"],
                                           "pretrained": res["pretrained"]["knn_top1"]}, "kNN top-1"),
                               "knn_top1.png")
    ctx.tracker.set_tags({"sslforge.pretrain_run_id": pre.get("mlflow_run_id", "")})
    ctx.log("kNN top-1: " + ", ".join(f"{k}={v['knn_top1']:.3f}" for k, v in res.items()))
    return {"metrics": metrics, "counts": {"labelled": cur.num_rows, "classes": len(classes)}}
