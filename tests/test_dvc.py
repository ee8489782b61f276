"""`dvc repro` on a real git + DVC repository whose dvc.yaml is the project's own and whose params.yaml is the
tiny pipeline: every stage runs through `sslforge stage NAME`; a second repro does nothing; a changed
evaluate param reruns evaluate alone; `dvc repro -f -s cluster` reruns cluster alone."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, have, write_pipeline

STAGES = ["curate", "cluster", "masks", "views", "pretrain", "evaluate"]
BIN = str(Path(sys.executable).parent)
# six `sslforge stage` processes, each importing torch and starting its own local Ray (~2.5-5.5 min on 2 cores)
pytestmark = [
              pytest.mark.skipif(not (have("git") and os.path.exists(os.path.join(BIN, "dvc"))),
                                 reason="needs git and dvc")]


def _sh(*cmd, cwd, env, timeout=900):
    p = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} -> {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout + p.stderr


def _ran(out: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", out)


def _mtimes(repo: Path) -> dict[str, float]:
    return {s: (repo / "sslforge-data" / s / "manifest.json").stat().st_mtime_ns for s in STAGES}


@pytest.fixture
def dvc_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1",
           "RAY_AUTH_MODE": "disabled", "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("RAY_ADDRESS", None)
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    for d in ("tasks", "pipelines"):  # the code deps dvc.yaml lists (copies: DVC hashes them)
        shutil.copytree(ROOT / d, repo / d, ignore=shutil.ignore_patterns("__pycache__"))
    write_pipeline(repo / "params.yaml")
    _sh("git", "init", "-q", cwd=repo, env=env)
    _sh("dvc", "init", "-q", cwd=repo, env=env)
    _sh("dvc", "config", "core.analytics", "false", cwd=repo, env=env)
    return repo, env


def test_dvc_repro(dvc_repo):
    repo, env = dvc_repo
    t0 = time.time()
    out = _sh("dvc", "repro", cwd=repo, env=env)
    t_full = time.time() - t0
    assert _ran(out) == STAGES, out[-3000:]
    for s in STAGES:
        assert (repo / "sslforge-data" / s / "manifest.json").exists(), s
    assert (repo / "dvc.lock").exists()

    # nothing changed: nothing to reproduce, quickly
    t1 = time.time()
    out = _sh("dvc", "repro", cwd=repo, env=env)
    t_noop = time.time() - t1
    assert _ran(out) == [], out
    assert "up to date" in out.lower() or "didn't change" in out, out
    assert t_noop < 30, t_noop

    # a changed evaluate param reruns evaluate alone
    before = _mtimes(repo)
    params = (repo / "params.yaml").read_text()
    import yaml

    cfg = yaml.safe_load(params)
    cfg["evaluate"]["knn_k"] = 5
    (repo / "params.yaml").write_text(yaml.safe_dump(cfg))
    t2 = time.time()
    out = _sh("dvc", "repro", cwd=repo, env=env)
    t_eval = time.time() - t2
    assert _ran(out) == ["evaluate"], out[-3000:]
    after = _mtimes(repo)
    assert [s for s in STAGES if after[s] != before[s]] == ["evaluate"]
    import json

    ev = json.loads((repo / "sslforge-data" / "evaluate" / "manifest.json").read_text())
    assert ev["config"]["knn_k"] == 5

    # `dvc repro STAGE` with everything up to date: nothing; `-f -s cluster`: cluster alone, never its upstream
    out = _sh("dvc", "repro", "cluster", cwd=repo, env=env)
    assert _ran(out) == [], out
    before = _mtimes(repo)
    t3 = time.time()
    out = _sh("dvc", "repro", "-f", "-s", "cluster", cwd=repo, env=env)
    t_cluster = time.time() - t3
    assert _ran(out) == ["cluster"], out[-3000:]
    after = _mtimes(repo)
    assert (repo / "sslforge-data" / "cluster" / "manifest.json").exists()
    assert [s for s in STAGES if after[s] != before[s]] in (["cluster"], []), (before, after)
    print(f"\n[dvc] full repro {t_full:.1f}s, no-op {t_noop:.1f}s, evaluate only {t_eval:.1f}s, "
          f"-f -s cluster {t_cluster:.1f}s")
