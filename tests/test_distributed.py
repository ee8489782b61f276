"""The gather/shuffle helpers with 2 real gloo workers (the class of bug in lightly#1528/#1018)."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tasks.pretrain import distributed as D
from tasks.pretrain.losses.infonce import MemoryQueue


def _worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)
        x = torch.arange(4, dtype=torch.float).view(2, 2) + 10 * rank
        full = D.all_gather_nograd(x)
        ok = torch.equal(full, torch.cat([torch.arange(4.0).view(2, 2), torch.arange(4.0).view(2, 2) + 10]))
        # gradient: every rank's loss is sum(gathered * (rank + 1)) -> local grad = 1 + 2 = 3
        xg = x.clone().requires_grad_()
        (D.all_gather_with_grad(xg) * (rank + 1)).sum().backward()
        ok &= torch.equal(xg.grad, torch.full_like(x, 3.0))
        # shuffle then unshuffle returns the local batch; shuffled halves together hold all rows
        shuffled, idx = D.batch_shuffle(x)
        ok &= torch.equal(D.batch_unshuffle(shuffled, idx), x)
        ok &= sorted(D.all_gather_nograd(shuffled)[:, 0].tolist()) == sorted(full[:, 0].tolist())
        q = MemoryQueue(8, 2)
        q.queue.zero_()
        q.enqueue(x)
        ok &= torch.equal(q.queue[:4], full) and int(q.ptr) == 4
        results[rank] = bool(ok) and D.world_size() == 2 and D.rank() == rank
    finally:
        dist.destroy_process_group()


def test_two_workers():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(port, results), nprocs=2, join=True)
    assert dict(results) == {0: True, 1: True}


def test_single_process_noops():
    x = torch.randn(3, 2)
    assert D.world_size() == 1 and D.rank() == 0
    assert D.all_gather_nograd(x) is x and D.all_gather_with_grad(x) is x
    y, idx = D.batch_shuffle(x)
    assert y is x and idx is None and D.batch_unshuffle(y, idx) is x
