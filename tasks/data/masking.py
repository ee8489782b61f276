"""Token-mask samplers of the masked and predictive methods, on the data side.

Each is a pure function of its generators, so a step's masks depend only on (seed, step): the trainer draws
the masks of the whole global batch and gives each rank its rows, which makes 2 ranks x B/2 see exactly the
masks 1 rank x B sees (and a resumed run the masks it would have seen). Indices are patch positions in
raster order (``tasks.models.vit``), sorted ascending within each row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A generator owned by (seed, step, stream): independent draws per step, reproducible on resume."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) * 8 + int(stream))


def random_masking(batch: int, num_patches: int, mask_ratio: float,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking: ``(keep [B, K], masked [B, N - K])``, ``K = int(N (1 - mask_ratio))``.

    Uniform noise per patch, argsort, the first K kept -- the draw MAE (and lightly's ``random_token_mask``)
    makes, so with the same random stream the same patches are kept; each row is then sorted.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    keep_n = int(num_patches * (1 - mask_ratio))
    if keep_n < 1:
        raise ValueError(f"mask_ratio {mask_ratio} keeps no patch of {num_patches}")
    order = torch.argsort(torch.rand(batch, num_patches, generator=generator), dim=1)
    return order[:, :keep_n].sort(dim=1).values, order[:, keep_n:].sort(dim=1).values


@dataclass(frozen=True)
class MultiBlockMasks:
    """I-JEPA's multi-block masking (METHODS.md 6.2; official ``src/masks/multiblock.py``).

    Per call (one training step): one target size and one context size for the whole batch, drawn from
    ``size_gen``. Target size: one ``u ~ U(0, 1)`` sets both the scale ``pred_scale[0] + u * (hi - lo)`` and
    the aspect ratio ``aspect[0] + u * (hi - lo)`` -- the same ``u`` for both, as in the official code;
    ``h = round(sqrt(n * a))``, ``w = round(sqrt(n / a))`` with ``n = int(H * W * scale)``, reduced until
    ``h < H`` and ``w < W``. Context: a new ``u``, scale from ``enc_scale``, aspect ratio 1.
    Per image (positions from ``pos_gen``): ``num_targets`` target blocks (may overlap each other), then
    ``num_context`` context blocks from which every patch of the image's target blocks is removed (unless
    ``allow_overlap``). A block with at most ``min_keep`` patches left is drawn again; after 20 failures the
    constraint from one more target block is dropped. Finally every mask of the batch is cut to the
    shortest of its kind (the rows are sorted, so the cut drops the bottom-right patches).

    Choices kept from the official code (and lightly's ``IJEPAMaskCollator``, which agrees draw for draw):
    the top-left corner is drawn from ``randint(0, H - h)``, so the last valid row/column offset never
    occurs. One change: ``min_keep`` is capped one below the target block's area -- on a small patch grid
    (8 x 8 at 64 px / patch 8) a 0.15-0.2 target block has 9-12 patches, and the official loop would never
    end with ``min_keep = 10``.

    Returns ``(context [B, num_context, Kc], targets [B, num_targets, Kt])`` int64.
    """

    grid: tuple[int, int]
    enc_scale: tuple[float, float] = (0.85, 1.0)
    pred_scale: tuple[float, float] = (0.15, 0.2)
    aspect: tuple[float, float] = (0.75, 1.5)
    num_context: int = 1
    num_targets: int = 4
    min_keep: int = 10
    allow_overlap: bool = False

    def block_size(self, gen: torch.Generator, scale, aspect) -> tuple[int, int]:
        rows, cols = self.grid
        u = torch.rand(1, generator=gen).item()
        n = int(rows * cols * (scale[0] + u * (scale[1] - scale[0])))
        a = aspect[0] + u * (aspect[1] - aspect[0])
        h, w = int(round(math.sqrt(n * a))), int(round(math.sqrt(n / a)))
        while h >= rows:
            h -= 1
        while w >= cols:
            w -= 1
        return max(h, 1), max(w, 1)

    def _block(self, size, gen, allowed: list[torch.Tensor] | None, min_keep: int):
        rows, cols = self.grid
        h, w = size
        tries, timeout = 0, 20
        while True:
            top = int(torch.randint(0, rows - h, (1,), generator=gen))
            left = int(torch.randint(0, cols - w, (1,), generator=gen))
            m = torch.zeros(rows, cols, dtype=torch.int32)
            m[top:top + h, left:left + w] = 1
            if allowed is not None:
                for region in allowed[:max(len(allowed) - tries, 0)]:
                    m *= region
            idx = torch.nonzero(m.flatten()).flatten()
            if len(idx) > min_keep:
                break
            timeout -= 1
            if timeout == 0:
                tries, timeout = tries + 1, 20
        complement = torch.ones(rows, cols, dtype=torch.int32)
        complement[top:top + h, left:left + w] = 0
        return idx, complement

    def __call__(self, batch: int, size_gen: torch.Generator,
                 pos_gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = self.grid
        if rows < 2 or cols < 2:
            raise ValueError(f"multi-block masking needs a patch grid of at least 2 x 2, got {self.grid}")
        if self.num_targets < 1 or self.num_context < 1:
            raise ValueError(f"multi-block masking needs >= 1 target and context block, got {self.num_targets}, {self.num_context}")
        p_size = self.block_size(size_gen, self.pred_scale, self.aspect)
        e_size = self.block_size(size_gen, self.enc_scale, (1.0, 1.0))
        p_keep = min(self.min_keep, p_size[0] * p_size[1] - 1)
        e_keep = min(self.min_keep, e_size[0] * e_size[1] - 1)
        targets, contexts = [], []
        for _ in range(batch):
            blocks, comps = zip(*[self._block(p_size, pos_gen, None, p_keep) for _ in range(self.num_targets)])
            targets.append(blocks)
            allowed = None if self.allow_overlap else list(comps)
            contexts.append([self._block(e_size, pos_gen, allowed, e_keep)[0] for _ in range(self.num_context)])
        kt = min(len(m) for ms in targets for m in ms)
        kc = min(len(m) for ms in contexts for m in ms)
        return (torch.stack([torch.stack([m[:kc] for m in ms]) for ms in contexts]),
                torch.stack([torch.stack([m[:kt] for m in ms]) for ms in targets]))
