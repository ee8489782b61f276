"""Side-by-side benchmarks: ``python -m bench [NAME] [--quick]``.

Each registered function prints one ``BENCH <figure> <value> <goal>`` line per figure it measures
(comment lines start with ``#``). NAME selects a registry entry or any figure prefix ("mocov2").
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> "module:function"; functions take ``quick: bool``. Imported lazily (torch is slow to import).
REGISTRY: dict[str, str] = {
    "mocov2": "bench.mocov2:run",  # mocov2.step_over_backbone, mocov2.ours_over_lightly[...]
    "aug": "bench.augment:run",  # aug.mocov2_ms_per_view
    "methods": "bench.methods:run",  # mocov3, byol, swav, densecl below, in one run
    "mocov3": "bench.methods:mocov3",  # mocov3.step_over_backbone, mocov3.ours_over_lightly[...]
    "byol": "bench.methods:byol",  # byol.step_over_backbone, byol.ours_over_lightly[...]
    "swav": "bench.methods:swav",  # swav.step_over_backbone, swav.ours_over_lightly[...]
    "densecl": "bench.methods:densecl",  # densecl.step_over_backbone, densecl.step_over_mocov2, ...
    "masked": "bench.masked:run",  # ijepa, mixedae, moce below (each .step_over_mae), in one run
    "ijepa": "bench.masked:ijepa",  # ijepa.step_over_mae
    "mixedae": "bench.masked:mixedae",  # mixedae.step_over_mae
    "moce": "bench.masked:moce",  # moce.step_over_mae (top-1 routing)
    "knn": "bench.knn:run",  # knn.<method>.ours_over_lightly, knn.<method>.ours (after equal CPU budgets)
    "knn_masked": "bench.knn_masked:run",  # knn_masked.<method>.ours (MAE family vs random-init ViT, equal budgets)
    "genview": "bench.genview:run",  # masks.stage_over_loop, views.stage_over_loop (Ray Data vs a plain loop)
    "neco": "bench.neco:run",  # neco.step_over_backbone, hbird.patches_per_s, hbird.faiss_over_torch
    "dense_camvid": "bench.dense_camvid:run",  # dense_camvid.densecl_over_mocov2, dense_camvid.neco_over_start
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("name", nargs="?", default="", help=f"one of {', '.join(REGISTRY)} (default: all)")
    ap.add_argument("--quick", action="store_true", help="small sizes, a few minutes in all")
    args = ap.parse_args(argv)
    key = args.name.split(".")[0]
    selected = [n for n in REGISTRY if not key or n == key]
    if not selected:
        ap.error(f"unknown benchmark {args.name!r}")
    for name in selected:
        module, fn = REGISTRY[name].split(":")
        getattr(importlib.import_module(module), fn)(quick=args.quick)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
