"""Shared fixtures: a real local Ray cluster, tiny pipeline configs, and helpers to run the CLI."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"

# The smallest pipeline that still exercises every stage for real: 48 sample images at 32 px, tiny
# random encoders (a 1-block ViT with 8 px patches, resnet10t), 4 pretrain steps on 2 Ray Train workers.
TINY = {
    "name": "tiny",
    "experiment": "sslforge-tests",
    "curate": {"input": "builtin://shapes", "sample_size": 48, "sample_resolution": 32, "shard_rows": 16},
    "cluster": {"encoder": "resnet10t", "resolution": 32, "k": 3, "batch_size": 16},
    "masks": {"encoder": "vit_tiny_patch16_224", "resolution": 32, "pca_sample": 16, "batch_size": 16,
              "encoder_kwargs": {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}},
    "views": {"generator": "none"},
    "pretrain": {"backbone": "resnet10t", "cifar_stem": False, "resolution": 32, "num_workers": 2, "batch_size": 16, "max_steps": 4,
                 "checkpoint_every": 2, "warmup_steps": 1, "method_kwargs": {"queue_size": 32, "hidden_dim": 64}},
    "evaluate": {"resolution": 32, "linear_epochs": 5},
}


def write_pipeline(path: Path, overrides: dict | None = None) -> Path:
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    for section, values in (overrides or {}).items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray cluster for the in-process pipeline tests (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_store(ray_local, tmp_path_factory) -> Path:
    """The TINY pipeline run once, in process, for the whole session: every stage's output and its MLflow
    runs. Tests that need committed upstream outputs start from a copy (:func:`copy_store`) instead of
    recomputing curate..views; their own stages still run for real."""
    from pipelines.cli import main

    tmp = tmp_path_factory.mktemp("tiny-store")
    storage = tmp / "store"
    assert main(["run", str(write_pipeline(tmp / "pipeline.yaml")), "--storage", str(storage)]) == 0
    return storage


def copy_store(src: Path, dst: Path) -> Path:
    """A private copy of a storage root (stage outputs, manifests, the SQLite MLflow store), without the
    scratch space of resumable work. The copied experiment keeps the source's artifact location, so
    artifacts of later runs land next to the source's (run ids keep them apart)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".work", ".staging"))
    return dst


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """The real command line in a subprocess: (returncode, stdout, stderr)."""
    e = {**os.environ, **(env or {})}
    p = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=e, capture_output=True,
                       text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def procs_with(marker: str) -> dict[int, str]:
    """Processes (pid -> command line) whose command line mentions ``marker``, e.g. a private Ray temp dir."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            found[int(pid)] = cmd[:160]
    return found


def have(cmd: str) -> bool:
    return shutil.which(cmd) is not None
