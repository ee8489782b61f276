"""MixedAE (Chen, Liu et al., CVPR 2023, arXiv 2303.17152), per METHODS.md 5. No official code exists; the
choices below are ours and marked as such.

Mixing: consecutive images of the batch form groups of ``G = 1 / mix_ratio`` (4 at r = 0.25). For each group
a random partition of the N patch positions into G equal parts (drawn on the data side, ``collate``) says
which image each position of the group's one mixed image shows; so each image contributes 25 % of its
patches -- MAE's visible ratio -- and the encoder runs over B / G mixed images of N tokens, MAE's cost.
A learnable segment embedding per source slot is added to each mixed token (after the position embedding).

Homologous attention (choice): in the encoder layers ``homologous_layers`` (default: the second half of the
blocks -- where token similarity is about content rather than position; each top-K layer also costs a
partial sort of every attention row: on 2 CPU cores, fp32, one layer's attention at 224 px (8 mixed images x 6
heads x 196 x 196) takes 72 ms fwd+bwd against timm's 53 ms, 12 of the 19 ms in ``topk``; the 6 layers add
~1.5 % to a 7.5 s ViT-S step), each query keeps
only its ``K = N / G`` largest attention logits per head (the number of its own image's patches; prefix
tokens are candidates like any other), the rest are set to -inf before the softmax. The encoder exported
for evaluation is the plain timm ViT with ordinary attention ("replaceable"), as the paper does on
un-mixed images.

Homologous contrastive loss (choice of form, METHODS.md 5.2): encoder patch outputs -> 2-layer MLP ->
L2-normalised, within each mixed image a supervised-contrastive loss whose positives for token i are the
other tokens of its own source image, and whose denominator is every other token of the mixed image;
temperature 0.07, weight 0.5 (the unofficial code's values, there being no official ones).

Reconstruction (un-mixing): for each source image, the decoder gets the encoder outputs at its own
positions and a mask token at the others and regresses its missing 75 % (MAE's normalised-pixel MSE).
Image i's own term is its reconstruction loss + 0.5 x the mean HC loss of its tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tasks.data.masking import step_generator
from tasks.models.vit import check_input, gather_tokens
from tasks.pretrain.methods.mae import MAE


def group_partitions(batch: int, num_patches: int, group: int,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image ``(keep [B, N / G], masked [B, N - N / G])``: within each group of ``group`` consecutive
    images the keeps are disjoint and cover all N positions (a random equal partition per group)."""
    if batch % group or num_patches % group:
        raise ValueError(f"MixedAE groups of {group}: the batch ({batch}) and the patch count ({num_patches}) "
                         f"must be multiples of it")
    per = num_patches // group
    order = torch.argsort(torch.rand(batch // group, num_patches, generator=generator), dim=1)
    parts = order.view(batch // group, group, per).sort(dim=2).values.reshape(batch, per)
    full = torch.arange(num_patches).expand(batch, -1)
    taken = torch.zeros(batch, num_patches, dtype=torch.bool).scatter_(1, parts, True)
    return parts, full[~taken].view(batch, num_patches - per)


def mix_tokens(patches: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """``patches [B, N, D]`` (groups of G consecutive images), ``owner [B / G, N]`` -> mixed ``[B / G, N, D]``
    whose position n shows image ``owner[g, n]`` of group g."""
    m, n = owner.shape
    d = patches.shape[-1]
    grouped = patches.reshape(m, -1, n, d)
    return torch.gather(grouped, 1, owner.view(m, 1, n, 1).expand(m, 1, n, d)).squeeze(1)


def topk_attention(attn: nn.Module, x: torch.Tensor, k: int, record: list | None = None) -> torch.Tensor:
    """timm ``Attention`` forward where each query keeps only its ``k`` largest logits per head
    (``record``, if given, receives the boolean selection ``[B, heads, N, N]``)."""
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, kk, v = qkv.unbind(0)
    q, kk = attn.q_norm(q), attn.k_norm(kk)
    logits = (q * attn.scale) @ kk.transpose(-2, -1)
    with torch.no_grad():  # the threshold only selects; no gradient flows through it (unsorted topk: ~30 % faster)
        kth = logits.topk(min(k, n), dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        keep = logits >= kth
        # 0 where kept, -inf elsewhere. Not log() of the 0/1 mask: log(0) takes a slow path on CPU (on [8, 6, 196,
        # 196], 2 cores: 20 ms with 75 % zeros, 1.7 ms on positive inputs); torch.where takes 2.3 ms
        bias = torch.where(keep, logits.new_zeros(()), logits.new_full((), float("-inf")))
    if record is not None:
        record.append(keep)
    # adding the -inf bias = masked_fill, but its backward is a plain copy: ~20 % less top-K attention time on CPU
    logits = logits + bias
    out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    out = attn.norm(out.transpose(1, 2).reshape(b, n, -1))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def homologous_block(block: nn.Module, x: torch.Tensor, k: int, record: list | None = None) -> torch.Tensor:
    """A timm ``Block`` with :func:`topk_attention` in place of its attention."""
    x = x + block.drop_path1(block.ls1(topk_attention(block.attn, block.norm1(x), k, record)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class MixedAE(MAE):
    def __init__(self, backbone: nn.Module, feat_dim: int, *, mix_ratio: float = 0.25,
                 homologous_layers: tuple | None = None, hc_weight: float = 0.5, hc_temperature: float = 0.07,
                 hc_dim: int = 128, **mae_kwargs):
        if "mask_ratio" in mae_kwargs:
            raise TypeError("mixedae: the visible ratio is mix_ratio (each image shows 1 / G of its patches)")
        super().__init__(backbone, feat_dim, mask_ratio=1.0 - mix_ratio, **mae_kwargs)
        self.group = int(round(1.0 / mix_ratio))
        n = self.grid[0] * self.grid[1]
        if abs(self.group * mix_ratio - 1.0) > 1e-6 or n % self.group:
            raise ValueError(f"mixedae: mix_ratio {mix_ratio} must be 1/G for an integer G dividing the {n} patches")
        depth = len(backbone.blocks)
        self.homologous = set(range(depth // 2, depth)) if homologous_layers is None else \
            {int(i) % depth for i in homologous_layers}
        self.hc_weight, self.hc_temperature = float(hc_weight), float(hc_temperature)
        d = backbone.embed_dim
        self.segment = nn.Parameter(torch.zeros(self.group, d))
        nn.init.trunc_normal_(self.segment, std=0.02)
        self.hc_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, hc_dim))

    def collate(self, batch: int, step: int, seed: int) -> dict[str, torch.Tensor]:
        keep, masked = group_partitions(batch, self.grid[0] * self.grid[1], self.group, step_generator(seed, step))
        return {"keep": keep, "masked": masked}

    @staticmethod
    def owners(keep: torch.Tensor, group: int, num_patches: int) -> torch.Tensor:
        """``[B / G, N]``: the slot (image within its group) shown at each position of each mixed image."""
        b, per = keep.shape
        slots = torch.arange(group, device=keep.device).repeat_interleave(per).expand(b // group, -1)
        owner = torch.empty(b // group, num_patches, dtype=torch.long, device=keep.device)
        return owner.scatter_(1, keep.reshape(b // group, group * per), slots)

    def encode_mixed(self, x: torch.Tensor, owner: torch.Tensor, record: list | None = None) -> torch.Tensor:
        """Encoder outputs of the mixed images ``[B / G, N, D]`` (patch tokens; prefix tokens dropped)."""
        vit, g = self.backbone, self.group
        t = vit._pos_embed(vit.patch_embed(self.to_layout(x)))
        p = vit.num_prefix_tokens
        mixed = mix_tokens(t[:, p:], owner)
        h = vit.norm_pre(torch.cat([t[::g, :p], mixed + self.segment[owner].to(mixed.dtype)], dim=1))
        for i, block in enumerate(vit.blocks):
            h = homologous_block(block, h, mixed.shape[1] // g, record) if i in self.homologous else block(h)
        return vit.norm(h)[:, p:]

    @torch.no_grad()
    def same_image_rate(self, x: torch.Tensor, keep: torch.Tensor) -> float:
        """Of the patch tokens each patch query selects in the homologous layers, the share from its own
        image (chance: (N / G - 1) / (N - 1) among the other patches)."""
        n, p = self.grid[0] * self.grid[1], self.backbone.num_prefix_tokens
        owner = self.owners(keep, self.group, n)
        record: list = []
        self.encode_mixed(x, owner, record)
        same = (owner.unsqueeze(2) == owner.unsqueeze(1)) & ~torch.eye(n, dtype=torch.bool)
        hits = total = 0
        for sel in record:
            sel = sel[:, :, p:, p:] & ~torch.eye(n, dtype=torch.bool)
            hits += int((sel & same.unsqueeze(1)).sum())
            total += int(sel.sum())
        return hits / max(total, 1)

    def homologous_contrastive(self, enc: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """Per-token SupCon loss within each mixed image, averaged per source image: ``[B]``."""
        z = F.normalize(self.hc_head(enc).float(), dim=-1)
        with torch.autocast(z.device.type, enabled=False):
            logits = z @ z.transpose(1, 2) / self.hc_temperature
        n = logits.shape[-1]
        eye = torch.eye(n, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(eye, float("-inf"))
        log_prob = logits - logits.logsumexp(dim=-1, keepdim=True)
        pos = (owner.unsqueeze(2) == owner.unsqueeze(1)) & ~eye
        per_token = -(log_prob.masked_fill(~pos, 0.0).sum(-1) / pos.sum(-1))  # [B/G, N]
        # mean over each slot's tokens -> [B/G, G] -> [B] in batch order
        per_slot = torch.zeros(owner.shape[0], self.group, device=z.device).scatter_add_(1, owner, per_token)
        return (per_slot / (n // self.group)).reshape(-1)

    def forward(self, views, step, max_steps, pair_weights=None, *, keep=None, masked=None):
        (x,) = views
        check_input(self.backbone, x, "mixedae")
        n = self.grid[0] * self.grid[1]
        if len(x) % self.group:
            raise ValueError(f"mixedae: the per-worker batch ({len(x)}) must be a multiple of the group size "
                             f"{self.group} (pretrain.batch_size / pretrain.num_workers)")
        if keep is None:  # a direct call without the data side's partitions: draw them here
            keep, masked = (t.to(x.device) for t in group_partitions(len(x), n, self.group))
        owner = self.owners(keep, self.group, n)
        enc = self.encode_mixed(x, owner)
        visible = gather_tokens(enc.repeat_interleave(self.group, 0), keep)  # each image's own positions
        pred = self.decoder(visible, keep, masked)
        rec = ((pred.float() - self.targets(x, masked)) ** 2).mean(dim=(1, 2))
        hc = self.homologous_contrastive(enc, owner)
        out = {"loss": self.reduce(rec + self.hc_weight * hc, pair_weights)}
        out.update(rec_loss=rec.mean().detach(), hc_loss=hc.mean().detach())
        return out


METHOD = MixedAE
