"""NeCo's training step over the bare backbone work of the same crops, and Hummingbird in-context
evaluation throughput.

``neco.step_over_backbone``: one ``train_step`` of NeCo (AdamW, the stage's default precision, 2 torch
threads) on a DINOv2-with-registers ViT-S/14 (random weights: speed does not depend on them), 2 global + 4
local crops, over the bare work those crops need: the student's forward + backward of the 2 global crops
(one pass) and the 4 local ones (one pass) from a fixed gradient on the patch tokens, the teacher's
forward of the 2 global crops (no grad), an AdamW step over the backbone. Full: 224 / 98 px crops, batch 8;
``--quick``: 112 / 56 px, batch 4. The difference is the head, ROI-Align, 10 crop pairs x B x 49 soft sorts
of 49 references for student and teacher (bitonic network, 21 layers), and the EMA/queue update. The
issue states no goal for this figure; it is reported.

``hbird.patches_per_s``: query patches per second of the Hummingbird retrieval + label transfer
(``tasks.evaluate.segmentation.hummingbird``: exact faiss inner-product search, k = 30, softmax
temperature 0.02) for a CamVid-sized problem at 224 px with ViT-S/14 features: 367 memory images and 101
query images of 16 x 16 patches, D = 384, 11 classes (random features and labels: exact search costs the
same whatever they hold); printed with the brute-force torch matmul + topk time of the same search as
``hbird.faiss_over_torch`` (speed-up, > 1 = faiss faster). ``--quick``: 100 memory / 30 query images.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from bench.common import AUTOCAST, autocast, interleaved_medians, median_ratio, precision_name, report, setup_threads

ARCH = "vit_small_patch14_reg4_dinov2"


def _sizes(quick: bool) -> dict:
    return dict(size=112, local=56, batch=4, rounds=4) if quick else dict(size=224, local=98, batch=8, rounds=5)


def _step_bench(quick: bool) -> None:
    from tasks.data.transforms import Overlap
    from tasks.models.backbone import build_backbone
    from tasks.pretrain.loop import build_optimizer, train_step
    from tasks.pretrain.methods import get_method

    sz = _sizes(quick)
    torch.manual_seed(0)
    base, dim = build_backbone(ARCH, img_size=sz["size"], dynamic_img_size=True)
    method = get_method("neco")(copy.deepcopy(base), dim, local_size=sz["local"])
    augs = method.view_augments(sz["size"])
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(sz["batch"], 3, a.size, a.size, generator=g) for a in augs]
    overlap = method.view_overlap or Overlap()
    inputs = []
    for step in range(sz["rounds"] + 2):
        inp = method.collate(sz["batch"], step, 0)
        inp["boxes"] = torch.tensor([[[*b, 0.0] for b in overlap.boxes(augs, 480, 360, g)] for _ in range(sz["batch"])])
        inputs.append(inp)
    opt = build_optimizer(method, "adamw", 1e-5, 0.9, 0.04)
    state = {"i": 0}

    def ours():
        i = state["i"]
        train_step(method, opt, views, i, 1000, 1e-5, autocast_dtype=AUTOCAST, **inputs[i % len(inputs)])
        state["i"] = i + 1

    student = copy.deepcopy(base)
    teacher = copy.deepcopy(base).requires_grad_(False).eval()
    bare_opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    glob, loc = torch.cat(views[:2]), torch.cat(views[2:])
    grads = {}

    def bare():
        from tasks.pretrain.loop import cpu_attention

        bare_opt.zero_grad(set_to_none=True)
        with cpu_attention(student), autocast():
            outs = [student.forward_features(glob), student.forward_features(loc)]
        for k, o in enumerate(outs):
            gr = grads.setdefault(k, torch.randn(o.shape, generator=torch.Generator().manual_seed(k)).to(o.dtype))
            o.backward(gr)
        with torch.no_grad(), autocast():
            teacher.forward_features(glob)
        bare_opt.step()

    print(f"# neco: {ARCH} (random weights) global {sz['size']} px x 2, local {sz['local']} px x 4, batch "
          f"{sz['batch']}, {len(method.pairs())} crop pairs x 49 queries x {method.num_references} references, "
          f"{precision_name()}, AdamW, {sz['rounds']} interleaved rounds after 1 warm-up")
    med, times = interleaved_medians({"ours": ours, "bare": bare}, rounds=sz["rounds"], warmup=1)
    print("# median s/step: " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()))
    # where the time goes: one soft sort of the student's rows (fwd+bwd) at this batch
    from tasks.pretrain.losses.sorting import soft_sort

    x = torch.randn(sz["batch"] * 49 * len(method.pairs()), method.num_references, requires_grad=True)
    t0 = time.perf_counter()
    soft_sort(x, 100.0)[1].sum().backward()
    print(f"# the student's soft sorts alone (fwd + bwd, {x.shape[0]} rows of {x.shape[1]}): "
          f"{time.perf_counter() - t0:.3f} s; the teacher's add a forward")
    report("neco.step_over_backbone", median_ratio(times, "ours", "bare"), "none")


def _hbird_bench(quick: bool) -> None:
    from tasks.evaluate.segmentation import faiss_knn, hummingbird, torch_knn

    n_mem, n_val = (100, 30) if quick else (367, 101)
    grid, d, c = 16, 384, 11
    g = torch.Generator().manual_seed(0)
    train = torch.randn(n_mem, d, grid, grid, generator=g)
    val = torch.randn(n_val, d, grid, grid, generator=g)
    train_m = torch.randint(0, c, (n_mem, 224, 224), generator=g).to(torch.uint8)
    val_m = torch.randint(0, c, (n_val, 224, 224), generator=g).to(torch.uint8)
    r = hummingbird(train, train_m, val, val_m, c, k=30, temperature=0.02)
    mem = F.normalize(train.flatten(2).transpose(1, 2).reshape(-1, d), dim=1)
    q = F.normalize(val.flatten(2).transpose(1, 2).reshape(-1, d), dim=1)
    t0 = time.perf_counter()
    faiss_knn(mem, q, 30)
    t_faiss = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch_knn(mem, q, 30)
    t_torch = time.perf_counter() - t0
    r_torch = hummingbird(train, train_m, val, val_m, c, k=30, temperature=0.02, search="torch")
    same = bool((r_torch["pred"] == r["pred"]).mean() > 0.999)
    print(f"# hbird: memory {r['memory_patches']} patches ({n_mem} images x {grid}x{grid}), {len(q)} query patches, "
          f"D {d}, k 30; search alone: faiss {t_faiss:.2f} s, torch matmul+topk {t_torch:.2f} s; predictions "
          f"{'agree' if same else 'DIFFER'}; retrieval + transfer with search: torch "
          f"{r_torch['patches_per_s']:.0f} patches/s")
    report("hbird.patches_per_s", r["patches_per_s"], "none")
    report("hbird.faiss_over_torch", t_torch / t_faiss, ">=1.0")


def run(quick: bool = False) -> None:
    setup_threads(2)
    _step_bench(quick)
    _hbird_bench(quick)
