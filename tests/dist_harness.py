"""Run a function on N real gloo ranks (torch.multiprocessing spawn) and compare with one rank.

``run_ranks(fn, world, *args)`` spawns ``world`` processes, each calls ``fn(rank, world, *args)`` inside an
initialised gloo process group (even for world 1, so code paths are the same) and returns every rank's
result (anything ``torch.save`` can store). ``fn`` must be importable (a module-level function).

``rank_slice`` and ``ddp_gradients`` give what DDP would: each rank's contiguous share of a global batch,
and gradients averaged over ranks.
"""
from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world, *args), os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args) -> list:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_entry, args=(world, _free_port(), fn, args, out), nprocs=world, join=True)
        return [torch.load(os.path.join(out, f"{r}.pt"), weights_only=False) for r in range(world)]


def rank_slice(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous share of a global batch (dim 0 divisible by ``world``)."""
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n]


def ddp_gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gradients averaged over ranks, as DDP leaves them after backward: name -> tensor. A parameter that got
    a gradient on some ranks only (a sparse expert) counts as zero on the others, as DDP with
    ``find_unused_parameters`` does."""
    world = dist.get_world_size()
    out = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        has = torch.tensor(float(p.grad is not None))
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        if not has:
            continue
        g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        out[name] = g / world
    return out


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean of a per-rank scalar (e.g. each rank's loss) over ranks, as DDP's averaged objective."""
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / dist.get_world_size()
