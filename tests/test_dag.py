"""The stage graph is declared once (dvc.yaml); the CLI's graph, configs and stage modules agree with it."""
from __future__ import annotations

import importlib

import yaml

from pipelines.dag import DVC_YAML, code_version, downstream_closure, load_graph
from tasks.config import SECTIONS, PipelineConfig


def test_graph_matches_dvc_yaml_and_code():
    graph = load_graph()
    doc = yaml.safe_load(DVC_YAML.read_text())
    assert list(graph) == list(doc["stages"]) == list(SECTIONS)
    for name, spec in graph.items():
        st = doc["stages"][name]
        assert st["cmd"].startswith(f"sslforge stage {name} ")
        assert spec.params == (name,) and hasattr(PipelineConfig(), name)
        assert [list(o)[0] for o in st["outs"]] == [f"${{storage}}/{name}"]
        assert callable(importlib.import_module(f"pipelines.stages.{name}").run)
        assert f"pipelines/stages/{name}.py" in spec.code


def test_issue_order_and_downstream():
    graph = load_graph()
    assert list(graph) == ["curate", "cluster", "masks", "views", "pretrain", "evaluate"]
    assert downstream_closure(graph, {"masks"}) == {"masks", "views", "pretrain", "evaluate"}
    assert downstream_closure(graph, {"evaluate"}) == {"evaluate"}


def test_code_version_is_stable():
    assert code_version("curate") == code_version("curate") != code_version("evaluate")
