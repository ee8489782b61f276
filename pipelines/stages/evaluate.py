"""evaluate: kNN and linear probe on frozen features of the labelled images, in a Ray task.

The randomly initialised backbone of the same architecture (same seed) is evaluated beside the
pretrained one, so every report says whether pretraining helped.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa


_NO_ROWS = pa.table({"encoder": pa.array([], pa.string())})  # the data table when nothing was classified


def _start_encoder(enc_cfg: dict, seed: int):
    """The encoder pretraining started from -- its random init (the same seed) or, for a post-training,
    its start weights -- and that baseline's name ("random" | "start")."""
    import torch

    from tasks.models.backbone import build_backbone

    torch.manual_seed(seed)
    start = enc_cfg.get("init_checkpoint", "")
    enc, _ = build_backbone(enc_cfg["backbone"], cifar_stem=enc_cfg["cifar_stem"], checkpoint=start,
                            **enc_cfg["backbone_kwargs"])
    return enc, ("start" if start else "random")


def _evaluate_task(encoder_bytes: bytes, enc_cfg: dict, images, labels, cfg: dict, seed: int) -> dict:
    import torch

    from tasks.evaluate.classification import evaluate_encoder

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = {}
    kw = dict(k=cfg["knn_k"], temperature=cfg["knn_temperature"], test_fraction=cfg["test_fraction"],
              linear_epochs=cfg["linear_epochs"], linear_lr=cfg["linear_lr"], seed=cfg["seed"],
              batch_size=cfg["batch_size"])
    enc, baseline = _start_encoder(enc_cfg, seed)
    if cfg["baseline_random"]:
        out[baseline] = evaluate_encoder(enc, images, labels, **kw)
    enc.load_state_dict(torch.load(io.BytesIO(encoder_bytes), map_location="cpu", weights_only=True))
    out["pretrained"] = evaluate_encoder(enc, images, labels, **kw)
    return out


def _expert_search_task(method_bytes: bytes, enc_cfg: dict, cluster_cfg: dict, image_bytes: list, ids: list,
                        images, labels, cfg: dict) -> dict:
    """MoCE: rebuild the trained MoE model, embed the train split with the cluster stage's encoder, pick
    the experts (tasks/evaluate/expert_search.py) and evaluate the dense ViT they make."""
    import torch

    from tasks.curation.embed import Embedder
    from tasks.evaluate.classification import evaluate_encoder, stratified_split
    from tasks.evaluate.expert_search import search_experts
    from tasks.models.backbone import build_backbone
    from tasks.pretrain.methods import get_method

    state = torch.load(io.BytesIO(method_bytes), map_location="cpu", weights_only=True)
    backbone, dim = build_backbone(enc_cfg["backbone"], cifar_stem=enc_cfg["cifar_stem"], **enc_cfg["backbone_kwargs"])
    moce = get_method(enc_cfg["method"])(backbone, dim, centroids=state["centroids"], **enc_cfg["method_kwargs"])
    moce.load_state_dict(state)
    train, _ = stratified_split(labels, cfg["test_fraction"], cfg["seed"])
    embed = Embedder(cluster_cfg["encoder"], checkpoint=cluster_cfg["checkpoint"], resolution=cluster_cfg["resolution"],
                     seed=cluster_cfg["seed"], **cluster_cfg.get("encoder_kwargs", {}))
    emb = np.stack(embed({"id": np.asarray(ids)[train], "image": [image_bytes[i] for i in train]})["embedding"])
    found = search_experts(moce, emb)
    dense = moce.dense(found["experts"], found["scales"])
    res = evaluate_encoder(dense, images, labels, k=cfg["knn_k"], temperature=cfg["knn_temperature"],
                           test_fraction=cfg["test_fraction"], linear_epochs=cfg["linear_epochs"],
                           linear_lr=cfg["linear_lr"], seed=cfg["seed"], batch_size=cfg["batch_size"])
    buf = io.BytesIO()
    torch.save(dense.state_dict(), buf)
    return {"result": res, "experts": found["experts"], "scales": found["scales"], "mass": found["mass"].tolist(),
            "clusters": found["clusters"].tolist(), "encoder": buf.getvalue()}


def _dense_task(encoder_bytes: bytes, enc_cfg: dict, cfg: dict, root: str, resolution: int, seed: int,
                baseline: bool) -> dict:
    """Linear and in-context segmentation of the start/random encoder and the pretrained one on the
    segmentation set at ``root``, with overlay pictures of the first val images."""
    import os

    import torch
    from PIL import Image

    from tasks.data.segmentation import load_segmentation_split
    from tasks.evaluate.overlay import overlay_grid
    from tasks.evaluate.segmentation import evaluate_dense

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    limit = cfg["seg_limit"] or None
    load = dict(size=resolution, limit=limit, ignore_values=tuple(cfg["seg_ignore"]), num_classes=cfg["seg_classes"])
    train = load_segmentation_split(root, cfg["seg_train_split"], **load)
    val = load_segmentation_split(root, cfg["seg_val_split"], **load)
    if not len(train.images) or not len(val.images):
        raise ValueError(f"segmentation set {root}: {len(train.images)} train / {len(val.images)} val images "
                         f"could be read (skipped: {(train.skipped + val.skipped)[:3]})")
    kw = dict(linear=cfg["seg_linear"], in_context=cfg["seg_hummingbird"], linear_epochs=cfg["seg_linear_epochs"],
              linear_lr=cfg["seg_linear_lr"], out_size=cfg["seg_out_size"], k=cfg["seg_k"],
              temperature=cfg["seg_temperature"], memory_size=cfg["seg_memory"] or None,
              augment_epochs=cfg["seg_augment_epochs"], seed=cfg["seed"], search=cfg["seg_search"])
    enc, first = _start_encoder(enc_cfg, seed)
    results, pictures = {}, {}
    encoders = ([(first, None)] if baseline else []) + [("pretrained", encoder_bytes)]
    for name, blob in encoders:
        if blob is not None:
            enc.load_state_dict(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True))
        r = evaluate_dense(enc, train.images, train.masks, val.images, val.masks, cfg["seg_classes"], **kw)
        for kind in ("linear", "hbird"):
            pred = r.pop(f"{kind}_pred", None)
            if pred is not None:
                grid = overlay_grid(val.images, val.masks, pred, cfg["seg_classes"])
                buf = io.BytesIO()
                Image.fromarray(grid).save(buf, format="PNG")
                pictures[f"seg_{kind}_{name}.png"] = buf.getvalue()
        results[name] = r
    return {"results": results, "pictures": pictures, "n_train": len(train.images), "n_val": len(val.images),
            "skipped": train.skipped + val.skipped, "resolution": resolution}


def _log_dense(ctx, enc_cfg: dict, blob: bytes) -> None:
    """The expert-search ViT as an MLflow model of this evaluate run (the stage output's file stays the
    source of truth if logging fails)."""
    import torch

    from tasks.models.backbone import build_backbone

    enc, _ = build_backbone(enc_cfg["backbone"], cifar_stem=enc_cfg["cifar_stem"], **enc_cfg["backbone_kwargs"])
    enc.load_state_dict(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True))
    size = enc.patch_embed.img_size
    try:
        info = ctx.tracker.log_encoder(enc.eval(), None, np.zeros((1, 3, *size), np.float32))
        ctx.tracker.set_tags({"sslforge.expert_search_model_uri": info.get("model_uri", "")})
    except Exception as e:  # noqa: BLE001
        ctx.log(f"warning: could not log the expert-search encoder as an MLflow model: {e}")


def _log_png(ctx, name: str, data: bytes) -> None:
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, name)
        with open(path, "wb") as f:
            f.write(data)
        try:
            ctx.tracker.log_artifact(path, "segmentation")
        except Exception as e:  # noqa: BLE001 -- the stage output keeps the picture
            ctx.log(f"warning: could not log {name} to MLflow: {e}")


def run(ctx) -> dict:
    import ray

    from tasks.data.images import batch_to_array

    cfg = ctx.cfg
    cur = ctx.storage.read_table("curate", columns=["id", "image", "label"])
    cur = cur.filter(pa.compute.not_equal(cur["label"], ""))
    if cur.num_rows == 0 and not cfg.seg_root:
        ctx.log("no labelled images: nothing to evaluate")
        ctx.writer.write_table("data", _NO_ROWS, sort_by=None)
        return {"metrics": {}, "counts": {"labelled": 0}}
    pre = ctx.upstream["pretrain"]
    enc_cfg = pre["encoder"]
    blob = ctx.storage.read_file("pretrain", enc_cfg["file"])
    from tasks.config import to_dict

    res, search, classes = {}, None, []
    if cur.num_rows == 0:
        ctx.log("no labelled images: kNN / linear probe skipped, dense evaluation only")
    else:
        classes = sorted(set(cur["label"].to_pylist()))
        labels = np.array([classes.index(x) for x in cur["label"].to_pylist()])
        images = batch_to_array(cur["image"].to_pylist(), cfg.resolution)
        res = ray.get(ray.remote(num_cpus=1)(_evaluate_task).remote(blob, enc_cfg, images, labels, to_dict(cfg),
                                                                    pre["config"]["seed"]))
        if enc_cfg.get("method_file") and cfg.expert_search:
            search = ray.get(ray.remote(num_cpus=1)(_expert_search_task).remote(
                ctx.storage.read_file("pretrain", enc_cfg["method_file"]), enc_cfg, ctx.upstream["cluster"]["config"],
                cur["image"].to_pylist(), cur["id"].to_pylist(), images, labels, to_dict(cfg)))
            res["expert_search"] = search.pop("result")
            dense_blob = search.pop("encoder")
            ctx.writer.write_file("expert_search.pt", dense_blob)
            _log_dense(ctx, enc_cfg, dense_blob)
            ctx.log(f"expert search: experts {search['experts']} per MoE layer (train split over clusters "
                    f"{search['clusters']})")
    dense = None
    if cfg.seg_root:
        import os

        resolution = cfg.seg_resolution or pre["config"]["resolution"]
        dense = ray.get(ray.remote(num_cpus=1)(_dense_task).remote(
            blob, enc_cfg, to_dict(cfg),
            os.path.abspath(cfg.seg_root), resolution, pre["config"]["seed"], cfg.baseline_random))
        for name, data in dense.pop("pictures").items():
            ctx.writer.write_file(name, data)
            _log_png(ctx, name, data)
        for item, reason in dense["skipped"]:
            ctx.log(f"segmentation set: skipped {item}: {reason}")
        ctx.log("dense evaluation on " + cfg.seg_root + ": " + ", ".join(
            f"{n} " + " ".join(f"{k}={v:.3f}" for k, v in r.items() if k.endswith("miou"))
            for n, r in dense["results"].items()))
    rows = [{"encoder": name, **vals} for name, vals in res.items()]
    ctx.writer.write_table("data", pa.Table.from_pylist(rows) if rows else _NO_ROWS, sort_by="encoder" if rows else None)
    report = {"classes": classes, "results": res, "pretrain_run_id": pre.get("mlflow_run_id", ""),
              "pretrain_content_hash": pre["content_hash"]}
    if search is not None:
        report["expert_search"] = search
    if dense is not None:
        report["segmentation"] = dense
    ctx.writer.write_file("report.json", json.dumps(report, indent=2).encode())
    ctx.tracker.log_dict(report, "report.json")
    metrics = {"knn_top1": res["pretrained"]["knn_top1"], "linear_top1": res["pretrained"]["linear_top1"]} \
        if "pretrained" in res else {}
    if search is not None:
        metrics.update(knn_top1_expert_search=res["expert_search"]["knn_top1"],
                       linear_top1_expert_search=res["expert_search"]["linear_top1"])
    base = "start" if "start" in res else "random"
    if base in res:
        metrics.update({f"knn_top1_{base}": res[base]["knn_top1"], f"linear_top1_{base}": res[base]["linear_top1"]})
        from pipelines.plots import bar_figure

        ctx.tracker.log_figure(bar_figure({"start weights" if base == "start" else "random init": res[base]["knn_top1"],
                                           "pretrained": res["pretrained"]["knn_top1"]}, "kNN top-1"),
                               "knn_top1.png")
    if dense is not None:
        for name, r in dense["results"].items():
            suffix = "" if name == "pretrained" else f"_{name}"
            metrics.update({f"{k}{suffix}": r[k] for k in ("linear_miou", "hbird_miou") if k in r})
        if "hbird_patches_per_s" in dense["results"]["pretrained"]:
            metrics["hbird_patches_per_s"] = dense["results"]["pretrained"]["hbird_patches_per_s"]
    ctx.tracker.set_tags({"sslforge.pretrain_run_id": pre.get("mlflow_run_id", "")})
    if res:
        ctx.log("kNN top-1: " + ", ".join(f"{k}={v['knn_top1']:.3f}" for k, v in res.items()))
    return {"metrics": metrics, "counts": {"labelled": cur.num_rows, "classes": len(classes)}}
