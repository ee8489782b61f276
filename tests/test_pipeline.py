"""End to end on a real local Ray cluster with real MLflow (SQLite store): run, cache, rerun, lineage."""
from __future__ import annotations

import json
import time

import pytest

from pipelines.cli import main
from tests.conftest import copy_store, write_pipeline

STAGES = ["curate", "cluster", "masks", "views", "pretrain", "evaluate"]


def _status(capsys) -> dict:
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in STAGES and len(parts) >= 4:
            rows[parts[0]] = parts[1]
    return rows


@pytest.fixture(scope="module")
def first_run(tiny_store, tmp_path_factory):
    """The session's first run of the TINY pipeline (every stage ran there), copied: these tests change it."""
    tmp = tmp_path_factory.mktemp("pipe")
    pipe = write_pipeline(tmp / "pipeline.yaml")
    storage = copy_store(tiny_store, tmp / "store")
    args = [str(pipe), "--storage", str(storage)]
    from tasks.store import Storage

    first_ids = {s: Storage(str(storage)).manifest(s) for s in STAGES}
    return tmp, pipe, storage, args, first_ids


def test_first_run_produces_every_stage(first_run):
    from tasks.store import Storage

    tmp, pipe, storage, args, _ = first_run
    st = Storage(str(storage))
    for s in STAGES:
        man = st.manifest(s)
        assert man is not None, s
        for key in ("schema_version", "rows", "content_hash", "upstream", "config", "code_version", "cache_key",
                    "mlflow_run_id"):
            assert key in man, (s, key)
    cur = st.manifest("curate")["counts"]
    assert cur == {"seen": 48, "kept": 48, "duplicates": 0, "quarantined": 0}
    assert st.manifest("cluster")["counts"]["clusters"] == 3
    assert st.read_table("cluster", "centroids").num_rows == 3
    masks = st.read_table("masks")
    assert masks.num_rows == 48 and 0.2 < sum(masks["fg_ratio"].to_pylist()) / 48 < 0.6
    mm = st.manifest("masks")["metrics"]
    assert "gt_iou" in mm
    # 48 rows in 3 blocks of 16: timed from the pipeline's start, the first block and the warm rate after it
    assert 0 < mm["first_block_s"] < 48 / mm["images_per_s"] and mm["warm_images_per_s"] > 0
    assert st.manifest("pretrain")["metrics"]["steps"] == 4
    assert 0.0 <= st.manifest("pretrain")["metrics"]["knn_monitor_final"] <= 1.0  # the online monitor ran
    report = json.loads(st.read_file("evaluate", "report.json"))
    assert {"random", "pretrained"} <= set(report["results"])
    assert st.manifest("evaluate")["upstream"]["pretrain"] == st.manifest("pretrain")["content_hash"]


def test_second_run_is_all_cached_and_fast(first_run, capsys):
    from tasks.store import Storage

    tmp, pipe, storage, args, _ = first_run
    capsys.readouterr()
    t0 = time.time()
    assert main(["run", *args]) == 0
    elapsed = time.time() - t0
    assert _status(capsys) == {s: "cached" for s in STAGES}
    assert elapsed < 10, elapsed
    # cached stage runs link the run that produced their output
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{storage}/mlflow.db")
    exp = client.get_experiment_by_name("sslforge-tests")
    first = {s: Storage(str(storage)).manifest(s)["mlflow_run_id"] for s in STAGES}
    cached = client.search_runs([exp.experiment_id], "tags.`sslforge.cached` = 'true'")
    assert sorted(r.data.tags["sslforge.stage"] for r in cached) == sorted(STAGES)
    assert all(r.data.tags["sslforge.produced_by"] == first[r.data.tags["sslforge.stage"]] for r in cached)


def test_config_change_reruns_that_stage_and_downstream_only(first_run, capsys):
    tmp, pipe, storage, args, _ = first_run
    capsys.readouterr()
    assert main(["run", *args, "--set", "evaluate.knn_k=5"]) == 0
    assert _status(capsys) == {**{s: "cached" for s in STAGES[:-1]}, "evaluate": "ran"}
    # views depends on masks; masks' new threshold changes its content, so views..evaluate rerun, cluster stays
    assert main(["run", *args, "--set", "evaluate.knn_k=5", "--set", "masks.foreground_fraction=0.3"]) == 0
    got = _status(capsys)
    assert got["curate"] == got["cluster"] == "cached"
    assert got["masks"] == got["views"] == got["pretrain"] == got["evaluate"] == "ran"


def test_force_and_single_stage(first_run, capsys):
    tmp, pipe, storage, args, _ = first_run
    base = [*args, "--set", "evaluate.knn_k=5", "--set", "masks.foreground_fraction=0.3"]
    capsys.readouterr()
    assert main(["run", *base, "--force", "cluster"]) == 0
    got = _status(capsys)
    assert got["cluster"] == "ran"  # deterministic output: the same content hash, so downstream stays cached
    assert all(got[s] == "cached" for s in STAGES if s != "cluster")
    assert main(["stage", "evaluate", *base, "--force", "evaluate"]) == 0
    assert _status(capsys) == {"evaluate": "ran"}


def test_stage_without_upstream_is_a_clear_error(ray_local, tmp_path, capsys):
    pipe = write_pipeline(tmp_path / "p.yaml")
    assert main(["stage", "evaluate", str(pipe), "--storage", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "needs the output of 'curate'" in err


def test_mlflow_lineage(first_run):
    import mlflow

    tmp, pipe, storage, args, first = first_run
    mlflow.set_tracking_uri(f"sqlite:///{storage}/mlflow.db")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("sslforge-tests")
    ev_man = first["evaluate"]
    ev = client.get_run(ev_man["mlflow_run_id"])
    parent = ev.data.tags["mlflow.parentRunId"]
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.data.tags["sslforge.stage"] for r in children) == sorted(STAGES)
    # walk back: evaluate -> pretrain run -> its inputs and config
    pre_id = ev.data.tags["sslforge.upstream.pretrain.run_id"]
    assert pre_id == first["pretrain"]["mlflow_run_id"]
    pre = client.get_run(pre_id)
    assert pre.data.params["method"] == "mocov2" and pre.data.params["backbone"] == "resnet10t"
    digests = {d.dataset.name: d.dataset.digest for d in pre.inputs.dataset_inputs}
    assert digests["curate-output"] == first["curate"]["content_hash"][:32]
    assert digests["views-output"] == first["views"]["content_hash"][:32]
    assert "loss" in pre.data.metrics and "knn_monitor" in pre.data.metrics
    monitored = client.get_metric_history(pre_id, "knn_monitor")
    assert [m.step for m in monitored] == [2, 3]  # end of epoch 1 (3 steps of 16 of 48 images) and the last step
    assert "curves/knn_monitor.png" in [a.path for a in client.list_artifacts(pre_id, "curves")]
    # the encoder is an MLflow model, registered
    versions = client.search_model_versions("name = 'sslforge-encoder'")
    assert any(v.run_id == pre_id for v in versions)
    arts = [a.path for a in client.list_artifacts(pre_id)]
    assert "manifest.json" in arts
    assert ev.data.metrics["knn_top1"] >= 0


def test_other_method_with_quality_weighting_through_ray_train(tiny_store, tmp_path, capsys):
    """SwAV (multi-crop views of two sizes) with GenView's quality weighting, in the real trainer: the views
    output carries the masks, the feeder crops them with each view's geometry, the weights are logged."""
    import mlflow

    from tasks.store import Storage

    storage = copy_store(tiny_store, tmp_path / "store")  # a fresh copy: upstream of pretrain is cached
    args = [str(write_pipeline(tmp_path / "pipeline.yaml")), "--storage", str(storage)]
    capsys.readouterr()
    assert main(["run", *args, "--set", "pretrain.method=swav",
                 "--set", "pretrain.method_kwargs={hidden_dim: 32, num_prototypes: 8, num_local_crops: 2}",
                 "--set", "pretrain.quality_encoder=tiny_convnet", "--set", "pretrain.quality_gamma=2.0",
                 # resnet18 with the CIFAR stem: resnet10t's stride-32 stem leaves 1 x 1 maps at C5 for a 32 px
                 # crop, and this tiny SwAV (8 prototypes, 32-wide head, bf16) went non-finite at step 2-3 for
                 # some batch splits
                 "--set", "pretrain.backbone=resnet18", "--set", "pretrain.cifar_stem=true"]) == 0
    status = _status(capsys)
    assert status["pretrain"] == "ran" and status["evaluate"] == "ran" and status["views"] == "cached"
    st = Storage(str(storage))
    hist = st.read_table("pretrain", "history").to_pylist()
    assert len(hist) == 4 and all(h["quality_w_max"] >= 1.0 for h in hist)  # mean-1 weights: max >= 1
    assert all(-2.0 <= h["quality_q"] <= 2.0 for h in hist)
    client = mlflow.MlflowClient(f"sqlite:///{storage}/mlflow.db")
    run = client.get_run(st.manifest("pretrain")["mlflow_run_id"])
    assert run.data.params["method"] == "swav" and "quality_q" in run.data.metrics


TINY_VIT = ("{img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, class_token: false, global_pool: avg, "
            "fc_norm: false}")


@pytest.mark.parametrize("method,kwargs", [
    # one pipeline run costs ~60 s here: these two in the slow suite; MoCE (below) takes the same path
    # (token masks from the feeder) in the default one
    pytest.param("mae", "{decoder_dim: 32, decoder_depth: 1, decoder_heads: 2}", marks=pytest.mark.slow),
    pytest.param("ijepa", "{predictor_dim: 32, predictor_depth: 1}", marks=pytest.mark.slow),
])
def test_masked_family_through_ray_train(tiny_store, tmp_path, capsys, method, kwargs):
    """MAE and I-JEPA on a ViT in the real trainer (2 workers): the feeder draws the global batch's token
    masks per step and each worker gets its rows; the encoder exports and evaluates as a plain timm ViT."""
    import json

    from tasks.store import Storage

    storage = copy_store(tiny_store, tmp_path / "store")
    args = [str(write_pipeline(tmp_path / "pipeline.yaml")), "--storage", str(storage)]
    capsys.readouterr()
    vit = TINY_VIT
    assert main(["run", *args, "--set", f"pretrain.method={method}", "--set", "pretrain.backbone=vit_tiny_patch16_224",
                 "--set", f"pretrain.backbone_kwargs={vit}", "--set", f"pretrain.method_kwargs={kwargs}",
                 "--set", "pretrain.optimizer=adamw", "--set", "pretrain.adamw_betas=[0.9, 0.95]",
                 "--set", "pretrain.lr=0.0015", "--set", "pretrain.weight_decay=0.05"]) == 0
    status = _status(capsys)
    assert status["pretrain"] == "ran" and status["evaluate"] == "ran"
    st = Storage(str(storage))
    hist = st.read_table("pretrain", "history").to_pylist()
    assert len(hist) == 4 and all(h["loss"] > 0 for h in hist)
    report = json.loads(st.read_file("evaluate", "report.json"))
    assert 0.0 <= report["results"]["pretrained"]["knn_top1"] <= 1.0


def test_moce_clusters_pretrains_and_searches_experts(tiny_store, tmp_path, capsys):
    """MoCE end to end: the cluster stage embeds with a ViT (an MAE-style encoder, random here) and logs its
    balance; pretrain gates on those centroids (every image's cluster id reaches its worker; experts that
    no local image routes to are fine under DDP); evaluate runs the expert search on its train split and
    evaluates the dense ViT of the chosen experts."""
    import json

    import mlflow

    from tasks.store import Storage

    storage = copy_store(tiny_store, tmp_path / "store")
    args = [str(write_pipeline(tmp_path / "pipeline.yaml")), "--storage", str(storage)]
    capsys.readouterr()
    assert main(["run", *args, "--set", "cluster.encoder=vit_tiny_patch16_224",
                 "--set", "cluster.encoder_kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2, "
                          "class_token: false, global_pool: avg, fc_norm: false}",
                 "--set", "pretrain.method=moce", "--set", "pretrain.backbone=vit_tiny_patch16_224",
                 "--set", f"pretrain.backbone_kwargs={TINY_VIT}",
                 "--set", "pretrain.method_kwargs={decoder_dim: 32, decoder_depth: 1, decoder_heads: 2, num_experts: 3}",
                 "--set", "pretrain.optimizer=adamw", "--set", "pretrain.lr=0.0015"]) == 0
    status = _status(capsys)
    assert status["cluster"] == "ran" and status["pretrain"] == "ran" and status["evaluate"] == "ran"
    st = Storage(str(storage))
    man = st.manifest("cluster")
    assert 0.0 < man["metrics"]["cluster_balance"] <= 1.0 and man["metrics"]["cluster_max_over_mean"] >= 1.0
    hist = st.read_table("pretrain", "history").to_pylist()
    assert len(hist) == 4 and all("balance_loss" in h and "gate_entropy" in h for h in hist)
    report = json.loads(st.read_file("evaluate", "report.json"))
    search = report["expert_search"]
    assert len(search["experts"]) == 1 and 0 <= search["experts"][0] < 3  # 2 blocks: the second is MoE
    assert sum(search["clusters"]) == report["results"]["expert_search"]["n_train"]
    assert 0.0 <= report["results"]["expert_search"]["knn_top1"] <= 1.0
    client = mlflow.MlflowClient(f"sqlite:///{storage}/mlflow.db")
    arts = [a.path for a in client.list_artifacts(man["mlflow_run_id"])]
    assert "cluster_sizes.png" in arts
    ev = client.get_run(st.manifest("evaluate")["mlflow_run_id"])
    assert ev.data.tags["sslforge.expert_search_model_uri"]  # the dense ViT, logged as an MLflow model
    assert "knn_top1_expert_search" in ev.data.metrics


def test_external_files_are_hashed_into_the_cache_key_and_named_when_missing(tmp_path):
    from pipelines.runner import StageInputError, external_files

    ckpt = tmp_path / "start.pt"
    ckpt.write_bytes(b"weights v1")
    section = {"init_checkpoint": str(ckpt), "quality_checkpoint": "", "checkpoint_every": 5, "lr": 0.1}
    first = external_files("pretrain", section)
    assert list(first) == ["init_checkpoint"] and first["init_checkpoint"]["path"] == str(ckpt)
    ckpt.write_bytes(b"weights v2")  # changed in place, same path: another digest, so the stage reruns
    assert external_files("pretrain", section)["init_checkpoint"]["sha256"] != first["init_checkpoint"]["sha256"]
    with pytest.raises(StageInputError, match="pretrain.init_checkpoint: no such file"):
        external_files("pretrain", {**section, "init_checkpoint": str(tmp_path / "gone.pt")})


@pytest.mark.slow  # ~60 s; the checkpoint hashing (above), NeCo and the feeder's boxes (test_neco.py) are in the default suite
def test_neco_post_trains_from_recorded_start_weights(tiny_store, tmp_path, capsys):
    """NeCo through Ray Train (2 workers): a tiny DINOv2-with-registers ViT starts from a local checkpoint,
    whose SHA-256 is in the pretrain manifest and among the MLflow run's inputs; the feeder hands every
    worker its crops' boxes; evaluate compares the post-trained encoder with its start weights."""
    import hashlib

    import mlflow
    import torch

    from tasks.models.backbone import build_backbone
    from tasks.store import Storage

    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, dynamic_img_size=True)
    torch.manual_seed(3)
    start, _ = build_backbone("vit_small_patch14_reg4_dinov2", **kwargs)
    ckpt = tmp_path / "dinov2-start.pt"
    torch.save(start.state_dict(), ckpt)
    storage = copy_store(tiny_store, tmp_path / "store")
    args = [str(write_pipeline(tmp_path / "pipeline.yaml")), "--storage", str(storage)]
    capsys.readouterr()
    assert main(["run", *args, "--set", "pretrain.method=neco", "--set", "pretrain.backbone=vit_small_patch14_reg4_dinov2",
                 "--set", "pretrain.backbone_kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2, "
                          "dynamic_img_size: true}",
                 "--set", f"pretrain.init_checkpoint={ckpt}",
                 "--set", "pretrain.method_kwargs={out_dim: 16, hidden_dim: 32, queue_size: 64, num_references: 8}",
                 "--set", "pretrain.optimizer=adamw", "--set", "pretrain.lr=0.0005"]) == 0
    status = _status(capsys)
    assert status["pretrain"] == "ran" and status["evaluate"] == "ran"
    st = Storage(str(storage))
    man = st.manifest("pretrain")
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert man["files"]["init_checkpoint"] == {"path": str(ckpt), "sha256": digest}
    hist = st.read_table("pretrain", "history").to_pylist()
    assert len(hist) == 4 and all(h["loss"] > 0 for h in hist)
    report = json.loads(st.read_file("evaluate", "report.json"))
    assert set(report["results"]) == {"start", "pretrained"}
    client = mlflow.MlflowClient(f"sqlite:///{storage}/mlflow.db")
    run = client.get_run(man["mlflow_run_id"])
    names = {i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs}
    assert names["pretrain.init_checkpoint"] == digest[:32]
    assert run.data.tags["sslforge.file.init_checkpoint.sha256"] == digest
    assert "knn_top1_start" in client.get_run(st.manifest("evaluate")["mlflow_run_id"]).data.metrics


def _tiny_segmentation_set(root):
    """6 train / 3 val 40 x 30 images of 3 classes (left / middle / right thirds, class colours plus noise)
    with a void (3) border, and a manifest.csv as CamVid's."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = ["image,mask,split"]
    colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]])
    for split, n in (("train", 6), ("val", 3)):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(n):
            order = rng.permutation(3)
            mask = np.repeat(np.repeat(order[None], 30, 0), [13, 14, 13], 1).astype(np.uint8)
            mask[0, :] = 3
            img = np.clip(colours[mask.clip(max=2)] + rng.normal(0, 20, (30, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / "images" / split / f"{i}.jpg")
            Image.fromarray(mask).save(root / "masks" / split / f"{i}.png")
            rows.append(f"images/{split}/{i}.jpg,masks/{split}/{i}.png,{split}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def test_dense_evaluation_on_a_segmentation_set(tiny_store, tmp_path, capsys):
    """evaluate with a segmentation set: linear and Hummingbird mIoU for the pretrained and the random-init
    encoder (the pipeline's resnet10t: 4 x 4 maps at 128 px), overlay pictures in the stage output and MLflow, the set's
    manifest digest in lineage."""
    import mlflow

    from tasks.store import Storage

    seg = _tiny_segmentation_set(tmp_path / "seg")
    storage = copy_store(tiny_store, tmp_path / "store")
    args = [str(write_pipeline(tmp_path / "pipeline.yaml")), "--storage", str(storage)]
    capsys.readouterr()
    assert main(["stage", "evaluate", *args, "--set", f"evaluate.seg_root={seg}", "--set", "evaluate.seg_classes=3",
                 "--set", "evaluate.seg_ignore=[3]", "--set", "evaluate.seg_resolution=128",
                 "--set", "evaluate.seg_linear_epochs=30",
                 "--set", "evaluate.seg_linear_lr=0.1", "--set", "evaluate.seg_out_size=16"]) == 0
    st = Storage(str(storage))
    man = st.manifest("evaluate")
    assert man["files"]["seg_root"]["path"] == str(seg)
    report = json.loads(st.read_file("evaluate", "report.json"))["segmentation"]
    assert report["n_train"] == 6 and report["n_val"] == 3 and not report["skipped"]
    for name in ("pretrained", "random"):
        r = report["results"][name]
        assert 0.0 <= r["linear_miou"] <= 1.0 and 0.0 <= r["hbird_miou"] <= 1.0 and len(r["hbird_per_class_iou"]) == 3
    # colour alone separates these classes: even a random-init CNN's maps carry it
    assert report["results"]["random"]["hbird_miou"] > 0.4  # chance: about 1 / 3
    client = mlflow.MlflowClient(f"sqlite:///{storage}/mlflow.db")
    run = client.get_run(man["mlflow_run_id"])
    assert {"linear_miou", "hbird_miou", "linear_miou_random", "hbird_miou_random"} <= set(run.data.metrics)
    arts = [a.path for a in client.list_artifacts(man["mlflow_run_id"], "segmentation")]
    assert "segmentation/seg_hbird_pretrained.png" in arts and "segmentation/seg_linear_random.png" in arts
    import io

    from PIL import Image

    png = Image.open(io.BytesIO(st.read_file("evaluate", "seg_hbird_pretrained.png")))
    assert png.size[1] > 3 * 16  # one row (image | ground truth | prediction) per val image
