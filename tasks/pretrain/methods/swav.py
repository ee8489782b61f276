"""SwAV: Swapping Assignments between multiple Views (Caron et al., NeurIPS 2020, arXiv 2006.09882).

Every crop -> backbone -> projection head -> unit vector z -> scores s = z C^T against K unit-norm
prototypes C. The 2 global crops get soft codes q from Sinkhorn-Knopp (equal partition of the *global*
batch over the prototypes, optionally padded with a queue of past global-crop embeddings); every other
crop's softmax prediction is trained towards each global crop's code (swapped prediction). METHODS.md 7.4.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from tasks.data.transforms import Augment, multicrop_views
from tasks.pretrain.distributed import all_gather_nograd, all_reduce_sum_nograd, rank, world_size
from tasks.pretrain.heads import MLPHead
from tasks.pretrain.losses.infonce import MemoryQueue
from tasks.pretrain.methods.base import Method

NUM_GLOBAL = 2  # codes are computed on crops 0 and 1 (main_swav.py's crops_for_assign = [0, 1])


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Soft codes for ``scores [..., N, K]`` (this rank's N samples x K prototypes), SwAV sec. 3.1 / METHODS.md 7.4.

    ``Q = exp(S / eps)`` normalised to total mass 1, then ``iterations`` times: each prototype's mass set to
    1/K, then each sample's to 1/N; finally x N so every sample's code sums to 1. N and every sum over samples
    span all ranks (all-reduced), so the equal-partition constraint holds over the global batch; leading
    dimensions (e.g. the 2 global crops) are independent problems solved with the same collectives.
    Computed in float32; |s| <= 1 (unit z, unit prototypes), so exp(s / 0.05) <= e^20 cannot overflow and,
    as in the reference, no max is subtracted.
    """
    q = torch.exp(scores.float() / epsilon)
    n_local, k = q.shape[-2], q.shape[-1]
    # One all-reduce for every slice's total mass plus the global sample count (queue shards may differ by 1).
    stats = all_reduce_sum_nograd(torch.cat([q.sum((-2, -1)).flatten(), q.new_tensor([n_local])]))
    n = stats[-1]
    q /= stats[:-1].view(*q.shape[:-2], 1, 1)
    for _ in range(iterations):
        q /= all_reduce_sum_nograd(q.sum(-2, keepdim=True)) * k
        q /= q.sum(-1, keepdim=True) * n
    return q * n


def swapped_prediction(scores: torch.Tensor, codes: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Per-image swapped-prediction loss ``[B]`` (SwAV eq. 1-2 with multi-crop, METHODS.md 7.4).

    ``scores [V, B, K]`` of all crops, ``codes [G, B, K]`` of the first G crops:
    ``l_i = 1/G sum_g 1/(V-1) sum_{v != g} -sum_k q_{g,i,k} log softmax_k(s_{v,i} / tau)``; its batch mean is L.
    """
    g, v = codes.shape[0], scores.shape[0]
    # float32 even under autocast: the cross-entropy sums K products of probabilities and log-probabilities.
    with torch.autocast(scores.device.type, enabled=False):
        log_p = F.log_softmax(scores.float() / temperature, dim=-1)
        ce = -torch.einsum("gbk,vbk->gvb", codes.float(), log_p)
    keep = ~torch.eye(g, v, dtype=torch.bool, device=ce.device)  # a code never predicts its own crop
    return (ce * keep[..., None]).sum((0, 1)) / (g * (v - 1))


class SwAV(Method):
    """SwAV per METHODS.md 7.4: head feat->2048->BN->ReLU->128, 3000 prototypes, tau=0.1, eps=0.05, 3 iterations.

    Views: 2 global + ``num_local_crops`` local crops (:func:`multicrop_views`); crops of equal size go
    through the backbone together, all crops through the head together (one BN batch, as main_swav.py).
    Prototypes are unit rows (renormalised at init and after every optimizer step) and get no gradient for
    ``freeze_prototypes_epochs`` epochs, i.e. ``freeze_prototypes_epochs * steps_per_epoch`` steps;
    ``freeze_prototypes_steps`` (default None) overrides that count and is the only source when
    ``steps_per_epoch`` is unknown (then 0).

    Queue (``queue_length`` > 0): per global crop, a FIFO of the last ``queue_length`` embeddings z of all
    ranks, used only to compute codes (its scores are recomputed with the current prototypes, then only the
    batch's codes are kept), from step ``queue_start_step`` (default ``queue_start_epochs * steps_per_epoch``,
    0 when unknown) once it is full. [choice] main_swav.py starts *filling* at epoch 15 and uses the queue
    once full (about queue_length / global batch steps later); we fill from the start so that
    ``queue_start_step`` is exactly the first step it is used -- same queue content then, no stale random init.
    Each rank feeds Sinkhorn a disjoint shard of the (identical) queue, so every entry counts once globally.
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, *, hidden_dim: int = 2048, out_dim: int = 128,
                 num_prototypes: int = 3000, temperature: float = 0.1, epsilon: float = 0.05,
                 sinkhorn_iterations: int = 3, num_local_crops: int = 6, local_size: int | None = None,
                 freeze_prototypes_epochs: float = 1.0, freeze_prototypes_steps: int | None = None,
                 queue_length: int = 0, queue_start_epochs: float = 15.0, queue_start_step: int | None = None,
                 channels_last: bool = True):
        super().__init__(backbone, feat_dim)
        if temperature <= 0 or epsilon <= 0 or sinkhorn_iterations < 1:
            raise ValueError("SwAV: temperature and epsilon must be > 0, sinkhorn_iterations >= 1")
        if num_local_crops < 0 or queue_length < 0 or num_prototypes < 1:
            raise ValueError("SwAV: num_local_crops and queue_length must be >= 0, num_prototypes >= 1")
        self.channels_last = channels_last
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.head = MLPHead([feat_dim, hidden_dim, out_dim], batch_norm=True)
        self.prototypes = nn.Linear(out_dim, num_prototypes, bias=False)
        self.normalize_prototypes()
        self.temperature, self.epsilon, self.sinkhorn_iterations = temperature, epsilon, sinkhorn_iterations
        self.num_local_crops, self.local_size = num_local_crops, local_size
        self.freeze_prototypes_epochs, self.freeze_prototypes_steps = freeze_prototypes_epochs, freeze_prototypes_steps
        self.queue_start_epochs, self.queue_start_step = queue_start_epochs, queue_start_step
        self.queues: nn.ModuleList | None = None
        if queue_length:
            self.queues = nn.ModuleList(MemoryQueue(queue_length, out_dim) for _ in range(NUM_GLOBAL))
            self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))  # real entries, <= length
        self._keys: torch.Tensor | None = None

    def view_augments(self, size: int) -> list[Augment]:
        return multicrop_views(size, num_local=self.num_local_crops, local_size=self.local_size)

    def _epochs_to_steps(self, explicit: int | None, epochs: float) -> int:
        if explicit is not None:
            return int(explicit)
        return 0 if self.steps_per_epoch is None else math.ceil(epochs * self.steps_per_epoch)

    def freeze_steps(self) -> int:
        """Number of initial steps during which the prototypes get no gradient."""
        return self._epochs_to_steps(self.freeze_prototypes_steps, self.freeze_prototypes_epochs)

    def queue_in_use(self, step: int) -> bool:
        if self.queues is None:
            return False
        start = self._epochs_to_steps(self.queue_start_step, self.queue_start_epochs)
        return step >= start and int(self.queue_filled) >= self.queues[0].size

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    def embed(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Unit embeddings ``[V * B, D]`` in view order; consecutive same-size crops share a backbone pass."""
        feats = []
        for _, group in itertools.groupby(views, key=lambda x: tuple(x.shape[-2:])):
            x = torch.cat(list(group))
            if self.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            feats.append(self.backbone(x).flatten(1))
        return F.normalize(self.head(torch.cat(feats)).float(), dim=1)  # fp32 even under autocast

    @torch.no_grad()
    def codes(self, global_scores: torch.Tensor, step: int) -> tuple[torch.Tensor, bool]:
        """Sinkhorn codes ``[G, B, K]`` of the global crops' scores ``[G, B, K]``, with the queue when in use."""
        use_queue, n_past = self.queue_in_use(step), 0
        if use_queue:
            w = self.prototypes.weight.detach()
            shards = torch.stack([q.queue.tensor_split(world_size())[rank()] for q in self.queues])
            past = (shards.to(w.dtype) @ w.t()).to(global_scores.dtype)
            global_scores, n_past = torch.cat([past, global_scores], dim=1), past.shape[1]
        return sinkhorn(global_scores, self.epsilon, self.sinkhorn_iterations)[:, n_past:], use_queue

    def forward(self, views: list[torch.Tensor], step: int, max_steps: int,
                pair_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if len(views) < NUM_GLOBAL:
            raise ValueError(f"SwAV needs at least {NUM_GLOBAL} views (global crops first), got {len(views)}")
        b = views[0].shape[0]
        z = self.embed(views)
        w = self.prototypes.weight
        if step < self.freeze_steps():
            # main_swav.py drops the prototypes' gradients between backward and optimizer.step; the Method
            # contract has no hook there, and a parameter without a gradient breaks DDP with
            # find_unused_parameters=False. So the scores use detached prototypes while `0 * w` keeps them in
            # the graph with an exactly-zero gradient. Weight decay / momentum on a zero gradient only rescale
            # each row along itself, which after_step's renormalisation undoes.
            w = w.detach() + 0.0 * w
        with torch.autocast(z.device.type, enabled=False):  # fp32 scores: Sinkhorn exponentiates s / eps
            scores = (z @ w.float().t()).view(len(views), b, -1)
        q, used = self.codes(scores[:NUM_GLOBAL].detach(), step)
        loss = self.reduce(swapped_prediction(scores, q, self.temperature), pair_weights)
        if self.queues is not None:
            self._keys = z[:NUM_GLOBAL * b].detach().view(NUM_GLOBAL, b, -1).transpose(0, 1)  # [B, G, D]
        entropy = -(q * q.clamp_min(1e-12).log()).sum(-1).mean()
        return {"loss": loss, "code_entropy": entropy, "queue_used": torch.tensor(float(used))}

    @torch.no_grad()
    def after_step(self, step: int, max_steps: int) -> None:
        self.normalize_prototypes()
        if self._keys is not None:
            keys = all_gather_nograd(self._keys)  # every rank keeps the same queue of all ranks' embeddings
            for g, queue in enumerate(self.queues):
                queue.enqueue(keys[:, g], gather=False)
            self.queue_filled.fill_(min(int(self.queue_filled) + keys.shape[0], self.queues[0].size))
            self._keys = None


METHOD = SwAV
