"""NeCo -- patch neighbour consistency (Pariza, Salehi et al., ICLR 2025, arXiv 2408.11054), per METHODS.md 2.

A post-training of a strong ViT (DINOv2, with or without registers; the start weights come from
``pretrain.init_checkpoint`` or a hub id and are recorded in lineage). Student = the backbone + a projection
head (3-layer MLP D -> 2048 -> 2048 -> 256, GELU) on its last-layer normed patch tokens (prefix tokens --
class, registers -- dropped), L2-normalised; teacher = an EMA copy of both (momentum cosine 0.9995 -> 1),
eval mode, on the two global crops only. For every (teacher global crop g, other crop v) pair the region both
crops show is cut out of the teacher map of g and the student map of v with ROI-Align (7 x 7, aligned, boxes
in feature-map units), giving 49 aligned patches per image. Each aligned patch ranks the same 49 reference
patches (teacher features) by cosine similarity; the ranks are made differentiable with a sorting network
(``tasks/pretrain/losses/sorting.py``; bitonic, cauchy relaxation, steepness 100 for both, as the released
code through diffsort) and the loss is the cross-entropy between the teacher's and the student's soft
permutation matrices, averaged over the 10 crop pairs.

Choices (documented where the paper/code leaves room or where we differ):
* References: 49 teacher patch embeddings per image and pair, drawn uniformly from the filled part of a FIFO
  queue per teacher crop index (8192 long); each step pushes 10 random teacher patches per image of that
  global crop (10 B, as the code). The released queue is per GPU; ours gathers every rank's pushes (as our
  MoCo queue does), and the draws are made on the data side for the global batch (``collate``), so N ranks
  train exactly as one rank with the global batch and a resumed run draws what it would have. Before the
  queue has entries the references come from the current (global) batch's aligned teacher patches.
* Per-pair loss ``-(1 / (B 49 49)) sum_b sum_i sum_j sum_r P^t log P^s``: for each image, the mean over its
  49 query patches i and 49 references j of the cross-entropy over ranks r; ``log`` of ``P^s + 1e-8``.
* A flipped crop (``p_flip > 0`` set by the user) is handled: its box is mirrored and its 7 x 7 grid flipped
  back, so alignment holds; NeCo's own views do not flip.
* Learning rates: the released configs train the backbone at a tenth of the head's rate (ViT-S: 1e-5 and
  1e-4); ``backbone_lr_scale`` (0.1) makes the backbone's optimiser groups run at ``lr * 0.1``, so
  ``pretrain.lr`` is the head's rate. A fresh random head's early gradients would otherwise move the start
  weights as fast as the head learns.
* Similarities, sorting and the loss run in fp32 (outside autocast): bf16's 3 digits would scramble ranks of
  cosines 0.01 apart at steepness 100.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from tasks.data.transforms import Augment, Overlap, neco_views
from tasks.models.vit import patch_size, require_vit
from tasks.pretrain.distributed import all_gather_nograd, world_size
from tasks.pretrain.ema import copy_and_freeze, update_ema
from tasks.pretrain.heads import MLPHead
from tasks.pretrain.losses.infonce import MemoryQueue
from tasks.pretrain.losses.sorting import DISTRIBUTIONS, NETWORKS, soft_sort
from tasks.pretrain.methods.base import Method
from tasks.pretrain.schedules import cosine_schedule

NUM_GLOBAL = 2


def patch_map(backbone: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """L2-normalised projected patch tokens as a map ``[B, C, H / p, W / p]`` (prefix tokens dropped)."""
    p = patch_size(backbone)
    tokens = backbone.forward_features(x)[:, backbone.num_prefix_tokens:]
    z = F.normalize(head(tokens).float(), dim=-1)
    return z.transpose(1, 2).reshape(x.shape[0], -1, x.shape[-2] // p, x.shape[-1] // p)


def intersection_in_crop(boxes: torch.Tensor, g: int, v: int, crop: int, size: int) -> torch.Tensor:
    """The region crops ``g`` and ``v`` both show, in pixel coordinates of crop ``crop`` (one of them),
    resized to ``size``: ``[B, 4]`` (x1, y1, x2, y2). ``boxes`` ``[B, V, 5]``: top, left, height, width,
    flipped in source pixels (:func:`tasks.data.transforms.geometry_tensor`)."""
    a, b, c = boxes[:, g], boxes[:, v], boxes[:, crop]
    y1 = torch.maximum(a[:, 0], b[:, 0])
    x1 = torch.maximum(a[:, 1], b[:, 1])
    y2 = torch.minimum(a[:, 0] + a[:, 2], b[:, 0] + b[:, 2])
    x2 = torch.minimum(a[:, 1] + a[:, 3], b[:, 1] + b[:, 3])
    sy, sx = size / c[:, 2], size / c[:, 3]
    cx1, cx2 = (x1 - c[:, 1]) * sx, (x2 - c[:, 1]) * sx
    flipped = c[:, 4] > 0.5
    cx1, cx2 = torch.where(flipped, size - cx2, cx1), torch.where(flipped, size - cx1, cx2)
    return torch.stack([cx1, (y1 - c[:, 0]) * sy, cx2, (y2 - c[:, 0]) * sy], 1)


def aligned_patches(fmap: torch.Tensor, box: torch.Tensor, flipped: torch.Tensor, patch: int,
                    out: int = 7) -> torch.Tensor:
    """ROI-Align of each image's box (crop pixels) on its map ``[B, C, h, w]`` -> ``[B, out * out, C]``,
    a flipped crop's grid flipped back to the source orientation."""
    rois = torch.cat([torch.arange(len(box), device=box.device, dtype=box.dtype).unsqueeze(1), box], 1)
    cut = roi_align(fmap, rois.to(fmap.dtype), out, spatial_scale=1.0 / patch, sampling_ratio=2, aligned=True)
    cut = torch.where(flipped.view(-1, 1, 1, 1), cut.flip(-1), cut)
    return cut.flatten(2).transpose(1, 2)


def rank_matrices(queries: torch.Tensor, refs: torch.Tensor, steepness: float, network: str,
                  distribution: str) -> torch.Tensor:
    """Soft permutation matrices of each query's cosine similarities to its image's references:
    queries ``[B, Q, C]``, refs ``[B, R, C]`` -> ``[B, Q, R, R]``."""
    sim = torch.einsum("bqc,brc->bqr", F.normalize(queries, dim=-1), F.normalize(refs, dim=-1))
    b, q, r = sim.shape
    return soft_sort(sim.reshape(b * q, r), steepness, network, distribution)[1].view(b, q, r, r)


def permutation_cross_entropy(p_teacher: torch.Tensor, p_student: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per image: mean over queries and references of ``-sum_r P^t log P^s`` -> ``[B]``."""
    ce = -(p_teacher * (p_student + eps).log()).sum(-1)  # [B, Q, R]
    return ce.flatten(1).mean(1)


class NeCo(Method):
    needs_geometry = True  # the feeder hands each view's crop box as inputs["boxes"]

    def __init__(self, backbone: nn.Module, feat_dim: int, *, out_dim: int = 256, hidden_dim: int = 2048,
                 num_local: int = 4, local_size: int | None = None, queue_size: int = 8192, push_per_image: int = 10,
                 num_references: int = 49, roi_size: int = 7, steepness: float = 100.0, network: str = "bitonic",
                 distribution: str = "cauchy", momentum: float = 0.9995, backbone_lr_scale: float = 0.1):
        super().__init__(backbone, feat_dim)
        require_vit(backbone, "neco", dynamic_size=True)
        if network not in NETWORKS or distribution not in DISTRIBUTIONS:
            raise ValueError(f"neco: network must be one of {NETWORKS} and distribution one of {DISTRIBUTIONS}, "
                             f"got {network!r}, {distribution!r}")
        if num_references < 2 or push_per_image < 1 or roi_size < 1 or num_local < 0:
            raise ValueError("neco: num_references >= 2, push_per_image >= 1, roi_size >= 1, num_local >= 0")
        self.patch = patch_size(backbone)
        self.num_local, self.local_size = int(num_local), local_size
        self.num_references, self.roi_size, self.push_per_image = int(num_references), int(roi_size), int(push_per_image)
        self.steepness, self.network, self.distribution = float(steepness), network, distribution
        self.momentum = float(momentum)
        if not backbone_lr_scale > 0:
            raise ValueError(f"neco: backbone_lr_scale must be > 0, got {backbone_lr_scale}")
        self.backbone_lr_scale = float(backbone_lr_scale)  # read by tasks/pretrain/optim.param_groups
        d = backbone.embed_dim
        self.head = MLPHead([d, hidden_dim, hidden_dim, out_dim], activation=nn.GELU)
        self.teacher_backbone = copy_and_freeze(backbone).eval()
        self.teacher_head = copy_and_freeze(self.head).eval()
        self.queues = nn.ModuleList(MemoryQueue(queue_size, out_dim) for _ in range(NUM_GLOBAL))
        self.register_buffer("filled", torch.zeros(NUM_GLOBAL, dtype=torch.long))
        self.view_overlap = Overlap(num_global=NUM_GLOBAL)
        self._push: list[torch.Tensor] = []

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher_backbone.eval()  # no drop-path / dropout in the teacher
        self.teacher_head.eval()
        return self

    # ------------------------------------------------------------------------------------------ data side

    def pairs(self) -> list[tuple[int, int]]:
        views = NUM_GLOBAL + self.num_local
        return [(g, v) for g in range(NUM_GLOBAL) for v in range(views) if v != g]

    def view_augments(self, size: int) -> list[Augment]:
        p = self.patch
        local = self.local_size or max(p, round(size * 98 / 224 / p) * p)  # 98 px at 224 (METHODS.md 2.3)
        for s in (size, local):
            if s % p:
                raise ValueError(f"neco: crop size {s} is not a multiple of the patch size {p}")
        if local != size and not getattr(self.backbone, "dynamic_img_size", False):
            raise ValueError(f"neco: global crops are {size} px and local crops {local} px; build the ViT with "
                             "pretrain.backbone_kwargs: {dynamic_img_size: true}")
        return neco_views(size, local, self.num_local)

    def collate(self, batch: int, step: int, seed: int) -> dict[str, torch.Tensor]:
        from tasks.data.masking import step_generator

        g = step_generator(seed, step)
        return {"ref_u": torch.rand(batch, len(self.pairs()), self.num_references, generator=g),
                "push_u": torch.rand(batch, NUM_GLOBAL, self.push_per_image, generator=g)}

    # ------------------------------------------------------------------------------------------ training

    def _references(self, g: int, aligned_teacher: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``[B, R, C]`` reference patches: from queue ``g``'s filled part, or before it has any, from the
        global batch's aligned teacher patches of this pair."""
        filled = int(self.filled[g])
        pool = self.queues[g].queue[:filled] if filled else all_gather_nograd(aligned_teacher).flatten(0, 1)
        idx = (u * len(pool)).long().clamp_max(len(pool) - 1)
        return pool[idx]

    def forward(self, views, step, max_steps, pair_weights=None, *, boxes, ref_u, push_u):
        n_views = NUM_GLOBAL + self.num_local
        if len(views) != n_views:
            raise ValueError(f"neco expects {n_views} views (2 global + {self.num_local} local), got {len(views)}")
        b = views[0].shape[0]
        glob = torch.cat(views[:NUM_GLOBAL])
        with torch.no_grad():  # teacher pass first: see "Order of passes" in Method's docstring
            teacher = patch_map(self.teacher_backbone, self.teacher_head, glob).split(b)
        student = list(patch_map(self.backbone, self.head, glob).split(b))
        if self.num_local:
            student += list(patch_map(self.backbone, self.head, torch.cat(views[NUM_GLOBAL:])).split(b))
        boxes = boxes.to(student[0].device)
        flipped = boxes[..., 4] > 0.5
        sizes = [v.shape[-1] for v in views]
        per_image = []
        with torch.autocast(student[0].device.type, enabled=False):
            for k, (g, v) in enumerate(self.pairs()):
                box_t = intersection_in_crop(boxes, g, v, g, sizes[g])
                box_s = intersection_in_crop(boxes, g, v, v, sizes[v])
                t = aligned_patches(teacher[g], box_t, flipped[:, g], self.patch, self.roi_size)
                s = aligned_patches(student[v].float(), box_s, flipped[:, v], self.patch, self.roi_size)
                with torch.no_grad():
                    refs = self._references(g, t, ref_u[:, k].to(t.device))
                    p_t = rank_matrices(t, refs, self.steepness, self.network, self.distribution)
                p_s = rank_matrices(s, refs, self.steepness, self.network, self.distribution)
                per_image.append(permutation_cross_entropy(p_t, p_s))
        with torch.no_grad():  # this step's pushes, written in after_step (after the backward read the queues)
            self._push = []
            for g in range(NUM_GLOBAL):
                tokens = teacher[g].flatten(2).transpose(1, 2)  # [B, hw, C]
                idx = (push_u[:, g].to(tokens.device) * tokens.shape[1]).long().clamp_max(tokens.shape[1] - 1)
                self._push.append(torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[2])).flatten(0, 1))
        per_image = torch.stack(per_image, 1).mean(1)
        return {"loss": self.reduce(per_image, pair_weights)}

    @torch.no_grad()
    def after_step(self, step: int, max_steps: int) -> None:
        m = cosine_schedule(step, max_steps, self.momentum, 1.0)
        update_ema(self.backbone, self.teacher_backbone, m)
        update_ema(self.head, self.teacher_head, m)
        for g, keys in enumerate(self._push):
            self.queues[g].enqueue(keys)  # gathered from every rank
            self.filled[g] = min(self.queues[g].size, int(self.filled[g]) + len(keys) * world_size())
        self._push = []


METHOD = NeCo
