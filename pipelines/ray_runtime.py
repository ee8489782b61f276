"""Ray start-up / connection, and job submission to an existing cluster's job server."""
from __future__ import annotations

import os
import sys
import time

from pipelines.dag import ROOT


def quiet_state_api_warning() -> None:
    """Worker setup hook of the dashboard-less local cluster: drop Ray Train's placement-group cleaner warning
    that the State API (served by the dashboard) is unavailable; every other record passes."""
    import logging

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "State API may be temporarily unavailable" not in record.getMessage()

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").addFilter(_Drop())


class RayRuntime:
    """Starts (or connects to) Ray only when a stage actually has to run."""

    def __init__(self, address: str | None):
        self.address = address
        self.started = False

    def ensure(self) -> None:
        # torch before ray: loaded after Ray's native libraries (as in a Ray job's driver), libtorch_cpu can
        # fail to dlopen ("Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so", static TLS exhausted)
        import torch  # noqa: F401
        import ray

        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
        # No dashboard for the local cluster (start-up time and memory); Ray Train's placement-group cleaner
        # then warns every few seconds that the State API is unavailable, which is true and harmless: a worker
        # setup hook drops that one message (local cluster only).
        kwargs = dict(include_dashboard=False, log_to_driver=True, configure_logging=True, logging_level="WARNING")
        env_vars = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "SSLFORGE_DEBUG", "OMP_NUM_THREADS") if k in os.environ}
        runtime_env = {"env_vars": env_vars} if env_vars else None
        address = self.address or os.environ.get("RAY_ADDRESS")
        t0 = time.time()
        if address:
            # inside a Ray job the job's runtime env (working_dir, env_vars) is merged with ours; the same env var
            # in both is a conflict unless overriding is allowed (ours carry the same values)
            os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, logging_level="WARNING")
        else:
            local_env = {**(runtime_env or {}), "worker_process_setup_hook": "pipelines.ray_runtime.quiet_state_api_warning"}
            ray.init(num_cpus=os.cpu_count(), runtime_env=local_env, **kwargs)
        self.started = True
        print(f"[ray] {'connected to ' + address if address else 'local cluster started'} "
              f"({ray.cluster_resources().get('CPU', 0):.0f} CPUs, {len(ray.nodes())} node(s)) in {time.time() - t0:.1f}s",
              file=sys.stderr, flush=True)

    def shutdown(self) -> None:
        if self.started:
            import ray

            ray.shutdown()


JOB_EXCLUDES = [".git", "sslforge-data", ".sslforge", "mlruns", "*.db", "bench-out", "__pycache__", ".venv", ".dvc/cache"]


def submit_job(address: str, argv: list[str]) -> int:
    """Submit ``sslforge`` with the same arguments (minus --address) as a Ray job and follow its logs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--address":
            skip = True
            continue
        if a.startswith("--address="):
            continue
        args.append(a)
    import shlex

    entry = f"{shlex.quote(sys.executable)} -m pipelines.cli " + " ".join(shlex.quote(a) for a in args)
    client = JobSubmissionClient(address)
    env_vars = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "SSLFORGE_DEBUG") if k in os.environ}
    job_id = client.submit_job(entrypoint=entry, runtime_env={"working_dir": str(ROOT), "excludes": JOB_EXCLUDES,
                                                               "env_vars": env_vars})
    print(f"[ray] submitted job {job_id} to {address}", file=sys.stderr, flush=True)
    import asyncio

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except Exception:  # noqa: BLE001 - log tailing is best effort; the status below decides
        pass
    while True:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(1)
    print(f"[ray] job {job_id}: {status}", file=sys.stderr)
    return 0 if status == JobStatus.SUCCEEDED else 1


def actor_pool_size(limit: int = 0, reserve: int = 1) -> int:
    """Actors for a map stage. ``reserve=1`` leaves one CPU for read tasks, or a small cluster deadlocks
    (every CPU held by an idle actor while the read task that would feed it waits for one); a dataset built
    from tables already in the object store (``from_arrow``) has no read tasks and can use ``reserve=0``."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    n = max(1, cpus - reserve)
    return min(n, limit) if limit else n


def timed_blocks(ds, timing: dict, t0: float | None = None):
    """Yield a Ray Data dataset's output blocks (pyarrow) as they finish; when the iteration ends, ``timing``
    holds ``seconds`` from ``t0`` (default: this call) to the last block, ``first_s`` to the first block
    (actor start-up, model load, one block of work) and, with more than one block, ``warm_images_per_s`` =
    rows after the first block / time after it -- the rate a long run approaches once start-up is paid."""
    t0 = time.perf_counter() if t0 is None else t0
    t_first, first_rows, rows = None, 0, 0
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        if t_first is None:
            t_first, first_rows = time.perf_counter(), block.num_rows
        rows += block.num_rows
        yield block
    t_end = time.perf_counter()
    timing.update(seconds=t_end - t0, first_s=(t_first or t_end) - t0)
    if rows > first_rows and t_end > t_first:
        timing["warm_images_per_s"] = (rows - first_rows) / (t_end - t_first)


def collect_timed(ds) -> tuple:
    """A dataset's whole output as one table, with :func:`timed_blocks`' timing."""
    import pyarrow as pa

    timing: dict = {}
    parts = list(timed_blocks(ds, timing))
    return (pa.concat_tables(parts) if parts else pa.table({})), timing


def in_blocks(table, rows: int, actors: int = 0, per_actor: int = 4) -> list:
    """A table cut into blocks (zero-copy slices) for ``ray.data.from_arrow``: one block is one unit of work
    (one task on an actor), so a single-block dataset would feed a single actor of the pool.

    ``rows`` per block; with ``actors``, blocks grow to about ``per_actor`` per actor (never below ``rows``):
    for light per-row work (a small ViT's masks) each task's fixed cost -- scheduling, moving the block through
    the object store -- otherwise dominates, while a few blocks per actor still balance the load.
    ``map_batches(batch_size=...)`` still calls the model on batches of its own size inside each block."""
    if actors:
        rows = max(rows, -(-table.num_rows // (actors * per_actor)))
    return [table.slice(i, rows) for i in range(0, table.num_rows, rows)] or [table]


def read_stage(storage, stage: str, columns: list[str], table: str = "data"):
    """A Ray Dataset over a committed stage table; read tasks take a fraction of a CPU (see above)."""
    import ray

    return ray.data.read_parquet(storage.table_paths(stage, table), columns=columns,
                                 num_cpus=0.25)
