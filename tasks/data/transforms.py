"""MoCo v2 "aug+" augmentations on uint8 images, with an optional seeded generator.

Random parameters are drawn from a ``torch.Generator`` we pass around (torchvision's transform classes
draw from the global RNG), then applied with ``torchvision.transforms.v2.functional`` kernels. The crop
is done first so every later op runs at the output resolution; pixels become float once, after the crop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from tasks.models.backbone import IMAGENET_MEAN, IMAGENET_STD


def _uniform(gen: torch.Generator | None, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _to_chw(img) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(img)) if isinstance(img, np.ndarray) else img
    if t.ndim == 2:
        t = t.unsqueeze(-1).expand(*t.shape, 3)
    if t.ndim != 3 or t.shape[-1] not in (1, 3) or t.dtype != torch.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got {tuple(t.shape)} {t.dtype}")
    if t.shape[-1] == 1:
        t = t.expand(*t.shape[:2], 3)
    return t.permute(2, 0, 1)


def random_resized_crop_params(h: int, w: int, scale, ratio, gen) -> tuple[int, int, int, int]:
    """(top, left, height, width): area fraction ~ U(scale), log aspect ratio ~ U(log ratio); 10 tries,
    then a centre crop clamped to the ratio range (the Inception-style sampler)."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(gen, *scale)
        r = math.exp(_uniform(gen, *log_r))
        cw, ch = int(round(math.sqrt(target * r))), int(round(math.sqrt(target / r)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (), generator=gen))
            return top, left, ch, cw
    in_r = w / h
    if in_r < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_r > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


@dataclass(frozen=True)
class MoCoV2Augment:
    """MoCo v2 aug+ (Chen et al. 2020, arXiv 2003.04297): RRC scale (0.2, 1); colour jitter
    (0.4, 0.4, 0.4, 0.1) in random order with p 0.8; greyscale p 0.2; Gaussian blur sigma ~ U[0.1, 2]
    with p 0.5 and an odd kernel of about 10 % of ``size``; horizontal flip p 0.5.

    ``img -> float 3 x size x size in [0, 1]``; :meth:`batch` stacks and ImageNet-normalises.
    """

    size: int = 224
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    p_jitter: float = 0.8
    p_grey: float = 0.2
    p_blur: float = 0.5
    sigma: tuple[float, float] = (0.1, 2.0)
    p_flip: float = 0.5

    @property
    def kernel_size(self) -> int:
        return max(3, int(0.1 * self.size) // 2 * 2 + 1)

    def __call__(self, img, generator: torch.Generator | None = None) -> torch.Tensor:
        g = generator
        x = _to_chw(img)
        top, left, h, w = random_resized_crop_params(x.shape[1], x.shape[2], self.scale, self.ratio, g)
        x = TF.resized_crop(x, top, left, h, w, [self.size, self.size], antialias=True)
        x = x.float().div_(255.0)
        if float(torch.rand((), generator=g)) < self.p_jitter:
            x = self._color_jitter(x, g)
        if float(torch.rand((), generator=g)) < self.p_grey:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if float(torch.rand((), generator=g)) < self.p_blur:
            s = _uniform(g, *self.sigma)
            x = TF.gaussian_blur(x, [self.kernel_size, self.kernel_size], [s, s])
        if float(torch.rand((), generator=g)) < self.p_flip:
            x = TF.horizontal_flip(x)
        return x

    def _color_jitter(self, x: torch.Tensor, g) -> torch.Tensor:
        b, c, s, h = self.jitter
        for op in torch.randperm(4, generator=g).tolist():
            if op == 0 and b > 0:
                x = TF.adjust_brightness(x, _uniform(g, max(0.0, 1 - b), 1 + b))
            elif op == 1 and c > 0:
                x = TF.adjust_contrast(x, _uniform(g, max(0.0, 1 - c), 1 + c))
            elif op == 2 and s > 0:
                x = TF.adjust_saturation(x, _uniform(g, max(0.0, 1 - s), 1 + s))
            elif op == 3 and h > 0:
                x = TF.adjust_hue(x, _uniform(g, -h, h))
        return x

    def batch(self, images, generator: torch.Generator | None = None) -> torch.Tensor:
        """List of HxWx3 uint8 images -> ImageNet-normalised float ``[B, 3, size, size]``."""
        out = torch.stack([self(im, generator) for im in images])
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return out.sub_(mean).div_(std)


class TwoViews:
    """Two independent augmentations of every image: ``images -> [view0 [B,3,S,S], view1 [B,3,S,S]]``.

    ``seed`` makes the whole sequence of calls reproducible (one generator owned by this object).
    """

    def __init__(self, transform: MoCoV2Augment, seed: int | None = None, num_views: int = 2):
        self.transform = transform
        self.num_views = num_views
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def __call__(self, images) -> list[torch.Tensor]:
        return [self.transform.batch(images, self.generator) for _ in range(self.num_views)]
