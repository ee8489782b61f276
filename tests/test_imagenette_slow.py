"""The same pipeline pointed at ../shared/data/imagenette224 (a subset, linked from a temp folder)."""
from __future__ import annotations

import os

import pytest

from pipelines.cli import main
from tasks.store import Storage
from tests.conftest import SHARED, write_pipeline

IMAGENETTE = SHARED / "imagenette224"


@pytest.mark.slow
@pytest.mark.skipif(not IMAGENETTE.exists(), reason="../shared/data/imagenette224 not present")
def test_pipeline_on_imagenette_subset(ray_local, tmp_path):
    subset = tmp_path / "imagenette"
    per_class = 12
    for cls in sorted(os.listdir(IMAGENETTE / "train")):
        os.makedirs(subset / cls)
        for name in sorted(os.listdir(IMAGENETTE / "train" / cls))[:per_class]:
            os.symlink(IMAGENETTE / "train" / cls / name, subset / cls / name)
    pipe = write_pipeline(tmp_path / "p.yaml", {
        "curate": {"input": str(subset), "max_side": 96},
        "cluster": {"k": 10, "resolution": 64},
        "masks": {"resolution": 64},
        "pretrain": {"resolution": 64, "max_steps": 6},
        "evaluate": {"resolution": 64},
    })
    assert main(["run", str(pipe), "--storage", str(tmp_path / "s")]) == 0
    st = Storage(str(tmp_path / "s"))
    c = st.manifest("curate")["counts"]
    assert c["seen"] == 10 * per_class == c["kept"] + c["duplicates"] + c["quarantined"]
    assert len(st.manifest("curate")["labels"]) == 10
    assert st.manifest("evaluate")["counts"]["classes"] == 10
    assert 0.0 <= st.manifest("evaluate")["metrics"]["knn_top1"] <= 1.0
