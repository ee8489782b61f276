"""One configurable MLP head (projector / predictor) shared by every method."""
from __future__ import annotations

from torch import nn


class MLPHead(nn.Sequential):
    """Linear layers over ``dims = [in, hidden..., out]``.

    Hidden layers are ``Linear -> [BN] -> act``; the last is ``Linear -> [BN]`` (``last_bn``, optionally
    without affine parameters as in MoCo v3's projector). A Linear followed by BN has no bias (BN's shift
    makes it redundant).
    """

    def __init__(self, dims: list[int], *, batch_norm: bool = False, last_bn: bool = False,
                 last_bn_affine: bool = True, activation: type[nn.Module] = nn.ReLU):
        if len(dims) < 2:
            raise ValueError(f"MLPHead needs at least [in, out] dims, got {dims}")
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(dims) - 2
            bn = last_bn if last else batch_norm
            layers.append(nn.Linear(d_in, d_out, bias=not bn))
            if bn:
                layers.append(nn.BatchNorm1d(d_out, affine=last_bn_affine if last else True))
            if not last:
                layers.append(activation())
        super().__init__(*layers)
        self.dims = list(dims)


def mocov2_head(feat_dim: int, hidden_dim: int | None = None, out_dim: int = 128) -> MLPHead:
    """MoCo v2 projector (Chen et al. 2020, arXiv 2003.04297 sec. 3): feat -> hidden -> ReLU -> 128, no BN.

    ``hidden_dim`` None = ``feat_dim``: the paper's 2048 -> 2048 -> 128 on ResNet-50 (METHODS.md), 512 -> 512
    -> 128 on ResNet-18 as lightly's resnet18 examples. DenseCL's dense head has the same widths."""
    return MLPHead([feat_dim, feat_dim if hidden_dim is None else hidden_dim, out_dim])
