"""The training data of one pretrain worker: its images (and GenView masks and variations) read from the
stage outputs' Parquet shards, and :class:`ViewFeeder`, which builds each step's views in a background
thread so augmentation overlaps the step. Pure PyArrow/NumPy/PyTorch (no Ray): the pretrain stage's Ray
Train loop creates one per worker."""
from __future__ import annotations

import io
import queue
import threading
import time


def load_images(paths: list[str], resolution: int):
    import numpy as np
    import pyarrow.parquet as pq

    from tasks.data.images import batch_to_array

    ids, labels, imgs = [], [], []
    for p in paths:
        cols = [c for c in ("id", "image", "label") if c in pq.read_schema(p).names]
        t = pq.read_table(p, columns=cols)  # not the curate table's other columns
        ids += t["id"].to_pylist()
        labels += t["label"].to_pylist() if "label" in t.column_names else [""] * t.num_rows
        imgs.append(batch_to_array(t["image"].to_pylist(), resolution))
    return ids, labels, np.concatenate(imgs) if imgs else np.zeros((0, resolution, resolution, 3), np.uint8)


def load_masks(paths: list[str], ids: list[str], resolution: int):
    """Foreground masks from the views output, aligned with ``ids``, as float ``[N, R, R]`` at the images'
    resolution (the masks are in the same square frame as the images, at the masks stage's resolution)."""
    import numpy as np
    import pyarrow.parquet as pq

    by_id = {}
    for p in paths:
        t = pq.read_table(p, columns=["id", "mask"])
        by_id.update(zip(t["id"].to_pylist(), t["mask"].to_pylist()))
    missing = [i for i in ids if not by_id.get(i)]
    if missing:
        raise ValueError(f"quality weighting needs a mask per image; {len(missing)} have none (e.g. {missing[0]})")
    return np.stack([_png_to_float(by_id[i], resolution) for i in ids]) if ids else \
        np.zeros((0, resolution, resolution), np.float32)


def load_variations(paths: list[str], ids: list[str], resolution: int, with_masks: bool):
    """GenView variations from the views output, aligned with ``ids``: per image a uint8 ``[V, R, R, 3]``
    array (V = 0 when it has none) and, ``with_masks``, their float foreground masks ``[V, R, R]``."""
    import numpy as np
    import pyarrow.parquet as pq

    from tasks.data.images import batch_to_array

    cols = ["id", "view_images"] + (["view_masks"] if with_masks else [])
    by_id = {}
    for p in paths:
        if "view_images" not in pq.read_schema(p).names:
            return None, None
        t = pq.read_table(p, columns=cols)
        for r in t.to_pylist():
            by_id[r["id"]] = r
    views = [batch_to_array(by_id[i]["view_images"] if i in by_id else [], resolution) for i in ids]
    if not any(len(v) for v in views):
        return None, None
    masks = None
    if with_masks:
        masks = [np.stack([_png_to_float(m, resolution) for m in by_id[i]["view_masks"]]) if i in by_id and by_id[i]["view_masks"]
                 else np.zeros((0, resolution, resolution), np.float32) for i in ids]
    return views, masks


def load_clusters(paths: list[str], ids: list[str]):
    """The cluster stage's assignment of each image, aligned with ``ids``: int64 ``[N]``."""
    import numpy as np
    import pyarrow.parquet as pq

    by_id = {}
    for p in paths:
        t = pq.read_table(p, columns=["id", "cluster"])
        by_id.update(zip(t["id"].to_pylist(), t["cluster"].to_pylist()))
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} curated images have no cluster assignment (e.g. {missing[0]}): "
                         f"rerun the cluster stage")
    return np.array([by_id[i] for i in ids], dtype=np.int64)


def _png_to_float(data: bytes, resolution: int):
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L").resize((resolution, resolution), Image.Resampling.BILINEAR), np.float32) / 255.0


class ViewFeeder:
    """Background thread: per step, the worker's batch indices -> augmented views (prefetch 2)."""

    def __init__(self, images, per_worker: int, rank: int, world: int, seed: int, start_step: int, max_steps: int,
                 augments: list, channels_last: bool = False, masks=None, variations=None, variation_masks=None,
                 prob_generated: float = 0.0, collate=None, image_inputs: dict | None = None, overlap=None,
                 geometry: bool = False):
        import numpy as np

        from tasks.data.transforms import MultiView, geometry_tensor
        from tasks.pretrain.quality import crop_masks

        import torch

        self.np, self.torch, self.crop_masks, self.geometry_tensor = np, torch, crop_masks, geometry_tensor
        self.images, self.per, self.rank, self.world, self.seed = images, per_worker, rank, world, seed
        self.steps_per_epoch = max(1, len(images) // (per_worker * world))
        # overlap: crops drawn jointly so that they overlap (NeCo); geometry: each view's crop box goes to the
        # method as inputs["boxes"] [B, V, 5]
        self.views = MultiView(augments, seed=seed * 1000 + rank + 7919 * start_step, overlap=overlap)
        self.geometry = geometry
        self.channels_last = channels_last
        self.masks = masks  # [N, R, R] float foreground masks in the images' frame, or None
        # GenView: per image its generated variations [V, R, R, 3] (and their masks), or None
        self.variations, self.variation_masks, self.prob_generated = variations, variation_masks, prob_generated
        # the method's per-step inputs (token masks) for the global batch; each rank keeps its images' rows
        self.collate = collate
        self.image_inputs = image_inputs or {}  # per-image arrays [N, ...] handed to the method (MoCE: cluster ids)
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.t = threading.Thread(target=self._work, args=(start_step, max_steps), daemon=True)
        self.t.start()

    def indices(self, step: int):
        epoch, i = divmod(step, self.steps_per_epoch)
        perm = self.np.random.default_rng(self.seed + epoch).permutation(len(self.images))
        glob = perm[i * self.per * self.world:(i + 1) * self.per * self.world]
        # each rank a contiguous slice of the global batch: global semantics, and groups of consecutive
        # images (MixedAE's mixing groups) stay on one rank
        return glob[self.rank * self.per:(self.rank + 1) * self.per]

    def _sources(self, idx, step: int):
        """Per view, the images to augment, and per the first two views their masks (GenView's pairing: one
        of the two slots may show a generated variation, METHODS.md 1.2)."""
        originals = [self.images[j] for j in idx]
        masks = [self.masks[j] for j in idx] if self.masks is not None else None
        if self.variations is None:
            return [originals] * self.views.num_views, [masks, masks]
        from tasks.views.pairing import pick_variation_slots, view_sources

        rng = self.np.random.default_rng([self.seed, self.rank, step])  # a pure function of the step: resumable
        slot, which = pick_variation_slots(self.np.array([len(self.variations[j]) for j in idx]), self.prob_generated, rng)
        sources = view_sources(originals, [self.variations[j] for j in idx], slot, which, self.views.num_views)
        if masks is not None:
            masks = view_sources(masks, [self.variation_masks[j] for j in idx], slot, which, 2)
        return sources, masks if masks is not None else [None, None]

    def _work(self, start: int, stop: int) -> None:
        # (no torch.set_num_threads here: it is process-wide and would throttle the training step)
        for step in range(start, stop):
            idx = self.indices(step)
            extra = {}
            sources, masks = self._sources(idx, step)
            if self.masks is None and not self.geometry:
                views = self.views(sources, per_view=True)
            else:
                views, geoms = self.views(sources, with_geometry=True, per_view=True)
                if self.masks is not None:  # masks follow the first two views' crops and flips
                    extra["masks"] = [self.crop_masks(masks[v], geoms[v], self.views.augments[v].size) for v in (0, 1)]
                if self.geometry:
                    extra.setdefault("inputs", {})["boxes"] = self.geometry_tensor(geoms)
            if self.collate is not None:
                made = self.collate(self.per * self.world, step, self.seed)
                extra.setdefault("inputs", {}).update(
                    {k: v[self.rank * self.per:(self.rank + 1) * self.per] for k, v in made.items()})
            for k, v in self.image_inputs.items():
                extra.setdefault("inputs", {})[k] = self.torch.from_numpy(v[idx])
            if self.channels_last:  # the NHWC copy happens here, off the training step's critical path
                views = [v.contiguous(memory_format=self.torch.channels_last) for v in views]
            self.q.put((views, extra))

    def next(self):
        t0 = time.perf_counter()
        v = self.q.get()
        return v, time.perf_counter() - t0
