"""Tracking against a real `mlflow server` (SQLite store) on 127.0.0.1, and the UI in headless Chromium."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from pipelines.cli import main
from tests.conftest import free_port, write_pipeline


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
    proc = subprocess.Popen([mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
                             "--default-artifact-root", str(tmp / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start")
    yield url
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


def test_stage_runs_tracked_on_server_and_visible_in_ui(ray_local, mlflow_server, tmp_path):
    import mlflow

    pipe = write_pipeline(tmp_path / "p.yaml", {"experiment": "sslforge-server-test"})
    assert main(["stage", "curate", str(pipe), "--storage", str(tmp_path / "s"), "--tracking-uri", mlflow_server]) == 0
    assert main(["stage", "curate", str(pipe), "--storage", str(tmp_path / "s"), "--tracking-uri", mlflow_server]) == 0
    mlflow.set_tracking_uri(mlflow_server)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("sslforge-server-test")
    runs = client.search_runs([exp.experiment_id], "tags.`sslforge.stage` = 'curate'")
    assert sorted(r.data.tags["sslforge.cached"] for r in runs) == ["false", "true"]
    ran = next(r for r in runs if r.data.tags["sslforge.cached"] == "false")
    assert ran.data.metrics["count_seen"] == 48 and ran.data.params["input"] == "builtin://shapes"
    assert [d.dataset.name for d in ran.inputs.dataset_inputs] == ["curate-output"]

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium not installed (.ci/run installs it)")
    url = f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs"
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                              "--no-first-run", "--disable-background-networking", "--disable-component-update",
                              "--disable-sync", f"--user-data-dir={profile}", "--window-size=1400,900",
                              "--virtual-time-budget=20000", "--dump-dom", url],
                             capture_output=True, text=True, timeout=120).stdout
        shot = tmp_path / "ui.png"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", "--window-size=1400,900", "--virtual-time-budget=20000",
                        f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert "sslforge-server-test" in dom
    assert "tiny:curate" in dom  # the pipeline (parent) run is listed in the runs table
    assert shot.exists() and shot.stat().st_size > 10_000
    out = os.environ.get("SSLFORGE_UI_SHOT")
    if out:
        shutil.copy(shot, out)
