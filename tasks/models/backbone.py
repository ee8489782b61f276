"""Backbones by timm name, CIFAR-style stems for small images, and frozen feature extraction.

Weights are never downloaded here: ``pretrained`` defaults to False. To start from published weights
without network access, pass a local file, either our own ``checkpoint=`` (a state dict saved by
``torch.save``) or timm's own mechanism through the keyword arguments::

    build_backbone("resnet50", pretrained=True,
                   pretrained_cfg_overlay={"file": "/data/weights/resnet50.safetensors"})
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _apply_cifar_stem(model: nn.Module, name: str) -> None:
    # A 7x7/2 conv plus a 3x3/2 max-pool would shrink a 32-96 px image 4x before the first block,
    # leaving almost no spatial extent at C5; the CIFAR stem keeps full resolution instead.
    conv, pool = getattr(model, "conv1", None), getattr(model, "maxpool", None)
    if not isinstance(conv, nn.Conv2d) or pool is None:
        raise ValueError(f"cifar_stem=True needs a ResNet with a single conv1 and a maxpool; {name!r} has none")
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Strictly load a local state dict (raw, ``{"state_dict": ...}``, or with a DDP ``module.`` prefix); one
    that does not fit as it is goes through timm's converter for the model's family (official DINOv2
    checkpoints, with or without registers, load into timm's ``vit_*_dinov2`` models this way)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, expected a state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
        return
    except RuntimeError as err:
        first = err
    converted = _timm_converted(model, state)
    if converted is not None:  # e.g. the official DINOv2 release (mask_token, register_tokens, pos_embed with the
        try:                   # class position), or another input size (position embedding resampled)
            model.load_state_dict(converted, strict=True)
            return
        except RuntimeError:
            pass
    raise ValueError(f"checkpoint {path} does not match the backbone (strict load): {first}") from first


def _timm_converted(model: nn.Module, state: dict) -> dict | None:
    """``state`` through timm's checkpoint converter for its model family (ViTs: DINOv2/CLIP/I-JEPA releases,
    position-embedding resampling), or None where there is none or it fails."""
    try:
        import importlib

        module = importlib.import_module(type(model).__module__)
        fn = getattr(module, "checkpoint_filter_fn", None)
        return fn(dict(state), model) if fn is not None else None
    except Exception:  # noqa: BLE001 -- only a second attempt; the strict error is what gets reported
        return None


class TinyConvNet(nn.Module):
    """A two-conv, normalisation-free network (``build_backbone("tiny_convnet")``) for tests and smoke runs.

    Same interface as a timm backbone with ``num_classes=0``: ``forward_features`` gives the feature map
    ``[B, width, H/4, W/4]``, ``forward`` the pooled ``[B, width]``, ``num_features`` the width. Having no
    batch norm, N ranks with B/N images compute exactly what one rank with B does.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        self.num_features = width
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width // 2, width, 3, stride=2, padding=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean((2, 3))


def build_backbone(name: str, *, cifar_stem: bool = False, checkpoint: str = "", **timm_kwargs) -> tuple[nn.Module, int]:
    """``timm.create_model(name, pretrained=False, num_classes=0, **timm_kwargs)`` -> (model, feat_dim).

    The model returns pooled features ``[B, feat_dim]`` and ``forward_features`` the unpooled map (ResNet)
    or tokens (ViT). ``checkpoint`` is loaded after the stem change, so encoders exported from CIFAR-stem
    pretraining load back with ``cifar_stem=True``. ``"tiny_convnet"`` is :class:`TinyConvNet`.
    """
    if name == "tiny_convnet":
        model = TinyConvNet(**timm_kwargs)
        if checkpoint:
            load_checkpoint(model, checkpoint)
        return model, model.num_features
    import timm

    kwargs = {"pretrained": False, "num_classes": 0, **timm_kwargs}
    model = timm.create_model(name, **kwargs)
    if cifar_stem:
        _apply_cifar_stem(model, name)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model, int(model.num_features)


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 images ``BxHxWx3`` or ``Bx3xHxW`` -> float ``Bx3xHxW`` normalised with ImageNet mean/std."""
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images with 4 dims, got shape {tuple(x.shape)}")
    if x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    else:
        x = x.float()
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m).div_(s)


@torch.no_grad()
def extract_features(model: nn.Module, images, batch_size: int = 256,
                     device: torch.device | str | None = None, forward=None) -> torch.Tensor:
    """Pooled features ``[N, D]`` (float32, on CPU) in eval mode; the model's train/eval mode is restored.

    uint8 images (``NxHxWx3`` or ``Nx3xHxW``) are normalised with :func:`normalize`; float images (either
    layout) are taken as already normalised. Features are not L2-normalised here (k-NN normalises itself).
    ``forward(batch)`` replaces ``model(batch).flatten(1)`` (e.g. dense maps,
    :func:`tasks.evaluate.dense.dense_features`). ``images``: a tensor or a numpy array (a read-only one,
    e.g. a view of an Arrow buffer, is copied: torch wants writable memory).
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images if images.flags.writeable else images.copy())
    device = torch.device(device) if device is not None else next(model.parameters()).device
    forward = forward or (lambda x: model(x).flatten(1))
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size].to(device, non_blocking=True)
            if chunk.dtype == torch.uint8:
                chunk = normalize(chunk)
            else:
                chunk = (chunk.permute(0, 3, 1, 2) if chunk.shape[1] != 3 and chunk.shape[-1] == 3 else chunk).float()
            out.append(forward(chunk).float().cpu())
        return torch.cat(out) if out else torch.empty(0, 0)
    finally:
        model.train(was_training)
