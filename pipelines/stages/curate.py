"""curate: list/read the input with Ray Data, decode and validate each image, dedup, quarantine the rest.

Every input item ends in exactly one place: ``data`` (kept), ``duplicates`` or ``quarantine`` (with its
reason), so ``seen = kept + duplicates + quarantined`` always holds.
"""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines import sources
from pipelines.ray_runtime import actor_pool_size
from tasks.curation.dedup import dedup_table
from tasks.data.decode import SUPPORTED_EXTENSIONS, decode_batch, label_from_path
from tasks.data.listing import list_images

OUT_SCHEMA = pa.schema([
    ("ok", pa.bool_()), ("id", pa.string()), ("source", pa.string()), ("relpath", pa.string()),
    ("label", pa.string()), ("image", pa.binary()), ("width", pa.int32()), ("height", pa.int32()),
    ("format", pa.string()), ("reason", pa.string()),
])


class DecodeFiles:
    """Ray Data callable: read each listed file (never raising) and decode it."""

    def __init__(self, fs_uri: str | None, limits: dict):
        self.limits = limits
        self.fs = pafs.FileSystem.from_uri(fs_uri)[0] if fs_uri else None

    def _read(self, path: str):
        try:
            if self.fs is not None:
                with self.fs.open_input_stream(path) as f:
                    return f.read(), ""
            with open(path, "rb") as f:
                return f.read(), ""
        except Exception as e:  # noqa: BLE001 - an unreadable file is quarantined, not fatal
            return None, f"unreadable: {type(e).__name__}: {e}"

    def __call__(self, batch: dict) -> pa.Table:
        srcs = [str(s) for s in batch["source"]]
        datas, read_fail = [], {}
        for s in srcs:
            data, reason = self._read(s)
            if data is None:
                read_fail[s] = reason
            datas.append(data)
        keep = [i for i, d in enumerate(datas) if d is not None]
        sub = {"source": [srcs[i] for i in keep], "bytes": [datas[i] for i in keep],
               "label": [str(batch["label"][i]) for i in keep]}
        return _merge(batch, sub, read_fail, self.limits)


class DecodeColumn:
    """Ray Data callable for Parquet input: image bytes already in a column."""

    def __init__(self, limits: dict):
        self.limits = limits

    def __call__(self, batch: dict) -> pa.Table:
        sub = {"source": [str(s) for s in batch["source"]], "bytes": [b or b"" for b in batch["bytes"]],
               "label": [str(x) for x in batch["label"]]}
        return _merge(batch, sub, {}, self.limits)


def _merge(batch: dict, sub: dict, read_fail: dict, limits: dict) -> pa.Table:
    accepted, rejected = decode_batch(sub, **limits)
    rel = {str(s): str(r) for s, r in zip(batch["source"], batch["relpath"])}
    rows = []
    for i in range(len(accepted["source"])):
        s = accepted["source"][i]
        rows.append({"ok": True, "id": accepted["id"][i], "source": s, "relpath": rel[s], "label": accepted["label"][i],
                     "image": accepted["image"][i], "width": accepted["width"][i], "height": accepted["height"][i],
                     "format": accepted["format"][i] or "", "reason": ""})
    for s, r in list(zip(rejected["source"], rejected["reason"])) + list(read_fail.items()):
        rows.append({"ok": False, "id": "", "source": s, "relpath": rel[s], "label": "", "image": b"", "width": 0,
                     "height": 0, "format": "", "reason": r})
    return pa.Table.from_pylist(rows, schema=OUT_SCHEMA)


def _list_input(uri: str):
    """Return (items table for Ray Data, listing rejections, filesystem uri or None)."""
    if "://" in uri and not uri.startswith("file://"):
        fs, root = pafs.FileSystem.from_uri(uri)
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        files = sorted(i.path for i in infos if i.type == pafs.FileType.File
                       and os.path.splitext(i.path)[1].lower().lstrip(".") in SUPPORTED_EXTENSIONS)
        return files, [], root, uri
    root = uri[len("file://"):] if uri.startswith("file://") else uri
    files, bad = list_images(root)
    return files, bad, root, None


def run(ctx) -> dict:
    import ray

    cfg = ctx.cfg
    limits = dict(max_side=cfg.max_side, min_side=cfg.min_side, max_pixels=cfg.max_pixels)
    uri = cfg.input
    if sources.is_builtin(uri):
        uri = sources.materialize_builtin(ctx.storage, cfg.sample_size, cfg.sample_resolution)
    parallelism = max(2, int(ray.cluster_resources().get("CPU", 2)))
    listing_rejects: list = []
    if os.path.isfile(uri) or uri.endswith(".parquet"):
        ds = ray.data.read_parquet(uri, include_paths=True, num_cpus=0.25)
        cols = ds.schema().names
        if cfg.image_column not in cols:
            from tasks.config import ConfigError

            raise ConfigError(f"curate.image_column: column {cfg.image_column!r} not in {uri} (columns: {', '.join(cols)})")
        label_col = cfg.labels.split(":", 1)[1] if cfg.labels.startswith("column:") else None
        name_col = next((c for c in ("source", "name", "filename") if c in cols), None)

        def prep(batch: dict) -> dict:
            n = len(batch[cfg.image_column])
            paths = [str(p) for p in batch["path"]]
            names = [str(x) for x in batch[name_col]] if name_col else [f"{paths[i]}#{i}" for i in range(n)]
            return {"source": names, "relpath": names, "bytes": list(batch[cfg.image_column]),
                    "label": [str(x) for x in batch[label_col]] if label_col else [""] * n}

        ds = ds.map_batches(prep, batch_format="numpy", num_cpus=0.25).map_batches(
            DecodeColumn, fn_constructor_kwargs={"limits": limits}, concurrency=actor_pool_size(), batch_size=64)
        seen_extra = 0
    else:
        files, listing_rejects, root, fs_uri = _list_input(uri)
        items = [{"source": f, "relpath": os.path.relpath(f, root),
                  "label": label_from_path(f, root) if cfg.labels == "folder" else ""} for f in files]
        ctx.log(f"{len(files)} image files listed under {uri} ({len(listing_rejects)} rejected while listing)")
        if not items:
            items_table = pa.Table.from_pylist([], schema=OUT_SCHEMA)
            ds = None
        else:
            ds = ray.data.from_items(items, override_num_blocks=min(len(items), parallelism * 4)).map_batches(
                DecodeFiles, fn_constructor_kwargs={"fs_uri": fs_uri, "limits": limits},
                concurrency=parallelism, batch_size=32)
        seen_extra = len(listing_rejects)
    table = pa.concat_tables([pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b
                              for b in ds.iter_batches(batch_format="pyarrow", batch_size=None)]) if ds is not None else items_table
    table = table.cast(OUT_SCHEMA) if table.num_rows else pa.Table.from_pylist([], schema=OUT_SCHEMA)
    ok = table.filter(table["ok"])
    rejected = table.filter(pa.compute.invert(table["ok"]))
    kept, dups = dedup_table(ok.drop_columns(["ok", "reason"]))
    quarantine = pa.Table.from_pylist(
        [{"source": s, "reason": r} for s, r in zip(rejected["source"].to_pylist(), rejected["reason"].to_pylist())]
        + [{"source": s, "reason": r} for s, r in listing_rejects],
        schema=pa.schema([("source", pa.string()), ("reason", pa.string())]))
    w = ctx.writer
    w.shard_rows = cfg.shard_rows
    w.write_table("data", kept)
    w.write_table("duplicates", dups.select([c for c in ("source", "reason", "id") if c in dups.column_names]),
                  sort_by="source")
    w.write_table("quarantine", quarantine, sort_by="source")
    counts = {"seen": table.num_rows + seen_extra, "kept": kept.num_rows, "duplicates": dups.num_rows,
              "quarantined": quarantine.num_rows}
    assert counts["seen"] == counts["kept"] + counts["duplicates"] + counts["quarantined"], counts
    labels = sorted(set(kept["label"].to_pylist()) - {""})
    reasons: dict[str, int] = {}
    for r in quarantine["reason"].to_pylist():
        code = r.split(":", 1)[0]
        reasons[code] = reasons.get(code, 0) + 1
    ctx.log(f"seen {counts['seen']}, kept {counts['kept']}, duplicates {counts['duplicates']}, "
            f"quarantined {counts['quarantined']} {reasons if reasons else ''}")
    return {"counts": counts, "labels": labels, "input": cfg.input, "resolved_input": uri,
            "quarantine_reasons": reasons, "metrics": {"kept": counts["kept"], "quarantined": counts["quarantined"]}}
