"""Registry of pretraining methods: one file per method in this package, ``<name>.py``, which names its
class in a module-level ``METHOD``. The registry lists the files and imports only on use, so config
validation and ``--help`` stay fast (importing torch costs seconds) and adding a method touches no shared
file. Each method implements :class:`tasks.pretrain.methods.base.Method`."""
from __future__ import annotations

import importlib
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
_NOT_METHODS = {"__init__", "base"}

METHODS: dict[str, str] = {
    f[:-3]: f"{__name__}.{f[:-3]}" for f in sorted(os.listdir(_HERE))
    if f.endswith(".py") and not f.startswith("_") and f[:-3] not in _NOT_METHODS
}


def get_method(name: str):
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    return importlib.import_module(METHODS[name]).METHOD
