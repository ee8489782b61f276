"""views: per image, the noise level from the foreground ratio and the view sources for pretraining.

With ``generator: none`` (GenView off) both views are augmentations of the original image; the table
still records the noise level each image would get, so the diffusion generator plugs in here later.
"""
from __future__ import annotations

import pyarrow as pa

from tasks.views.noise import noise_level


def run(ctx) -> dict:
    cfg = ctx.cfg
    masks = ctx.storage.read_table("masks", columns=["id", "fg_ratio", "mask"])
    levels = [noise_level(r, cfg.noise_bins, cfg.noise_levels) for r in masks["fg_ratio"].to_pylist()]
    table = pa.table({"id": masks["id"], "fg_ratio": masks["fg_ratio"], "noise_level": pa.array(levels, pa.int32()),
                      "generated": pa.array([False] * len(levels)), "view_image": pa.array([b""] * len(levels), pa.binary()),
                      # the foreground mask travels with the views: GenView's quality weighting crops it
                      # with each view's geometry in the pretrain stage
                      "mask": masks["mask"]})
    ctx.writer.write_table("data", table)
    hist = {str(lv): levels.count(lv) for lv in cfg.noise_levels}
    return {"counts": {"images": table.num_rows, "generated": 0}, "noise_histogram": hist,
            "metrics": {f"noise_{k}": v for k, v in hist.items()}}
