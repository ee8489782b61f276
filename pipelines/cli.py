"""``sslforge`` command line: ``run`` the whole DAG, or one ``stage`` from its recorded inputs.

Start-up stays light (no torch/ray/mlflow import) so that ``--help`` and config errors answer at once.
Bad configuration exits with status 2 and one line naming the problem.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

EXIT_CONFIG = 2


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", nargs="?", default=None,
                   help="pipeline YAML (default: ./params.yaml, else the built-in quickstart)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set pretrain.epochs=2")
    p.add_argument("--storage", default="sslforge-data",
                   help="storage root for stage outputs: a folder or a pyarrow/fsspec URI (default: ./sslforge-data)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="rerun STAGE even if its inputs and config are unchanged (repeatable)")
    p.add_argument("--address", default=None,
                   help="existing Ray cluster: ray://HOST:10001, HOST:6379/auto (connect), or http://HEAD:8265 (submit as a Ray job)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: sqlite:///<storage>/mlflow.db with artifacts beside it)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslforge", description="Distributed self-supervised pretraining pipeline "
                                     "(curate -> cluster -> masks -> views -> pretrain -> evaluate) on Ray, tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole DAG (cached stages are skipped)",
                         description="Run the stage DAG on a local Ray cluster (or --address); prints a summary.")
    _common(run)
    stage = sub.add_parser("stage", help="run one stage from its recorded upstream outputs",
                           description="Run a single stage, reading its upstream outputs from the storage root.")
    stage.add_argument("name", help="stage name (see dvc.yaml)")
    _common(stage)
    return parser


def _fail(msg: str, code: int = EXIT_CONFIG) -> int:
    print(f"sslforge: error: {msg}", file=sys.stderr)
    return code


def resolve_pipeline_path(path: str | None) -> str:
    from pipelines.dag import ROOT

    if path:
        return path
    if os.path.exists("params.yaml"):
        return "params.yaml"
    return str(ROOT / "params.yaml")


def load_config(args):
    import yaml

    from tasks.config import ConfigError, load_pipeline

    path = resolve_pipeline_path(args.pipeline)
    if not os.path.exists(path):
        raise ConfigError(f"pipeline file {path!r} not found")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    cfg = load_pipeline(raw, args.overrides)
    return path, cfg


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from tasks.config import ConfigError

    try:
        path, cfg = load_config(args)
        from pipelines.dag import load_graph

        graph = load_graph()
        for s in args.force:
            if s not in graph:
                raise ConfigError(f"--force {s}: unknown stage (stages: {', '.join(graph)})")
        if args.command == "stage" and args.name not in graph:
            raise ConfigError(f"stage {args.name!r}: unknown stage (stages: {', '.join(graph)})")
        from pipelines.sources import check_input

        if args.command == "run" or args.name == "curate":
            check_input(cfg.curate.input)
        if args.address and args.address.startswith(("http://", "https://")):
            from pipelines.ray_runtime import submit_job

            return submit_job(args.address, argv)
        return _run_local(args, cfg, argv)
    except ConfigError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as e:  # noqa: BLE001 - the CLI turns every failure into one readable line
        from pipelines.runner import StageInputError

        if isinstance(e, StageInputError):
            return _fail(str(e))
        if os.environ.get("SSLFORGE_DEBUG"):
            raise
        return _fail(f"{type(e).__name__}: {e} (set SSLFORGE_DEBUG=1 for the traceback)", 1)


def _leave_job_working_dir(storage) -> None:
    """Inside a submitted Ray job the cwd is the job's unpacked working_dir, which Ray may garbage-collect
    while the driver still runs (seen with Ray 2.60 once the Train workers exit: ``os.getcwd()`` then fails
    inside torch imports). Import what the driver needs while it exists, then work from the storage root."""
    if "runtime_resources" not in os.getcwd():
        return
    import importlib

    import torch  # noqa: F401 - before ray, see RayRuntime.ensure

    from pipelines.dag import load_graph

    for name in load_graph():
        importlib.import_module(f"pipelines.stages.{name}")
    for mod in ("pipelines.plots", "tasks.evaluate.classification", "mlflow.pytorch", "timm", "torchvision"):
        importlib.import_module(mod)
    if storage.is_local:
        os.chdir(storage.root)


def _run_local(args, cfg, argv) -> int:
    from pipelines.ray_runtime import RayRuntime
    from pipelines.runner import format_summary, run_pipeline
    from pipelines.tracking import Tracker, check_reachable, default_tracking_uri
    from tasks.store import Storage

    storage = Storage(args.storage)
    _leave_job_working_dir(storage)
    tracking_uri = args.tracking_uri or default_tracking_uri(storage.uri)
    check_reachable(tracking_uri)
    t0 = time.time()
    tracker = Tracker(tracking_uri, cfg.experiment)
    runtime = RayRuntime(args.address)
    try:
        parent, reports = run_pipeline(cfg, storage, tracker, force=set(args.force),
                                       only=args.name if args.command == "stage" else None,
                                       ensure_ray=runtime.ensure, argv=["sslforge", *argv])
    finally:
        runtime.shutdown()
    print(format_summary(parent, reports, tracker))
    print(f"total: {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
