"""``pretrain.compile: true`` (``method.compile()``, in place): for every method, three training steps of the
compiled method give the losses and weights of the eager one, and the state dict keeps its keys (checkpoints,
resume and the exported encoder do not see the compilation). Slow: inductor compiles C++ on the CPU, about
half a minute per method on 2 cores."""
from __future__ import annotations

import copy

import pytest
import torch

from tasks.pretrain.loop import build_optimizer, train_step
from tasks.pretrain.methods import METHODS
from tests.test_methods import build, global_views

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", sorted(METHODS))
def test_compiled_method_trains_like_eager(name):
    eager = build(name)
    compiled = copy.deepcopy(eager)
    compiled.compile()
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    opts = [build_optimizer(m, "sgd", 0.1, 0.9, 1e-4) for m in (eager, compiled)]
    for step in range(3):
        views = global_views(eager, 8, seed=step)
        a = train_step(eager, opts[0], views, step, 10, 0.1)
        b = train_step(compiled, opts[1], views, step, 10, 0.1)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5), (step, a, b)
    for (k, v), w in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(w, v, rtol=1e-4, atol=1e-5, msg=k)
