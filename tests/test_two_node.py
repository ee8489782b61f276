"""A real two-node Ray cluster on this machine (head + one worker node, 1 CPU each, a job server):
`sslforge run --address http://HEAD:DASHBOARD` submits the pipeline as a Ray job, whose 2 Ray Train workers
need both nodes; `sslforge run --address HEAD:GCS` then connects directly and finds every stage cached.

The cluster is a module fixture. Each node is a `ray start --block` in its own process group with a private
`--temp-dir`, so teardown stops exactly these processes (SIGTERM, then SIGKILL of the groups and of anything
still naming our temp dir) and never runs `ray stop`, which would end every Ray process of the user,
including the session's other local clusters.
"""
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
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, procs_with, write_pipeline

STAGES = ["curate", "cluster", "masks", "views", "pretrain", "evaluate"]
RAY_BIN = os.path.join(os.path.dirname(sys.executable), "ray")
pytestmark = [pytest.mark.skipif(not os.path.exists(RAY_BIN), reason="needs the ray CLI beside this Python")]


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    raise RuntimeError(f"ray start did not come up:\n{path.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    logs = tmp_path_factory.mktemp("two_node_logs")
    temp = tempfile.mkdtemp(prefix="r2n", dir="/tmp")  # short: unix socket paths are limited to ~107 chars
    gcs, dash = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    env.pop("RAY_ADDRESS", None)
    mem = ["--memory", str(3 * 2**30), "--object-store-memory", str(300 * 2**20)]
    ray = RAY_BIN

    def node_ports() -> list[str]:
        # every node's agents get their own free ports: the defaults (dashboard agent 52365, ray client 10001,
        # ...) are shared by both nodes here and by any other Ray on the machine ("No available agent to submit job")
        return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    procs: list[subprocess.Popen] = []
    t0 = time.time()
    try:
        head_log = logs / "head.log"
        with open(head_log, "w") as f:
            procs.append(subprocess.Popen(
                [ray, "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                 "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                 "--disable-usage-stats", f"--temp-dir={temp}", f"--ray-client-server-port={free_port()}", *mem,
                 *node_ports()],
                env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT))
        _wait_for(head_log, "Ray runtime started", procs[0], 120)
        worker_log = logs / "worker.log"
        with open(worker_log, "w") as f:
            procs.append(subprocess.Popen(
                [ray, "start", "--block", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                 "--disable-usage-stats", *mem, *node_ports()],
                env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT))
        _wait_for(worker_log, "Ray runtime started", procs[1], 120)
        # both nodes registered and the job server answers
        import urllib.request

        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=5):
                    break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        # the job server answers before the head's job agent is ready ("No available agent to submit job"):
        # wait until a trivial job runs
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(f"http://127.0.0.1:{dash}")
        while True:
            try:
                job = client.submit_job(entrypoint="true")
                break
            except RuntimeError:
                if time.time() > deadline + 60:
                    raise
                time.sleep(1)
        while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            time.sleep(0.5)
        print(f"\n[two_node] cluster up in {time.time() - t0:.1f}s (gcs {gcs}, dashboard {dash})")
        yield {"gcs": gcs, "dash": dash, "env": env, "temp": temp}
    finally:
        for p in reversed(procs):  # ray start --block kills its node's processes on SIGTERM
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # the worker node's processes name the head's session dir (under our temp dir) too
        deadline = time.time() + 20
        while procs_with(temp) and time.time() < deadline:
            time.sleep(0.5)
        for pid in procs_with(temp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


def _cli(*args, env, timeout=600):
    p = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def _status(out: str) -> dict:
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in STAGES and len(parts) >= 4 and parts[1] in ("ran", "cached"):
            rows[parts[0]] = parts[1]
    return rows


@pytest.mark.slow  # ~2.5 min with its cluster: the default suite keeps under 20 min on 2 cores (make test-slow)
def test_job_submit_then_direct_connect(two_nodes, tmp_path):
    pipe = write_pipeline(tmp_path / "pipeline.yaml")
    storage = tmp_path / "store"  # absolute: the job runs in its own working dir
    env = two_nodes["env"]

    # (a) submitted as a Ray job through the head's job server
    t0 = time.time()
    rc, out, err = _cli("run", str(pipe), "--storage", str(storage),
                        "--address", f"http://127.0.0.1:{two_nodes['dash']}", env=env)
    t_job = time.time() - t0
    both = out + err
    assert rc == 0, both[-4000:]
    assert re.search(r"submitted job \S+ to http://127\.0\.0\.1", both), both[-2000:]
    assert "SUCCEEDED" in both, both[-2000:]
    assert "(2 CPUs, 2 node(s))" in both, both[-4000:]  # the job's driver saw the two-node cluster
    assert _status(both) == {s: "ran" for s in STAGES}, both[-4000:]
    for s in STAGES:
        assert (storage / s / "manifest.json").exists(), s
    pre = json.loads((storage / "pretrain" / "manifest.json").read_text())
    assert pre["config"]["num_workers"] == 2
    assert pre["metrics"]["steps"] == 4
    # 2 workers x 1 CPU on 1-CPU nodes: one training worker per node (Ray's state API keeps dead actors)
    from ray.util.state import list_actors

    workers = [a for a in list_actors(address=f"http://127.0.0.1:{two_nodes['dash']}", detail=True, limit=1000)
               if "TrainWorker" in a.class_name]
    assert len(workers) == 2 and len({a.node_id for a in workers}) == 2, workers
    ev = json.loads((storage / "evaluate" / "manifest.json").read_text())
    assert ev["upstream"]["pretrain"] == pre["content_hash"]

    # (b) this process connects to the cluster's GCS directly: everything is cached
    t1 = time.time()
    rc, out, err = _cli("run", str(pipe), "--storage", str(storage),
                        "--address", f"127.0.0.1:{two_nodes['gcs']}", env=env)
    t_direct = time.time() - t1
    assert rc == 0, (out + err)[-4000:]
    assert _status(out) == {s: "cached" for s in STAGES}, out
    print(f"\n[two_node] job submit run {t_job:.1f}s, direct cached run {t_direct:.1f}s")
