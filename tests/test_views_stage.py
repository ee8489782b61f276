"""The views stage with GenView's generator (the tiny random Stable unCLIP pipeline: real diffusers classes,
no download) on a real local Ray cluster, end to end into pretraining: every image gets a reproducible
variation with its own mask, a rerun generates only what is missing, a failing image is quarantined with
its reason while the rest goes on, and pretraining pairs originals with variations."""
from __future__ import annotations

import os

import pytest

from pipelines.cli import main
from tests.conftest import copy_store, write_pipeline

GENVIEW = {"generator": "unclip", "model": "tiny-random", "size": 32, "steps": 2, "batch_size": 8}


def _counts(storage) -> dict:
    from tasks.store import Storage

    return Storage(str(storage)).manifest("views")["counts"]


@pytest.fixture(scope="module")
def genview_run(tiny_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("genview")
    pipe = write_pipeline(tmp / "pipeline.yaml", {"views": GENVIEW, "pretrain": {"quality_encoder": "tiny_convnet"}})
    storage = copy_store(tiny_store, tmp / "store")  # curate, cluster, masks cached; views onwards run
    args = [str(pipe), "--storage", str(storage)]
    assert main(["run", *args]) == 0
    return storage, args


def test_every_image_gets_a_reproducible_variation_and_its_mask(genview_run):
    import mlflow

    from tasks.data.images import png_to_mask
    from tasks.store import Storage
    from tasks.views.generate import view_seed

    storage, _ = genview_run
    st = Storage(str(storage))
    rows = st.read_table("views").to_pylist()
    assert len(rows) == 48 and all(r["generated"] for r in rows)
    for r in rows:
        assert len(r["view_images"]) == len(r["view_masks"]) == 1 and r["view_images"][0][:2] == b"\xff\xd8"  # JPEG
        assert r["view_seeds"] == [view_seed(r["id"])]
        assert r["view_model"] == "tiny-random" and len(r["view_weights"]) == 16
        assert png_to_mask(r["view_masks"][0]).shape == (32, 32)
    assert {r["noise_level"] for r in rows} <= {0, 100, 200, 300, 400}
    counts = _counts(storage)
    assert counts["generated"] == 48 and counts["quarantined"] == 0
    client = mlflow.MlflowClient(f"sqlite:///{storage}/mlflow.db")
    run = client.get_run(st.manifest("views")["mlflow_run_id"])
    assert run.data.metrics["images_per_s"] > 0
    assert "views_grid.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
    # pretraining ran on the pairs (with quality weighting on the variations' own masks)
    hist = st.read_table("pretrain", "history").to_pylist()
    assert len(hist) == 4 and all(h["quality_w_max"] >= 1.0 for h in hist)


def test_rerun_generates_only_missing_views(genview_run, capsys):
    from tasks.store import Storage

    storage, args = genview_run
    before = Storage(str(storage)).manifest("views")["content_hash"]
    assert main(["stage", "views", *args, "--force", "views"]) == 0
    assert _counts(storage)["generated"] == 0 and _counts(storage)["reused"] == 48
    assert Storage(str(storage)).manifest("views")["content_hash"] == before  # same views, bit for bit
    # A crash mid-stage leaves the parts flushed so far: lose one part, and only its views are made again.
    cache = next((storage / ".cache" / "views").iterdir())
    parts = sorted(cache.glob("part-*.parquet"))
    import pyarrow.parquet as pq

    lost = pq.read_table(parts[-1]).num_rows
    parts[-1].unlink()
    assert main(["stage", "views", *args, "--force", "views"]) == 0
    assert _counts(storage)["generated"] == lost and _counts(storage)["reused"] == 48 - lost
    assert Storage(str(storage)).manifest("views")["content_hash"] == before


def test_failed_image_is_quarantined_and_the_rest_kept(genview_run, monkeypatch):
    from tasks.store import Storage

    storage, args = genview_run
    st = Storage(str(storage))
    victim = st.read_table("views")["id"].to_pylist()[3]
    for part in (storage / ".cache" / "views").glob("*/part-*.parquet"):
        os.remove(part)  # nothing cached: the victim must really be generated (and fail)
    monkeypatch.setenv("SSLFORGE_TEST_FAIL_VIEW_IDS", victim)
    assert main(["stage", "views", *args, "--set", "views.retries=2", "--force", "views"]) == 0
    q = st.read_table("views", "quarantine").to_pylist()
    assert [r["id"] for r in q] == [victim] and "after 3 attempt(s)" in q[0]["reason"]
    rows = {r["id"]: r for r in st.read_table("views").to_pylist()}
    assert not rows[victim]["generated"] and rows[victim]["view_images"] == []
    assert sum(r["generated"] for r in rows.values()) == 47
    assert _counts(storage)["quarantined"] == 1
