"""Pretraining is resumable: SIGKILL `sslforge run` (and the local Ray it started) after a checkpoint, rerun the
same command, and the Ray Train run with the same name and storage path resumes from its latest checkpoint.
No partial pretrain output is ever visible (manifest.json is the commit marker)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from tests.conftest import ROOT, copy_store, procs_with, write_pipeline

MAX_STEPS = 40


def _pgroup_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_pretrain_resumes_after_sigkill(tiny_store, tmp_path):
    pipe = write_pipeline(tmp_path / "pipeline.yaml",
                          {"pretrain": {"max_steps": MAX_STEPS, "checkpoint_every": 5}})
    # curate..views committed already (the session's tiny run): the killed run is in pretrain within seconds
    storage = copy_store(tiny_store, tmp_path / "store")
    # a private, short Ray temp root (unix socket paths are limited to ~107 chars): every Ray process the run
    # starts carries it in its command line, so we can tell that none of them outlived the kill
    ray_tmp = tempfile.mkdtemp(prefix="rsm", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(pipe), "--storage", str(storage)]
    work = storage / ".work" / "pretrain"
    t0 = time.time()
    try:
        with open(tmp_path / "first.err", "w") as err:
            p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
            try:
                # wait for a committed checkpoint: a checkpoint dir *and* the checkpoint manager's snapshot that a
                # restarted run restores from
                deadline = time.time() + 420
                while time.time() < deadline and p.poll() is None:
                    ckpts = list(work.glob("pretrain-*/checkpoint_*"))
                    snaps = list(work.glob("pretrain-*/checkpoint_manager_snapshot.json"))
                    if ckpts and snaps:
                        break
                    time.sleep(0.2)
                assert p.poll() is None, "the run finished (or failed) before it could be killed:\n" + \
                    (tmp_path / "first.err").read_text()[-3000:]
                assert ckpts and snaps, "no checkpoint within the deadline:\n" + (tmp_path / "first.err").read_text()[-3000:]
            finally:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
        t_kill = time.time() - t0
        # nothing of that run survives: not its process group, not a raylet/gcs/worker of its Ray session
        deadline = time.time() + 30
        while time.time() < deadline and (_pgroup_alive(p.pid) or procs_with(ray_tmp)):
            time.sleep(0.5)
        assert not _pgroup_alive(p.pid), "processes of the killed run's group are still alive"
        assert not procs_with(ray_tmp), procs_with(ray_tmp)
        # atomic commit: the visible pretrain output is still the copied 4-step one, nothing partial
        assert json.loads((storage / "pretrain" / "manifest.json").read_text())["metrics"]["steps"] == 4
        assert not list((storage / "pretrain").glob("*.tmp*"))

        # the same command again: upstream cached, pretrain resumes from the latest checkpoint
        t1 = time.time()
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        t_resume = time.time() - t1
        assert r.returncode == 0, r.stderr[-3000:]
        out = r.stdout + r.stderr
        m = re.search(r"resumed from step (\d+)", out)
        assert m, out[-3000:]
        resumed = int(m.group(1))
        assert 5 <= resumed < MAX_STEPS and resumed % 5 == 0, resumed
        assert f"{MAX_STEPS - resumed} steps in" in out, out[-3000:]
        # (upstream stages are normally cached here; they rerun only if their code changed in between, and then
        # produce the same content, so pretrain keeps its cache key and run name)
        assert re.search(r"^pretrain\s+ran", r.stdout, re.M), r.stdout
        man = json.loads((storage / "pretrain" / "manifest.json").read_text())
        assert man["metrics"]["steps"] == MAX_STEPS
        assert (storage / "evaluate" / "manifest.json").exists()
        print(f"\nkilled after {t_kill:.1f}s at a checkpoint; resumed from step {resumed}, rerun took {t_resume:.1f}s")
    finally:
        left = procs_with(ray_tmp)
        for pid in left:  # only processes of our own private Ray session
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
