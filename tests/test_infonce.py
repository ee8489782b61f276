import math

import pytest
import torch
import torch.nn.functional as F

from tasks.pretrain.losses.infonce import InfoNCEQueueLoss, MemoryQueue


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.mark.parametrize("B,D,K", [(8, 16, 32), (5, 128, 100)])
def test_matches_lightly_ntxent_with_memory_bank(B, D, K):
    lightly_loss = pytest.importorskip("lightly.loss")
    q, k, queue = _unit(B, D, seed=0), _unit(B, D, seed=1), _unit(K, D, seed=2)
    ref = lightly_loss.NTXentLoss(temperature=0.2, memory_bank_size=(K, D))
    # lightly reads its negatives from the bank (stored [K, D], returned transposed) before updating it.
    ref.memory_bank.bank = queue.clone()
    expected = ref(q, k)
    ours = InfoNCEQueueLoss(temperature=0.2)(q, k, queue)
    assert torch.allclose(ours, expected, atol=1e-5), (ours, expected)


def test_matches_cross_entropy_per_sample():
    q, k, queue = _unit(6, 8, seed=3), _unit(6, 8, seed=4), _unit(20, 8, seed=5)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], 1) / 0.2
    expected = F.cross_entropy(logits, torch.zeros(6, dtype=torch.long), reduction="none")
    got = InfoNCEQueueLoss(0.2, reduction="none")(q, k, queue)
    assert got.shape == (6,)
    assert torch.allclose(got, expected, atol=1e-5)


def test_hand_computed_2x2():
    q = torch.eye(2)
    k = torch.eye(2)
    queue = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # each query: positive logit 1/0.2 = 5, negatives 0 and 5 -> -log(e^5 / (e^5 + e^0 + e^5))
    expected = math.log(2 + math.exp(-5))
    got = InfoNCEQueueLoss(temperature=0.2)(q, k, queue)
    assert abs(float(got) - expected) < 1e-6


def test_gradient_only_through_query():
    q = _unit(4, 8, seed=6).requires_grad_()
    queue = _unit(10, 8, seed=7).requires_grad_()
    InfoNCEQueueLoss(0.2)(q, _unit(4, 8, seed=8), queue).backward()
    assert q.grad is not None and queue.grad is None


def test_queue_fifo_and_wraparound():
    mq = MemoryQueue(size=5, dim=2)
    assert torch.allclose(mq.queue.norm(dim=1), torch.ones(5))
    a = torch.arange(6, dtype=torch.float).view(3, 2)
    mq.enqueue(a)
    assert torch.equal(mq.queue[:3], a) and int(mq.ptr) == 3
    b = 10 + torch.arange(6, dtype=torch.float).view(3, 2)
    mq.enqueue(b)  # 2 rows at the end, 1 wraps to the front
    assert torch.equal(mq.queue[3:], b[:2]) and torch.equal(mq.queue[:1], b[2:])
    assert torch.equal(mq.queue[1:3], a[1:]) and int(mq.ptr) == 1


def test_queue_batch_larger_than_queue_keeps_newest():
    mq = MemoryQueue(size=4, dim=1)
    mq.enqueue(torch.zeros(1, 1))  # ptr 1
    mq.enqueue(torch.arange(6, dtype=torch.float).view(6, 1))  # keeps 2..5, written from slot (1+2)%4 = 3
    assert int(mq.ptr) == (1 + 6) % 4
    # slot order from ptr on is oldest -> newest
    order = torch.cat([mq.queue[int(mq.ptr):], mq.queue[:int(mq.ptr)]]).flatten()
    assert order.tolist() == [2.0, 3.0, 4.0, 5.0]


def test_queue_many_steps_matches_reference_ring():
    size, bs = 7, 3
    mq, ring = MemoryQueue(size, 1), []
    for step in range(10):
        keys = torch.arange(step * bs, (step + 1) * bs, dtype=torch.float).view(bs, 1)
        mq.enqueue(keys)
        ring = (ring + keys.flatten().tolist())[-size:]
    order = torch.cat([mq.queue[int(mq.ptr):], mq.queue[:int(mq.ptr)]]).flatten().tolist()
    assert order == ring


@pytest.mark.parametrize("B,K", [(7, 33), (300, 1000)])
def test_fused_cpu_path_equals_plain_expression_and_its_gradients(B, K):
    from tasks.pretrain.losses import infonce

    q = (_unit(B, 16, seed=20) * 3).requires_grad_()  # not unit: the identity must not rely on norms
    k = _unit(B, 16, seed=21).requires_grad_()
    queue = _unit(K, 16, seed=22)
    w = torch.rand(B, generator=torch.Generator().manual_seed(23))
    assert infonce._fused(q, queue)
    got = InfoNCEQueueLoss(0.1, reduction="none")(q, k, queue)
    (got * w).sum().backward()
    gq, gk = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    qs = q / 0.1
    pos = (qs * k).sum(1)
    expected = torch.logaddexp(pos, torch.logsumexp(qs @ queue.t(), 1)) - pos
    (expected * w).sum().backward()
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(gq, q.grad, atol=1e-5, rtol=1e-4) and torch.allclose(gk, k.grad, atol=1e-5, rtol=1e-4)


def test_fused_cpu_path_gradcheck():
    from tasks.pretrain.losses.infonce import _QueueInfoNCE

    q = _unit(5, 8, seed=30).double().requires_grad_()
    k = _unit(5, 8, seed=31).double().requires_grad_()
    queue = _unit(12, 8, seed=32).double()
    assert torch.autograd.gradcheck(lambda a, b: _QueueInfoNCE.apply(a * 4, b, queue, torch.float64), (q, k))


def test_fused_cpu_path_under_bf16_autocast_stays_close_to_fp32():
    q = _unit(256, 128, seed=40).requires_grad_()
    k = F.normalize(q.detach() + 0.3 * _unit(256, 128, seed=41), dim=1)
    queue = _unit(4096, 128, seed=42)
    crit = InfoNCEQueueLoss(0.2, reduction="none")
    exact = crit(q, k, queue)
    exact.mean().backward()
    g_exact, q.grad = q.grad.clone(), None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = crit(q, k, queue)
    low.mean().backward()
    assert low.dtype == torch.float32
    assert (low - exact).abs().max() < 2e-3
    assert (q.grad - g_exact).norm() < 0.02 * g_exact.norm()
