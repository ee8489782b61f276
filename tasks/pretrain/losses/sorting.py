"""Differentiable sorting networks (Petersen et al., ICML 2021 / ICLR 2022), the relaxed sort NeCo uses.

A sorting network is a fixed list of layers of comparators; a comparator on wires (lo, hi) puts the
smaller value on ``lo`` and the larger on ``hi``. Relaxed, it mixes: with ``a = x[lo]``, ``b = x[hi]`` and
``alpha = f(steepness * (b - a))`` (the probability that ``a`` is the smaller),

    x[lo] <- alpha a + (1 - alpha) b,      x[hi] <- (1 - alpha) a + alpha b,

and the same mixing of the two columns of the running permutation matrix ``P`` (``P[j, r]``: weight of
input ``j`` on output rank ``r``; it starts as the identity). Every layer is a doubly-stochastic mix of
pairs of columns, so ``P`` stays doubly stochastic (rows and columns sum to 1), and as the steepness grows
it tends to the hard sort's permutation. Ascending order: rank 0 holds the smallest value.

Relaxations ``f``: ``cauchy`` ``atan(v) / pi + 1/2`` (diffsort 0.2.0's default, which NeCo uses: it
passes no distribution), ``logistic`` ``sigmoid(v)``; both satisfy ``f(-v) = 1 - f(v)``.

Networks: ``bitonic`` (``ceil(log2 n) (ceil(log2 n) + 1) / 2`` layers; for ``n`` not a power of two the
network of the next power is used with the missing wires treated as ``-inf`` at the top: a comparator
touching one of them leaves the other wire as it is, as in diffsort) and ``odd_even`` (odd-even
transposition, ``n`` layers).

Why our own and not the ``diffsort`` package: diffsort applies each layer as dense matrix products with
``n x n`` selection matrices (``O(n^3)`` per row and layer); here a layer gathers and writes the compared
columns (``O(n^2)``), which for NeCo's 49 references per patch is what makes the loss affordable on a CPU.
The tests check that both give the same values and matrices.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

DISTRIBUTIONS = ("cauchy", "logistic")
NETWORKS = ("bitonic", "odd_even")


@lru_cache(maxsize=64)
def bitonic_layers(n: int) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """Per layer, the comparators' ``(lo wires, hi wires)`` of the bitonic network over ``n`` wires: the
    network :func:`soft_sort` runs (:func:`_bitonic_plan`), as comparator lists."""
    if n < 1:
        raise ValueError(f"a sorting network needs n >= 1, got {n}")
    off = (2 ** math.ceil(math.log2(n)) if n > 1 else 1) - n  # wires 0..off-1 are the missing ones
    layers = []
    for m, desc, missing in _bitonic_plan(n, torch.device("cpu")):
        lo, hi = [], []
        for g in range(desc.shape[0]):
            for j in range(m):
                if missing[g, j]:  # a missing wire: the comparator passes the real one through
                    continue
                a, b = g * 2 * m + j, g * 2 * m + j + m
                if desc[g, 0]:  # descending half of a bitonic merge: the min goes to the upper wire
                    a, b = b, a
                lo.append(a - off)
                hi.append(b - off)
        if lo:
            layers.append((tuple(lo), tuple(hi)))
    return tuple(layers)


@lru_cache(maxsize=64)
def odd_even_layers(n: int) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """Odd-even transposition: layer ``t`` compares wires ``(j, j + 1)`` for ``j = t mod 2, t mod 2 + 2, ...``."""
    if n < 1:
        raise ValueError(f"a sorting network needs n >= 1, got {n}")
    layers = []
    for t in range(n):
        lo = tuple(range(t % 2, n - 1, 2))
        if lo:
            layers.append((lo, tuple(j + 1 for j in lo)))
    return tuple(layers)


def _alpha(v: torch.Tensor, distribution: str) -> torch.Tensor:
    if distribution == "cauchy":
        return torch.atan(v) / math.pi + 0.5
    if distribution == "logistic":
        return torch.sigmoid(v)
    raise ValueError(f"unknown relaxation {distribution!r} (known: {', '.join(DISTRIBUTIONS)})")


class _Mix(torch.autograd.Function):
    """One comparator layer's mixing of wire pairs: ``v[..., 0, :]``, ``v[..., 1, :]`` = ``a``, ``b`` ->
    ``(w a + (1 - w) b, (1 - w) a + w b)``. The mixing matrix is symmetric, so the input gradient is the
    same mixing of the output gradient, and ``dL/dw = sum (g_a - g_b)(a - b)`` over the dims ``w`` is
    broadcast along. Written out (two lerps into one buffer each way) it needs about half the memory
    passes autograd's lerp/stack graph makes -- the sort is memory-bound."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        a, b = v.select(-2, 0), v.select(-2, 1)
        w = w.to(v.dtype)
        out = torch.empty_like(v)
        torch.lerp(b, a, w, out=out.select(-2, 0))
        torch.lerp(a, b, w, out=out.select(-2, 1))
        ctx.save_for_backward(v, w)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        v, w = ctx.saved_tensors
        ga, gb = g.select(-2, 0), g.select(-2, 1)
        gv = torch.empty_like(g)
        torch.lerp(gb, ga, w, out=gv.select(-2, 0))
        torch.lerp(ga, gb, w, out=gv.select(-2, 1))
        gw = (ga - gb).mul_(v.select(-2, 0) - v.select(-2, 1))
        dims = [i for i, (sw, sg) in enumerate(zip(w.shape, gw.shape)) if sw == 1 and sg != 1]
        return gv, (gw.sum(dims, keepdim=True) if dims else gw)


@lru_cache(maxsize=64)
def _bitonic_plan(n: int, device: torch.device) -> tuple[tuple[int, torch.Tensor, torch.Tensor], ...]:
    """Per layer of the bitonic network over ``2^k >= n`` wires: the comparator distance ``m``, per group
    of ``2m`` wires whether it sorts descending ``[G, 1]``, and per comparator whether it touches a missing
    wire (then it passes its wires through) ``[G, m]``."""
    k = math.ceil(math.log2(n)) if n > 1 else 0
    full, off = 2 ** k, 2 ** k - n
    plan = []
    for block in range(k):
        for layer in range(block + 1):
            m = 2 ** (block - layer)
            starts = torch.arange(0, full, 2 * m)
            desc = ((starts // 2 ** (block + 1)) % 2 == 1).view(-1, 1)
            a = starts.view(-1, 1) + torch.arange(m).view(1, -1)
            plan.append((m, desc.to(device), (a < off).to(device)))  # a < b, so b missing implies a missing
    return tuple(plan)


def soft_sort(x: torch.Tensor, steepness: float = 10.0, network: str = "bitonic",
              distribution: str = "cauchy") -> tuple[torch.Tensor, torch.Tensor]:
    """Relaxed ascending sort of each row of ``x`` ``[R, n]``: ``(sorted values [R, n], P [R, n, n])``
    with ``P[r, j, k]`` the weight of input ``j`` on rank ``k`` (``x_sorted = einsum('rj,rjk->rk', x, P)``).

    The bitonic network runs on strided views (a layer's comparators are the pairs ``(i, i + m)`` within
    groups of ``2m`` wires): no gathers, two new tensors per layer."""
    if x.ndim != 2:
        raise ValueError(f"soft_sort sorts the rows of a [R, n] tensor, got shape {tuple(x.shape)}")
    if network not in NETWORKS:
        raise ValueError(f"unknown sorting network {network!r} (known: {', '.join(NETWORKS)})")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown relaxation {distribution!r} (known: {', '.join(DISTRIBUTIONS)})")
    r, n = x.shape
    if network == "odd_even":
        return _sort_by_index(x, odd_even_layers(n), steepness, distribution)
    full = 2 ** math.ceil(math.log2(n)) if n > 1 else 1
    off = full - n
    # missing wires first (they hold 0 and zero columns; every comparator touching one is the identity)
    x = torch.cat([x.new_zeros(r, off), x], 1)
    perm = torch.cat([x.new_zeros(n, off), torch.eye(n, dtype=x.dtype, device=x.device)], 1).expand(r, n, full)
    for m, desc, missing in _bitonic_plan(n, x.device):  # cached per (n, device)
        v = x.view(r, -1, 2, m)
        a, b = v[:, :, 0], v[:, :, 1]
        alpha = _alpha(steepness * (b - a), distribution)  # P(a is the smaller)
        # the weight of a on wire a: alpha where wire a takes the min, 1 - alpha where it takes the max
        w = torch.where(desc, 1.0 - alpha, alpha)
        if off:
            w = w.masked_fill(missing, 1.0)
        x = _Mix.apply(v, w).view(r, full)
        perm = _Mix.apply(perm.reshape(r, n, -1, 2, m), w.unsqueeze(1)).view(r, n, full)
    return x[:, off:], perm[:, :, off:]


def _sort_by_index(x: torch.Tensor, layers, steepness: float, distribution: str):
    """Any network given as comparator lists, applied by gathering and writing the compared wires."""
    n = x.shape[1]
    perm = torch.eye(n, dtype=x.dtype, device=x.device).expand(x.shape[0], n, n)
    for lo, hi in layers:
        lo_i = torch.tensor(lo, device=x.device)
        hi_i = torch.tensor(hi, device=x.device)
        a, b = x[:, lo_i], x[:, hi_i]
        alpha = _alpha(steepness * (b - a), distribution)
        beta = 1.0 - alpha
        x = x.index_copy(1, lo_i, alpha * a + beta * b).index_copy(1, hi_i, beta * a + alpha * b)
        pa, pb = perm[:, :, lo_i], perm[:, :, hi_i]
        al, be = alpha.unsqueeze(1), beta.unsqueeze(1)
        perm = perm.index_copy(2, lo_i, al * pa + be * pb).index_copy(2, hi_i, be * pa + al * pb)
    return x, perm
