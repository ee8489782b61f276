"""Typed, frozen configuration: one dataclass per stage, strict parsing.

Every stage reads exactly one section of the pipeline file. Unknown keys and wrong types raise
``ConfigError`` whose message names the full key (``pretrain.lr: expected float, got 'fast'``), so the
CLI can print one line and exit 2 instead of a traceback.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A bad configuration value; the message names the offending key."""


# ----------------------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class CurateConfig:
    input: str = ""  # image folder, Parquet file/folder, or fsspec URI; builtin://shapes for the sample
    labels: str = "folder"  # "folder" (parent dir name), "none", or "column:<name>" for Parquet input
    image_column: str = "image"  # bytes column for Parquet input
    max_side: int = 256  # larger images are downscaled so the longest side is max_side (0: keep)
    min_side: int = 8  # smaller images are quarantined
    max_pixels: int = 40_000_000  # decompression-bomb limit, checked before decoding
    shard_rows: int = 256
    sample_size: int = 480  # built-in sample: number of images
    sample_resolution: int = 64  # built-in sample: image side


@dataclass(frozen=True)
class ClusterConfig:
    # timm model name; MoCE clusters on MAE features: a ViT (e.g. vit_base_patch16_224 with encoder_kwargs
    # {global_pool: avg, fc_norm: false, class_token: false}) and the checkpoint of a (first-round) MAE encoder
    encoder: str = "resnet18"
    encoder_kwargs: dict = field(default_factory=dict)  # extra timm kwargs (img_size, pooling, tiny test ViTs)
    checkpoint: str = ""  # local checkpoint (state dict; a pretrain stage's encoder.pt) or empty for random init
    resolution: int = 64
    k: int = 8
    batch_size: int = 64
    seed: int = 0


@dataclass(frozen=True)
class MasksConfig:
    encoder: str = "vit_tiny_patch16_224"  # timm ViT name; GenView uses a large CLIP ViT
    checkpoint: str = ""
    resolution: int = 64  # must be a multiple of the patch size
    encoder_kwargs: dict = field(default_factory=dict)  # extra timm kwargs (tiny random ViTs in tests)
    foreground_fraction: float = 0.4  # share of patches called foreground (GenView README: ~40 %)
    pca_sample: int = 256  # images used to fit the principal direction
    batch_size: int = 64
    gt_masks: str = ""  # folder of ground-truth masks (same relative paths, .png) to report IoU
    seed: int = 0


@dataclass(frozen=True)
class ViewsConfig:
    generator: str = "none"  # "none": classic augmentations only (GenView off) | "unclip": diffusion variations
    model: str = "stabilityai/stable-diffusion-2-1-unclip"  # hub id, local folder, or "tiny-random" (tests)
    revision: str = ""  # hub revision (commit or tag); empty: the default
    guidance_scale: float = 10.0
    steps: int = 20  # denoising steps
    size: int = 512  # side of each generated variation
    prompt: str = ""  # GenView conditions on the image only; the empty prompt is the faithful choice
    views_per_image: int = 1
    batch_size: int = 4  # images per pipeline call (calls never mix noise levels)
    retries: int = 1  # further attempts for an image whose generation failed, before it is quarantined
    use_gpu: str = "auto"  # auto (one actor per GPU, fp16, when the cluster has GPUs) | yes | no
    seed: int = 0  # with the image id, fixes each view's diffusion noise
    noise_bins: tuple = (0.2, 0.4, 0.6, 0.8, 1.0)  # right-closed bins on the foreground ratio
    noise_levels: tuple = (0, 100, 200, 300, 400)
    prob_generated: float = 1.0  # chance that one of a pair's two views comes from a variation


@dataclass(frozen=True)
class PretrainConfig:
    method: str = "mocov2"
    backbone: str = "resnet18"
    backbone_kwargs: dict = field(default_factory=dict)
    # start weights (a local state dict: DINOv2's for NeCo's post-training, or an earlier encoder.pt); empty:
    # random init (or timm's hub weights with backbone_kwargs pretrained: true). Its SHA-256 is in lineage.
    init_checkpoint: str = ""
    cifar_stem: bool = True  # 3x3 stride-1 stem without max-pool, for small images
    resolution: int = 64
    num_workers: int = 2
    batch_size: int = 64  # global batch, split across workers
    epochs: int = 10
    max_steps: int = 0  # 0: epochs decide
    lr: float = 0.06  # at batch 256; scaled linearly by the global batch (all workers and nodes counted)
    optimizer: str = "sgd"  # sgd | lars | adamw (biases and norm parameters: see decay_norm_and_bias)
    momentum: float = 0.9  # SGD/LARS momentum (AdamW uses adamw_betas)
    adamw_betas: tuple = (0.9, 0.999)  # AdamW (beta1, beta2); MAE/MixedAE/MoCE: (0.9, 0.95); I-JEPA: the default
    weight_decay: float = 5e-4
    # weight decay on biases and norm parameters too: auto = the method's reference recipe (MoCo v2, DenseCL:
    # yes, as their official code; the others: no, and no LARS scaling for them) | yes | no
    decay_norm_and_bias: str = "auto"
    warmup_steps: int = 10
    clip_grad: float = 0.0  # max global gradient norm; 0 = no clipping
    precision: str = "auto"  # auto (bf16 autocast on a GPU or a CPU with bf16 matrix units, else fp32) | fp32 | bf16
    channels_last: bool = True  # NHWC memory layout for conv backbones (faster with oneDNN / cuDNN)
    compile: bool = False  # torch.compile the method
    sync_bn: bool = False  # batch-norm statistics over all workers' batches
    use_gpu: str = "auto"  # auto (one GPU per worker when the cluster has them) | yes | no
    knn_monitor_every: int = 1  # epochs between online kNN checks on the held-out labelled split; 0 = off
    knn_monitor_size: int = 1000  # at most this many labelled images for the monitor
    # GenView's quality-driven loss (METHODS.md 1.3) on any method: a frozen encoder (timm name, "" = off)
    # pools each view's foreground/background under the masks-stage mask; pairs weighted N softmax(gamma q)
    quality_encoder: str = ""
    quality_encoder_kwargs: dict = field(default_factory=dict)
    quality_checkpoint: str = ""  # local weights for the frozen encoder (no downloads)
    quality_gamma: float = 1.0
    checkpoint_every: int = 50
    seed: int = 0
    method_kwargs: dict = field(default_factory=dict)  # method-specific (e.g. queue_size, temperature)
    augment: dict = field(default_factory=dict)  # view augmentation overrides (tasks/data/transforms.py fields)
    log_every: int = 10
    threads_per_worker: int = 1
    register_model: bool = True


@dataclass(frozen=True)
class EvaluateConfig:
    knn_k: int = 20
    knn_temperature: float = 0.07
    resolution: int = 64
    batch_size: int = 128
    linear_epochs: int = 100
    linear_lr: float = 0.1
    test_fraction: float = 0.3  # held-out share of the labelled images (stratified)
    baseline_random: bool = True  # also evaluate the randomly initialised backbone
    # MoCE: pick each MoE layer's expert for this set (its train split, embedded by the cluster stage's
    # encoder) and evaluate that dense ViT too
    expert_search: bool = True
    # Dense evaluation (METHODS.md 8.3, 8.4) on a segmentation set: a folder with manifest.csv (image, mask,
    # split; class-id PNG masks), e.g. ../shared/data/camvid; empty = off
    seg_root: str = ""
    seg_classes: int = 11  # CamVid's SegNet split
    seg_ignore: tuple = (11,)  # mask values that are unlabelled (CamVid: void 11)
    seg_train_split: str = "train"
    seg_val_split: str = "val"
    seg_resolution: int = 0  # square input side; 0 = pretrain.resolution (a ViT is built for that size)
    seg_limit: int = 0  # at most this many images per split (0 = all)
    seg_linear: bool = True  # linear segmentation: 1x1 conv on frozen features
    seg_linear_epochs: int = 25
    seg_linear_lr: float = 0.01
    seg_out_size: int = 100  # logits and masks compared at this size (100 at 448 px in the protocol)
    seg_hummingbird: bool = True  # in-context segmentation by patch retrieval (faiss)
    seg_k: int = 30
    seg_search: str = "faiss"  # exact neighbours: faiss (IndexFlatIP) | torch (matmul + topk, faster on CPU)
    seg_temperature: float = 0.02
    seg_memory: int = 0  # memory patches (0 = every labelled train patch)
    seg_augment_epochs: int = 2  # augmented passes over the train images for the memory (0 = the images as
    # they are); 2 as the open Hummingbird evaluation (METHODS.md 8.4)
    seed: int = 0


@dataclass(frozen=True)
class PipelineConfig:
    name: str = "sslforge"
    experiment: str = "sslforge"
    curate: CurateConfig = field(default_factory=CurateConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    masks: MasksConfig = field(default_factory=MasksConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


SECTIONS = ("curate", "cluster", "masks", "views", "pretrain", "evaluate")


# ------------------------------------------------------------------------------------------------ parsing
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
    else:  # pragma: no cover - only the types above are used in the sections
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def from_dict(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build ``cls`` from ``data``; unknown keys and wrong types raise ConfigError naming the key."""
    data = data or {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = [n for n in names if n.startswith(str(key)[:3])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"{full}: unknown key{hint}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain, JSON-able dict (tuples become lists) of a config dataclass."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` → (["section", "key"], value); the value is read as YAML scalar/list."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected SECTION.KEY=VALUE")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (raw or {}).items()}
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {} if nxt is None else nxt
                if not isinstance(nxt, dict):
                    raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
                node[part] = nxt
            node = nxt
        node[path[-1]] = value
    return out


def load_pipeline(raw: dict | None, overrides: list[str] = ()) -> PipelineConfig:
    cfg = from_dict(PipelineConfig, apply_overrides(raw or {}, list(overrides)))
    validate(cfg)
    return cfg


def validate(cfg: PipelineConfig) -> None:
    """Cross-field checks that a type alone cannot express."""
    if not cfg.curate.input:
        raise ConfigError("curate.input: required (an image folder, a Parquet path, a URI or builtin://shapes)")
    v = cfg.views
    if v.generator not in ("none", "unclip"):
        raise ConfigError(f"views.generator: expected 'none' or 'unclip', got {v.generator!r}")
    if v.use_gpu not in ("auto", "yes", "no"):
        raise ConfigError(f"views.use_gpu: expected auto, yes or no, got {v.use_gpu!r}")
    if len(v.noise_bins) != len(v.noise_levels):
        raise ConfigError("views.noise_levels: must have one level per entry of views.noise_bins")
    if not 0.0 <= v.prob_generated <= 1.0:
        raise ConfigError(f"views.prob_generated: expected a probability in [0, 1], got {v.prob_generated}")
    for key in ("views_per_image", "batch_size", "steps", "size"):
        if getattr(v, key) < 1:
            raise ConfigError(f"views.{key}: expected >= 1, got {getattr(v, key)}")
    if not 0.0 < cfg.masks.foreground_fraction < 1.0:
        raise ConfigError("masks.foreground_fraction: must be in (0, 1)")
    if cfg.pretrain.num_workers < 1:
        raise ConfigError("pretrain.num_workers: must be >= 1")
    if cfg.pretrain.batch_size % cfg.pretrain.num_workers:
        raise ConfigError("pretrain.batch_size: must be divisible by pretrain.num_workers")
    from tasks.pretrain.methods import METHODS

    if cfg.pretrain.method not in METHODS:
        raise ConfigError(f"pretrain.method: unknown method {cfg.pretrain.method!r} (known: {', '.join(sorted(METHODS))})")
    if cfg.pretrain.optimizer.lower() not in ("sgd", "lars", "adamw"):
        raise ConfigError(f"pretrain.optimizer: {cfg.pretrain.optimizer!r} is not one of sgd, lars, adamw")
    betas = cfg.pretrain.adamw_betas
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"pretrain.adamw_betas: expected two numbers in [0, 1), got {list(betas)}")
    if cfg.pretrain.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"pretrain.precision: {cfg.pretrain.precision!r} is not one of auto, fp32, bf16")
    if cfg.pretrain.decay_norm_and_bias not in ("auto", "yes", "no"):
        raise ConfigError(f"pretrain.decay_norm_and_bias: {cfg.pretrain.decay_norm_and_bias!r} is not one of auto, yes, no")
    if cfg.pretrain.use_gpu not in ("auto", "yes", "no"):
        raise ConfigError(f"pretrain.use_gpu: {cfg.pretrain.use_gpu!r} is not one of auto, yes, no")
    bad = sorted(set(cfg.pretrain.augment) - AUGMENT_FIELDS)
    if bad:
        raise ConfigError(f"pretrain.augment.{bad[0]}: unknown augmentation option "
                          f"(known: {', '.join(sorted(AUGMENT_FIELDS))})")


# Fields of tasks.data.transforms.Augment that pretrain.augment may override (kept here so validating a config
# does not import torch; tests/test_config.py checks the two agree).
AUGMENT_FIELDS = frozenset({"scale", "ratio", "jitter", "p_jitter", "p_grey", "p_blur", "sigma", "p_solarize", "p_flip"})
