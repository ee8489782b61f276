"""cluster: embed curated images on a Ray Data actor pool, k-means (scikit-learn) in a Ray task."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipelines.ray_runtime import actor_pool_size, read_stage
from tasks.curation.embed import Embedder


def _kmeans_task(emb: np.ndarray, k: int, seed: int) -> dict:
    from tasks.curation.kmeans import kmeans

    return kmeans(emb, k, seed)


def run(ctx) -> dict:
    import ray

    cfg = ctx.cfg
    ds = read_stage(ctx.storage, "curate", ["id", "image"])
    pool = actor_pool_size()
    emb = ds.map_batches(Embedder, fn_constructor_kwargs=dict(encoder=cfg.encoder, checkpoint=cfg.checkpoint,
                                                              resolution=cfg.resolution, seed=cfg.seed,
                                                              **cfg.encoder_kwargs),
                         concurrency=pool, batch_size=cfg.batch_size, num_cpus=1)
    table = emb.to_arrow_refs()
    table = pa.concat_tables(ray.get(table)).sort_by("id")
    x = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    ctx.log(f"embedded {len(x)} images ({x.shape[1]}-d), k-means k={cfg.k}")
    res = ray.get(ray.remote(_kmeans_task).remote(x, cfg.k, cfg.seed))
    sizes = np.bincount(res["assign"], minlength=cfg.k)
    ctx.writer.write_table("data", pa.table({"id": table["id"], "cluster": pa.array(res["assign"], pa.int32()),
                                             "distance": pa.array(res["distance"], pa.float32())}))
    ctx.writer.write_table("centroids", pa.table({"cluster": pa.array(np.arange(cfg.k), pa.int32()),
                                                  "centroid": [c.tolist() for c in res["centroids"]]}), sort_by=None)
    # balance of the assignment (MoCE trains one expert per group of clusters): normalised entropy of the
    # cluster sizes (1 = all equal) and the largest cluster over the mean size
    share = sizes[sizes > 0] / len(x)
    balance = float(-(share * np.log(share)).sum() / np.log(cfg.k)) if cfg.k > 1 else 1.0
    from pipelines.plots import histogram_figure

    ctx.tracker.log_figure(histogram_figure(sizes, f"cluster sizes (k={cfg.k}, {len(x)} images)", "cluster",
                                            "images"), "cluster_sizes.png")
    return {"counts": {"images": len(x), "clusters": cfg.k},
            "metrics": {"inertia": res["inertia"], "cluster_size_min": int(sizes.min()),
                        "cluster_size_max": int(sizes.max()), "cluster_balance": balance,
                        "cluster_max_over_mean": float(sizes.max() / max(sizes.mean(), 1e-12))}}
