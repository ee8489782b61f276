"""View augmentations on uint8 images (MoCo v2 aug+, BYOL/MoCo v3 asymmetric pairs, SwAV multi-crop),
with an optional seeded generator, and the crop geometry of every view (GenView's masks follow it).

Random parameters are drawn from a ``torch.Generator`` we pass around (torchvision's transform classes
draw from the global RNG), then applied with ``torchvision.transforms.v2.functional`` kernels. The crop
is done first so every later op runs at the output resolution; pixels become float once, after the crop.
"""
from __future__ import annotations

import dataclasses
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
class Geometry:
    """Where a view came from: the crop box in source pixels and whether it was flipped afterwards."""

    top: int
    left: int
    height: int
    width: int
    flipped: bool


@dataclass(frozen=True)
class Augment:
    """One view's recipe. Defaults = MoCo v2 aug+ (Chen et al. 2020, arXiv 2003.04297): RRC scale
    (0.2, 1); colour jitter (0.4, 0.4, 0.4, 0.1) in random order with p 0.8; greyscale p 0.2; Gaussian blur
    sigma ~ U[0.1, 2] with p 0.5 and an odd kernel of about 10 % of ``size``; no solarisation; horizontal
    flip p 0.5. The presets below change fields for the other methods.

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
    p_solarize: float = 0.0  # solarise (invert pixels >= 0.5) with this probability (BYOL / MoCo v3 view 2)
    p_flip: float = 0.5

    @property
    def kernel_size(self) -> int:
        return max(3, int(0.1 * self.size) // 2 * 2 + 1)

    def __call__(self, img, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(img, generator)[0]

    def apply(self, img, generator: torch.Generator | None = None,
              box: tuple[int, int, int, int] | None = None) -> tuple[torch.Tensor, Geometry]:
        """The view and its :class:`Geometry`. The random draws are the same as ``__call__``'s; ``box``
        (top, left, height, width) is a crop drawn by the caller (then no crop is drawn here)."""
        g = generator
        x = _to_chw(img)
        top, left, h, w = box if box is not None else random_resized_crop_params(x.shape[1], x.shape[2], self.scale,
                                                                                  self.ratio, g)
        x = TF.resized_crop(x, top, left, h, w, [self.size, self.size], antialias=True)
        x = x.float().div_(255.0)
        if float(torch.rand((), generator=g)) < self.p_jitter:
            x = self._color_jitter(x, g)
        if float(torch.rand((), generator=g)) < self.p_grey:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if float(torch.rand((), generator=g)) < self.p_blur:
            s = _uniform(g, *self.sigma)
            x = TF.gaussian_blur(x, [self.kernel_size, self.kernel_size], [s, s])
        if self.p_solarize > 0 and float(torch.rand((), generator=g)) < self.p_solarize:
            x = TF.solarize(x, 0.5)
        flipped = float(torch.rand((), generator=g)) < self.p_flip
        if flipped:
            x = TF.horizontal_flip(x)
        return x, Geometry(top, left, h, w, flipped)

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
        return normalize_batch([self(im, generator) for im in images])


MoCoV2Augment = Augment  # the defaults are MoCo v2's aug+


def normalize_batch(views: list[torch.Tensor]) -> torch.Tensor:
    """Stack float [0, 1] CHW views and ImageNet-normalise them."""
    out = torch.stack(views)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return out.sub_(mean).div_(std)


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    """Intersection area in pixels of two (top, left, height, width) boxes."""
    h = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    w = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(h, 0) * max(w, 0)


@dataclass(frozen=True)
class Overlap:
    """Crops that must overlap (NeCo, METHODS.md 2.3): each view's crop is re-drawn until its intersection
    with every earlier one of the first ``num_global`` views covers more than ``min_global`` (between two
    of those) or ``min_other`` (a later view against them) of the image area. After ``tries`` draws the
    crop is the first view's (which overlaps them all), so the constraint always holds."""

    num_global: int = 2
    min_global: float = 0.02
    min_other: float = 0.01
    tries: int = 50

    def boxes(self, augments: list, h: int, w: int, g: torch.Generator | None) -> list[tuple[int, int, int, int]]:
        out: list[tuple[int, int, int, int]] = []
        for v, aug in enumerate(augments):
            need = (self.min_global if v < self.num_global else self.min_other) * h * w
            anchors = out[:min(v, self.num_global)]
            for _ in range(self.tries):
                box = random_resized_crop_params(h, w, aug.scale, aug.ratio, g)
                if all(_overlap(box, a) > need for a in anchors):
                    break
            else:
                box = out[0]
            out.append(box)
        return out


class MultiView:
    """One view per :class:`Augment` for every image: ``images -> [view_i [B, 3, S_i, S_i] for each aug]``.

    ``seed`` makes the whole sequence of calls reproducible (one generator owned by this object).
    ``with_geometry=True`` also returns, per view, the list of each image's :class:`Geometry`.
    ``per_view=True``: ``images`` is one list per view (e.g. GenView's pairing puts a generated variation in
    one slot), instead of one list shared by every view. ``overlap`` (an :class:`Overlap`) draws each
    image's crops jointly so that they overlap.
    """

    def __init__(self, augments: list[Augment], seed: int | None = None, overlap: Overlap | None = None):
        if not augments:
            raise ValueError("MultiView needs at least one Augment")
        self.augments = list(augments)
        self.num_views = len(self.augments)
        self.overlap = overlap
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def __call__(self, images, with_geometry: bool = False, per_view: bool = False):
        if per_view and len(images) != self.num_views:
            raise ValueError(f"per_view: expected {self.num_views} image lists, got {len(images)}")
        if self.overlap is not None:
            if per_view:
                images = images[0]
            return self._overlapping(images, with_geometry)
        views, geoms = [], []
        for v, aug in enumerate(self.augments):
            pairs = [aug.apply(im, self.generator) for im in (images[v] if per_view else images)]
            views.append(normalize_batch([p[0] for p in pairs]))
            geoms.append([p[1] for p in pairs])
        return (views, geoms) if with_geometry else views

    def _overlapping(self, images, with_geometry: bool):
        per_image = []
        for im in images:
            x = _to_chw(im)
            boxes = self.overlap.boxes(self.augments, x.shape[1], x.shape[2], self.generator)
            per_image.append([aug.apply(im, self.generator, box) for aug, box in zip(self.augments, boxes)])
        views = [normalize_batch([p[v][0] for p in per_image]) for v in range(self.num_views)]
        geoms = [[p[v][1] for p in per_image] for v in range(self.num_views)]
        return (views, geoms) if with_geometry else views


def geometry_tensor(geoms: list[list[Geometry]]) -> torch.Tensor:
    """Per image and view ``(top, left, height, width, flipped)`` in source pixels: ``[B, V, 5]`` float."""
    return torch.tensor([[[g.top, g.left, g.height, g.width, float(g.flipped)] for g in col] for col in zip(*geoms)],
                        dtype=torch.float32)


class TwoViews(MultiView):
    """The same augmentation ``num_views`` times (MoCo v2's symmetric pair)."""

    def __init__(self, transform: Augment, seed: int | None = None, num_views: int = 2):
        super().__init__([transform] * num_views, seed)
        self.transform = transform


def with_overrides(augments: list[Augment], overrides: dict) -> list[Augment]:
    """Apply a pipeline's ``pretrain.augment`` overrides (field -> value) to every view but its size.

    Unknown fields raise ``ValueError`` naming them; lists become tuples (YAML has no tuples).
    """
    names = {f.name for f in dataclasses.fields(Augment)} - {"size"}
    bad = sorted(set(overrides) - names)
    if bad:
        raise ValueError(f"unknown augment option(s) {', '.join(bad)} (known: {', '.join(sorted(names))})")
    clean = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return [dataclasses.replace(a, **clean) for a in augments]


# ---- presets: one per recipe in METHODS.md; methods pick theirs in ``Method.view_augments``.

def neco_views(size: int, local_size: int, num_local: int = 4) -> list[Augment]:
    """NeCo (METHODS.md 2.3): 2 global crops scale (0.25, 1) and ``num_local`` local ones (0.05, 0.25);
    colour jitter (0.8, 0.8, 0.8, 0.2) p 0.8, greyscale p 0.2, blur p 0.5; no flip (the crops' overlap is
    aligned by position). Drawn jointly with :class:`Overlap`."""
    common = dict(jitter=(0.8, 0.8, 0.8, 0.2), p_jitter=0.8, p_grey=0.2, p_blur=0.5, p_flip=0.0)
    return [Augment(size=size, scale=(0.25, 1.0), **common)] * 2 + \
        [Augment(size=local_size, scale=(0.05, 0.25), **common)] * num_local


def mocov2_views(size: int) -> list[Augment]:
    """MoCo v2 aug+ twice (METHODS.md 7.1)."""
    return [Augment(size=size)] * 2


def byol_views(size: int, min_scale: float = 0.08) -> list[Augment]:
    """BYOL / MoCo v3 asymmetric pair (METHODS.md 7.2, 7.3): jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grey 0.2,
    flip; view 1 blur p 1.0, no solarisation; view 2 blur p 0.1, solarise p 0.2. RRC (min_scale, 1)."""
    base = Augment(size=size, scale=(min_scale, 1.0), jitter=(0.4, 0.4, 0.2, 0.1))
    return [dataclasses.replace(base, p_blur=1.0, p_solarize=0.0),
            dataclasses.replace(base, p_blur=0.1, p_solarize=0.2)]


def crop_views(size: int, scale: tuple[float, float], flip: bool = True) -> list[Augment]:
    """One view, geometry only: RandomResizedCrop ``scale`` (+ horizontal flip), no colour, grey or blur.
    MAE: scale (0.2, 1) with flip (METHODS.md 7.5); I-JEPA: scale (0.3, 1), no flip (6.4)."""
    return [Augment(size=size, scale=scale, p_jitter=0.0, p_grey=0.0, p_blur=0.0, p_flip=0.5 if flip else 0.0)]


def multicrop_views(size: int, num_local: int = 6, local_size: int | None = None,
                    global_scale: tuple[float, float] = (0.14, 1.0),
                    local_scale: tuple[float, float] = (0.05, 0.14)) -> list[Augment]:
    """SwAV multi-crop (METHODS.md 7.4): 2 global crops (224 px, scale 0.14-1) + ``num_local`` local
    crops (96 px, scale 0.05-0.14), scaled to ``size``: local side = round(size * 96 / 224) unless given.
    Colour: SwAV's strength-1 jitter (0.8, 0.8, 0.8, 0.2) p 0.8, grey 0.2, blur p 0.5, flip [our reading
    of main_swav.py's transforms; the blur is applied to every crop]."""
    local = local_size or max(8, int(round(size * 96 / 224)))
    colour = dict(jitter=(0.8, 0.8, 0.8, 0.2))
    return [Augment(size=size, scale=global_scale, **colour)] * 2 + \
        [Augment(size=local, scale=local_scale, **colour)] * num_local
