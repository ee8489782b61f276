"""The quickstart exactly as `make quickstart` runs it (repository params.yaml): pretraining must beat
random init on kNN. Slow (about 4 minutes on 2 cores): `make test-slow`."""
from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, run_cli


@pytest.mark.slow
def test_quickstart_pretraining_beats_random_init(tmp_path):
    rc, out, err = run_cli("run", str(ROOT / "params.yaml"), "--storage", str(tmp_path / "s"), timeout=900)
    assert rc == 0, err[-3000:]
    metrics = json.loads((tmp_path / "s" / "evaluate" / "manifest.json").read_text())["metrics"]
    print(metrics)
    # 144 test images: one standard error of a kNN accuracy near 0.2-0.4 is about 0.04; ask for 0.1.
    assert metrics["knn_top1"] > metrics["knn_top1_random"] + 0.1, metrics
    assert "knn_top1=" in out and "knn_top1_random=" in out
