"""A Ray Train worker SIGKILLed mid-run: Ray Train restarts the worker group, the run restores from its
latest checkpoint and finishes in the same `sslforge run`; at most one checkpoint interval of steps is
redone, and the MLflow pretrain run stays one run (the restarted rank 0 keeps logging into it)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT, copy_store, write_pipeline

MAX_STEPS, EVERY = 40, 5


def test_killed_train_worker_restores_from_checkpoint(tiny_store, tmp_path):
    pipe = write_pipeline(tmp_path / "pipeline.yaml", {"pretrain": {
        "max_steps": MAX_STEPS, "checkpoint_every": EVERY, "log_every": 1, "knn_monitor_every": 0}})
    storage = copy_store(tiny_store, tmp_path / "store")  # curate..views committed: only pretrain, evaluate run
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "run.log"
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(pipe), "--storage", str(storage)]
    # Ray prefixes forwarded worker output with "(RayTrainWorker pid=N)" wrapped in colour codes
    step_re = re.compile(r"RayTrainWorker pid=(\d+)\)(?:\x1b\[[0-9;]*m)?\s+\[pretrain\] step (\d+)/")
    killed_pid = killed_at = None
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 480
            while time.time() < deadline and p.poll() is None and killed_pid is None:
                for pid, step in step_re.findall(log.read_text(errors="replace")):
                    if int(step) >= 2 * EVERY + 2:  # past two checkpoints, mid-interval
                        killed_pid, killed_at = int(pid), int(step)
                        break
                time.sleep(0.1)
            assert killed_pid, "never saw step %d of rank 0:\n%s" % (2 * EVERY + 2, log.read_text()[-3000:])
            os.kill(killed_pid, signal.SIGKILL)
            rc = p.wait(timeout=600)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    out = log.read_text(errors="replace")
    assert rc == 0, out[-4000:]
    m = re.search(r"resumed from step (\d+)", out)
    assert m, out[-4000:]
    resumed = int(m.group(1))
    # the kill may land a step or two after the line we saw: what was redone is at most one interval
    last_before_restart = max(int(s) for pid, s in step_re.findall(out) if int(pid) == killed_pid)
    assert resumed % EVERY == 0 and 0 < last_before_restart - resumed <= EVERY, (resumed, last_before_restart, killed_at)
    assert re.search(r"^pretrain\s+ran", out, re.M), out[-2000:]

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{storage}/mlflow.db")
    exp = client.get_experiment_by_name("sslforge-tests")
    import json

    key = json.loads((storage / "pretrain" / "manifest.json").read_text())["cache_key"]
    runs = client.search_runs([exp.experiment_id], f"tags.`sslforge.stage` = 'pretrain' and "
                                                   f"tags.`sslforge.cache_key` = '{key}' and tags.`sslforge.cached` = 'false'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    steps = [h.step for h in client.get_metric_history(runs[0].info.run_id, "step_time")]
    assert max(steps) == MAX_STEPS - 1 and set(range(MAX_STEPS)) <= set(steps)
    redone = len(steps) - len(set(steps))
    assert redone <= EVERY, redone  # steps logged twice = steps lost to the kill
    print(f"\nkilled worker {killed_pid} at step ~{killed_at}; resumed from {resumed}; {redone} steps redone")
