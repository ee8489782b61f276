"""The stage graph, read from the root ``dvc.yaml`` (declared once, used by both the CLI and DVC)."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DVC_YAML = ROOT / "dvc.yaml"
STORAGE_VAR = "${storage}/"


@dataclass(frozen=True)
class StageSpec:
    name: str
    upstream: tuple[str, ...]  # stages whose outputs this one reads
    code: tuple[str, ...]  # repository paths (files or folders) whose source is the stage's code version
    params: tuple[str, ...]  # params.yaml sections


@lru_cache(maxsize=1)
def load_graph(path: str = str(DVC_YAML)) -> dict[str, StageSpec]:
    """Stages in declaration order (which dvc.yaml keeps topological; checked here)."""
    with open(path) as f:
        doc = yaml.safe_load(f)
    graph: dict[str, StageSpec] = {}
    for name, st in doc["stages"].items():
        deps = [str(d) for d in st.get("deps", [])]
        upstream = tuple(d[len(STORAGE_VAR):] for d in deps if d.startswith(STORAGE_VAR))
        for up in upstream:
            if up not in graph:
                raise ValueError(f"dvc.yaml: stage {name!r} depends on {up!r}, which is not declared before it")
        code = tuple(d for d in deps if not d.startswith(STORAGE_VAR))
        graph[name] = StageSpec(name, upstream, code, tuple(st.get("params", [])))
    return graph


def downstream_closure(graph: dict[str, StageSpec], names: set[str]) -> set[str]:
    out = set(names)
    for name, spec in graph.items():  # declaration order is topological
        if any(u in out for u in spec.upstream):
            out.add(name)
    return out


def upstream_closure(graph: dict[str, StageSpec], name: str) -> list[str]:
    need, stack = set(), [name]
    while stack:
        for u in graph[stack.pop()].upstream:
            if u not in need:
                need.add(u)
                stack.append(u)
    return [s for s in graph if s in need]


@lru_cache(maxsize=None)
def code_version(stage: str) -> str:
    """Hash of the source files the stage declares in dvc.yaml (plus the package version)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("sslforge")
    except PackageNotFoundError:
        pkg = "dev"
    h = hashlib.sha256(pkg.encode())
    for rel in load_graph()[stage].code:
        p = ROOT / rel
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            if f.exists() and "__pycache__" not in f.parts:
                h.update(os.path.relpath(f, ROOT).encode())
                h.update(f.read_bytes())
    return h.hexdigest()
