"""ViT pieces shared by the masked and predictive methods (MAE, I-JEPA, MixedAE, MoCE).

The encoder is timm's own ``VisionTransformer`` as :func:`~tasks.models.backbone.build_backbone` makes it,
used through :func:`vit_tokens`, which runs it on a subset of its patches (keep-index tensors). No weights
move into a new module, so timm checkpoints load into the encoder and the trained encoder exports as the
plain timm model the evaluate stage rebuilds by name.

Token order everywhere: patches in raster order (row-major over the patch grid), index ``r * W + c``.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def is_vit(model: nn.Module) -> bool:
    """A timm-style ViT: patch embedding, blocks and the prefix/position-embedding step."""
    return all(hasattr(model, a) for a in ("patch_embed", "blocks", "_pos_embed", "num_prefix_tokens"))


def require_vit(model: nn.Module, method: str, dynamic_size: bool = False) -> None:
    """A timm ViT whose patch tokens train; ``dynamic_size``: the method feeds crops of several sizes (the
    ViT must then be built with ``dynamic_img_size``), else one size and a fixed grid."""
    if not is_vit(model):
        raise ValueError(f"{method} needs a ViT backbone (a timm VisionTransformer, e.g. vit_small_patch16_224); "
                         f"got {type(model).__name__}")
    pooled = [n for n in ("fc_norm", "attn_pool") if any(True for _ in (getattr(model, n, None) or nn.Identity()).parameters())]
    if pooled:
        raise ValueError(f"{method} trains the ViT's patch tokens, but this ViT normalises/pools after pooling "
                         f"({', '.join(pooled)}: those weights would get no gradient); build it with "
                         f"backbone_kwargs fc_norm: false and global_pool: avg or token")
    if getattr(model, "dynamic_img_size", False) and not dynamic_size:
        raise ValueError(f"{method}: dynamic_img_size ViTs are not supported; set img_size to the pretrain resolution")


def patch_grid(vit: nn.Module) -> tuple[int, int]:
    """(rows, cols) of the patch grid at the ViT's ``img_size``."""
    return tuple(int(g) for g in vit.patch_embed.grid_size)


def patch_size(vit: nn.Module) -> int:
    p = vit.patch_embed.patch_size
    p = p if isinstance(p, int) else p[0]
    return int(p)


def check_input(vit: nn.Module, x: torch.Tensor, method: str) -> None:
    want = tuple(int(s) for s in vit.patch_embed.img_size)
    if tuple(x.shape[-2:]) != want:
        raise ValueError(f"{method}: views are {tuple(x.shape[-2:])} px but the ViT was built for {want}; set "
                         f"pretrain.backbone_kwargs.img_size to pretrain.resolution ({x.shape[-1]})")


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, k]]``: ``[B, N, D]`` and ``[B, K]`` -> ``[B, K, D]``."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def vit_tokens(vit: nn.Module, x: torch.Tensor, keep: torch.Tensor | None = None,
               blocks=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a timm ViT on the patches ``keep`` ``[B, K]`` of ``x`` (all patches when None).

    Same steps as timm's ``forward_features`` -- patch embedding, prefix tokens and position embedding, then
    the patch subset is taken (so each kept patch keeps its own position), pre-norm, blocks, final norm.
    Returns ``(prefix tokens [B, P, D], patch tokens [B, K, D])``; P is the class/register token count.
    ``blocks`` replaces ``vit.blocks`` as the callable over the token sequence (MoE routing, masked attention).
    """
    t = vit._pos_embed(vit.patch_embed(x))
    p = vit.num_prefix_tokens
    if keep is not None:
        t = torch.cat([t[:, :p], gather_tokens(t[:, p:], keep)], dim=1)
    t = vit.norm_pre(t)
    t = (blocks or vit.blocks)(t)
    t = vit.norm(t)
    return t[:, :p], t[:, p:]


def sincos_2d(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding ``[rows * cols, dim]`` (MAE, I-JEPA): half of the channels
    encode the row, half the column, each as sines and cosines of geometric frequencies 1 / 10000^(i / (dim/4))."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows, cols = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij")

    def one(pos):
        a = pos.reshape(-1, 1) * omega
        return torch.cat([a.sin(), a.cos()], dim=1)

    return torch.cat([one(r), one(c)], dim=1).float()


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, H/p * W/p, p * p * C]``, patches in raster order, each flattened as
    (row in patch, column in patch, channel) -- MAE's layout, so its targets and ours line up."""
    b, c, h, w = images.shape
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, p: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = patches.shape[0]
    rows, cols = grid
    x = patches.reshape(b, rows, cols, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, rows * p, cols * p)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's ``norm_pix_loss`` target: each patch to zero mean, unit variance (unbiased variance, as MAE)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


class TokenPredictor(nn.Module):
    """A narrow transformer that, from the tokens of some patches, predicts something at other positions:
    MAE's decoder (targets = pixels of the masked patches) and I-JEPA's predictor (targets = target-encoder
    features of the target blocks).

    ``forward(tokens [B, K, in_dim], token_pos [B, K], target_pos [B, T]) -> [B, T, out_dim]``: the tokens
    are projected to ``dim`` and given the fixed sin-cos embedding of their positions; one shared learnable
    mask token plus its position embedding stands at each target position; ``depth`` timm blocks run over
    both; a LayerNorm and a Linear give the outputs at the target positions. Prefix (class) tokens are not
    passed in: MAE's decoder carries the class token along, but nothing is predicted from it.
    """

    def __init__(self, in_dim: int, grid: tuple[int, int], dim: int, depth: int, num_heads: int, out_dim: int,
                 mlp_ratio: float = 4.0):
        super().__init__()
        import functools

        from timm.models.vision_transformer import Block

        if dim % num_heads:
            raise ValueError(f"predictor width {dim} is not divisible by its {num_heads} heads")
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos", sincos_2d(grid, dim), persistent=False)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio, qkv_bias=True,
                                            norm_layer=functools.partial(nn.LayerNorm, eps=1e-6)) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, out_dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, token_pos: torch.Tensor, target_pos: torch.Tensor) -> torch.Tensor:
        k = tokens.shape[1]
        h = self.embed(tokens) + self.pos[token_pos]
        m = self.mask_token.to(h.dtype) + self.pos[target_pos]
        h = self.blocks(torch.cat([h, m.to(h.dtype)], dim=1))
        return self.head(self.norm(h[:, k:]))


def num_heads_of(vit: nn.Module) -> int:
    attn = vit.blocks[0].attn
    return int(getattr(attn, "num_heads", max(1, vit.embed_dim // 64)))


def capped_width(encoder_dim: int, wanted: int, heads: int) -> int:
    """``wanted`` capped at the encoder's width, rounded down to a multiple of both 4 (sin-cos) and ``heads``."""
    w = min(wanted, encoder_dim)
    step = math.lcm(4, heads)
    return max(step, w // step * step)
