"""MLflow lineage: one parent run per pipeline execution, one nested run per stage.

Only the driver (and rank 0 of Ray Train, through ``worker_run``) talks to MLflow. A stage run records
its resolved config as params, its upstream outputs as inputs (digest = content hash, source = URI),
its metrics, and its manifest as an artifact. A cached stage still gets a run, tagged ``sslforge.cached``
and linked to the run that produced the output, so lineage can always be walked.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Any, Iterator

from tasks.config import ConfigError

DIGEST_LEN = 32  # MLflow stores dataset digests in a 36-character column


def default_tracking_uri(storage_uri: str) -> str:
    if "://" in storage_uri and not storage_uri.startswith("file://"):
        base = os.path.abspath(".sslforge")
    else:
        base = os.path.abspath(storage_uri.replace("file://", ""))
    os.makedirs(base, exist_ok=True)
    return f"sqlite:///{base}/mlflow.db"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast with a clear message when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status != 200:
                raise ConfigError(f"--tracking-uri {uri}: server answered {r.status} on /health")
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(f"--tracking-uri {uri}: tracking server unreachable ({reason})") from None


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return out


class Tracker:
    """Thin wrapper so the rest of the pipeline never imports mlflow directly."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: str | None = None):
        import mlflow

        self.mlflow = mlflow
        self.uri = tracking_uri
        mlflow.set_tracking_uri(tracking_uri)
        client = mlflow.MlflowClient()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            if artifact_root is None and tracking_uri.startswith("sqlite:///"):
                artifact_root = "file://" + os.path.join(os.path.dirname(tracking_uri[len("sqlite:///"):]), "mlartifacts")
            exp_id = client.create_experiment(
                experiment,
                artifact_location=artifact_root,
                # opens the classic runs table (parent/child runs, datasets) in the UI
                tags={"mlflow.experimentKind": "custom_model_development"},
            )
        else:
            exp_id = exp.experiment_id
        self.experiment_id = exp_id
        self.client = client

    @contextmanager
    def pipeline_run(self, name: str, params: dict, tags: dict) -> Iterator[str]:
        with self.mlflow.start_run(experiment_id=self.experiment_id, run_name=name, tags=tags) as run:
            self.log_params(params)
            yield run.info.run_id

    @contextmanager
    def stage_run(self, stage: str, tags: dict) -> Iterator[str]:
        with self.mlflow.start_run(experiment_id=self.experiment_id, run_name=stage, nested=True,
                                   tags={"sslforge.stage": stage, **tags}) as run:
            yield run.info.run_id

    def log_params(self, params: dict) -> None:
        flat = {k: (str(v)[:6000]) for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):
            self.mlflow.log_params(dict(items[i:i + 100]))

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if clean:
            self.mlflow.log_metrics(clean, step=step)

    def set_tags(self, tags: dict) -> None:
        self.mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_input(self, name: str, uri: str, content_hash: str, rows: int, stage: str) -> None:
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        source = resolve_dataset_source(uri)
        ds = MetaDataset(source=source, name=name, digest=content_hash[:DIGEST_LEN])
        self.mlflow.log_input(ds, context=stage, tags={"rows": str(rows), "content_hash": content_hash})

    def log_dict(self, obj: dict, path: str) -> None:
        self.mlflow.log_dict(obj, path)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self.mlflow.log_artifact(local_path, artifact_path)

    def log_figure(self, fig, path: str) -> None:
        import matplotlib.pyplot as plt

        try:
            self.mlflow.log_figure(fig, path)
        finally:
            plt.close(fig)  # pyplot keeps every figure alive until closed

    def log_encoder(self, model, registered_name: str | None, input_example=None) -> dict:
        """Log a torch encoder as an MLflow model (and register it); returns its URIs."""
        import mlflow.pytorch

        info = mlflow.pytorch.log_model(model, name="encoder", registered_model_name=registered_name,
                                        input_example=input_example)
        out = {"model_uri": info.model_uri}
        if registered_name and getattr(info, "registered_model_version", None):
            out["registered"] = f"models:/{registered_name}/{info.registered_model_version}"
        return out

    def ui_hint(self, run_id: str) -> str:
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"
        return (f"mlflow ui --backend-store-uri {self.uri}  then open "
                f"http://127.0.0.1:5000/#/experiments/{self.experiment_id}/runs/{run_id}")
