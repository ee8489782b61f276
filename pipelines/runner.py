"""Runs the stage graph: cache decisions, Ray, MLflow runs, manifests and the summary."""
from __future__ import annotations

import importlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from pipelines import dag
from pipelines.tracking import Tracker
from tasks.config import PipelineConfig, to_dict
from tasks.store import Storage, StageWriter, cache_key


@dataclass
class StageContext:
    name: str
    cfg: Any  # the stage's typed config section
    pipeline: PipelineConfig
    storage: Storage
    upstream: dict[str, dict]  # upstream stage -> manifest
    writer: StageWriter
    tracker: Tracker
    run_id: str
    cache_key: str
    work_uri: str  # scratch space for resumable work (e.g. Ray Train checkpoints), kept across reruns
    forced: bool = False  # --force: redo the work rather than resume it

    def log(self, msg: str) -> None:
        print(f"[{self.name}] {msg}", file=sys.stderr, flush=True)


@dataclass
class StageReport:
    name: str
    status: str  # "ran" | "cached"
    rows: int
    seconds: float
    run_id: str
    metrics: dict = field(default_factory=dict)


def _stage_module(name: str):
    return importlib.import_module(f"pipelines.stages.{name}")


def run_pipeline(cfg: PipelineConfig, storage: Storage, tracker: Tracker, *, force: set[str] = frozenset(),
                 only: str | None = None, ensure_ray=None, argv: list[str] | None = None) -> tuple[str, list[StageReport]]:
    """Run (or skip) every stage in graph order, or only ``only`` from its recorded upstream outputs."""
    graph = dag.load_graph()
    stages = [only] if only else list(graph)
    reports: list[StageReport] = []
    raw = to_dict(cfg)
    tags = {"sslforge.storage": storage.uri, "sslforge.command": " ".join(argv or [])}
    with tracker.pipeline_run(cfg.name if not only else f"{cfg.name}:{only}",
                              {"name": cfg.name}, tags) as parent_id:
        for name in stages:
            spec = graph[name]
            upstream = {}
            for up in spec.upstream:
                man = storage.manifest(up)
                if man is None:
                    raise StageInputError(f"stage {name!r} needs the output of {up!r}, which is not in {storage.uri}: "
                                          f"run `sslforge run` (or `sslforge stage {up}`) first")
                upstream[up] = man
            section = raw[name]
            code = dag.code_version(name)
            files = external_files(name, section)
            key = cache_key(section, {**{u: m["content_hash"] for u, m in upstream.items()},
                                      **{f"file:{k}": v["sha256"] for k, v in files.items()}}, code)
            existing = storage.manifest(name)
            t0 = time.time()
            if existing and existing.get("cache_key") == key and name not in force:
                with tracker.stage_run(name, {"sslforge.cached": "true",
                                              "sslforge.produced_by": existing.get("mlflow_run_id", ""),
                                              "sslforge.cache_key": key}) as run_id:
                    tracker.log_params(section)
                    _log_inputs(tracker, storage, name, upstream, files)
                    tracker.log_input(f"{name}-output", storage.uri_of(name), existing["content_hash"],
                                      existing["rows"], "output")
                    tracker.log_dict(existing, "manifest.json")
                    tracker.log_metrics(existing.get("metrics", {}))
                reports.append(StageReport(name, "cached", existing["rows"], time.time() - t0, existing.get("mlflow_run_id", ""),
                                           existing.get("metrics", {})))
                print(f"[{name}] cached (inputs and config unchanged)", file=sys.stderr, flush=True)
                continue
            if ensure_ray is not None:
                ensure_ray()
            with tracker.stage_run(name, {"sslforge.cached": "false", "sslforge.cache_key": key}) as run_id:
                tracker.log_params(section)
                _log_inputs(tracker, storage, name, upstream, files)
                writer = storage.writer(name)
                with writer:
                    ctx = StageContext(name, getattr(cfg, name), cfg, storage, upstream, writer, tracker, run_id, key,
                                       storage.uri_of(".work", name), name in force)
                    print(f"[{name}] running", file=sys.stderr, flush=True)
                    result = _stage_module(name).run(ctx) or {}
                    manifest = writer.commit({
                        "cache_key": key,
                        "upstream": {u: m["content_hash"] for u, m in upstream.items()},
                        "files": files,
                        "config": section,
                        "code_version": code,
                        "mlflow_run_id": run_id,
                        "parent_run_id": parent_id,
                        **result,
                    })
                seconds = time.time() - t0
                tracker.log_metrics({**manifest.get("metrics", {}), "stage_seconds": seconds})
                tracker.log_metrics({f"count_{k}": v for k, v in manifest.get("counts", {}).items()})
                tracker.log_dict(manifest, "manifest.json")
                tracker.log_input(f"{name}-output", storage.uri_of(name), manifest["content_hash"], manifest["rows"], "output")
            reports.append(StageReport(name, "ran", manifest["rows"], seconds, run_id, manifest.get("metrics", {})))
        tracker.log_metrics({f"{r.name}.{k}": v for r in reports for k, v in r.metrics.items()
                             if isinstance(v, (int, float))})
    return parent_id, reports


def external_files(stage: str, section: dict) -> dict[str, dict]:
    """The files a stage reads from outside the pipeline: every non-empty ``*checkpoint`` option (start
    weights of a post-training, frozen encoders) and ``*_root`` data folder (hashed by their manifest.csv
    and the sizes of the files it lists). Their SHA-256 goes into the stage's cache key (a file
    changed in place reruns the stage), its manifest and its MLflow inputs (lineage).

    Raises :class:`StageInputError` naming the option for a missing file."""
    import hashlib

    out = {}
    for key, path in section.items():
        if not (isinstance(path, str) and path and (key.endswith("checkpoint") or key.endswith("_root"))):
            continue
        if "://" in path:  # a remote URI: recorded as given (not fetched here)
            out[key] = {"path": path, "sha256": "remote:" + path}
            continue
        h = hashlib.sha256()
        if key.endswith("_root"):  # a data folder (evaluate.seg_root): its manifest and the sizes it lists
            manifest = os.path.join(path, "manifest.csv")
            if not os.path.isfile(manifest):
                raise StageInputError(f"{stage}.{key}: no manifest.csv in {path!r}")
            with open(manifest, "rb") as f:
                text = f.read()
            h.update(text)
            for line in text.decode(errors="replace").splitlines()[1:]:
                for rel in line.split(",")[:2]:
                    full = os.path.join(path, rel.strip())
                    h.update(f"{rel}:{os.path.getsize(full) if os.path.isfile(full) else -1};".encode())
        else:
            if not os.path.isfile(path):
                raise StageInputError(f"{stage}.{key}: no such file {path!r}")
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        out[key] = {"path": os.path.abspath(path), "sha256": h.hexdigest()}
    return out


def _log_inputs(tracker: Tracker, storage: Storage, name: str, upstream: dict[str, dict],
                files: dict[str, dict] | None = None) -> None:
    for key, f in (files or {}).items():
        tracker.log_input(f"{name}.{key}", f["path"], f["sha256"], 0, name)
        tracker.set_tags({f"sslforge.file.{key}.sha256": f["sha256"]})
    for up, man in upstream.items():
        tracker.log_input(f"{up}-output", storage.uri_of(up), man["content_hash"], man["rows"], name)
        tracker.set_tags({f"sslforge.upstream.{up}.run_id": man.get("mlflow_run_id", ""),
                          f"sslforge.upstream.{up}.content_hash": man["content_hash"]})


class StageInputError(RuntimeError):
    """A stage's upstream output is missing."""


def format_summary(parent_id: str, reports: list[StageReport], tracker: Tracker) -> str:
    lines = [f"{'stage':<10} {'status':<7} {'rows':>7} {'seconds':>8}"]
    for r in reports:
        lines.append(f"{r.name:<10} {r.status:<7} {r.rows:>7} {r.seconds:>8.1f}")
    final = next((r for r in reversed(reports) if r.name == "evaluate"), None)
    if final and final.metrics:
        lines.append("metrics: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in sorted(final.metrics.items())))
    lines.append(f"mlflow run: {parent_id}")
    lines.append(f"open it:    {tracker.ui_hint(parent_id)}")
    return "\n".join(lines)
