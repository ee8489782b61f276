"""Registry of pretraining methods: name -> "module:Class". Import is lazy so config validation and
``--help`` stay fast (importing torch costs seconds). Each method is one file in this package and
implements :class:`tasks.pretrain.methods.base.Method`."""
from __future__ import annotations

import importlib

METHODS: dict[str, str] = {
    "mocov2": "tasks.pretrain.methods.mocov2:MoCoV2",
}


def get_method(name: str):
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)
