"""GenView's pairing (METHODS.md 1.2): with probability p one of the two view slots, uniformly, shows a
generated variation of the image, the other the original; local crops and images without variations keep
the original. Checked on the pure functions and through the pretrain feeder with real augmentations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.data.transforms import Augment, MultiView
from tasks.pretrain.feeder import ViewFeeder
from tasks.views.pairing import pick_variation_slots, view_sources


def test_slots_follow_probability_and_are_balanced():
    rng = np.random.default_rng(0)
    n = 4000
    slot, which = pick_variation_slots(np.full(n, 3), 0.5, rng)
    used = slot >= 0
    assert abs(used.mean() - 0.5) < 0.03
    assert abs((slot[used] == 0).mean() - 0.5) < 0.04  # either slot, uniformly
    assert set(np.unique(which)) == {0, 1, 2}  # any of the image's variations
    none, _ = pick_variation_slots(np.full(10, 2), 0.0, rng)
    assert (none == -1).all()
    always, _ = pick_variation_slots(np.array([1, 0, 2, 0]), 1.0, rng)
    assert (always[[1, 3]] == -1).all() and (always[[0, 2]] >= 0).all()  # no variation: both originals


def test_view_sources_put_the_variation_in_its_slot_only():
    originals = ["o0", "o1", "o2"]
    variations = [["a0"], ["b0", "b1"], []]
    got = view_sources(originals, variations, np.array([1, 0, -1]), np.array([0, 1, 0]), num_views=4)
    assert got == [["o0", "b1", "o2"], ["a0", "o1", "o2"], originals, originals]


def test_multiview_per_view_sources():
    aug = Augment(size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), p_jitter=0, p_grey=0, p_blur=0, p_flip=0)
    black, white = np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)
    v0, v1 = MultiView([aug, aug], seed=0)([[black, white], [white, black]], per_view=True)
    assert v0[0].mean() < v0[1].mean() and v1[0].mean() > v1[1].mean()
    with pytest.raises(ValueError, match="per_view"):
        MultiView([aug, aug])([[black]], per_view=True)


def test_feeder_pairs_one_variation_per_image_and_its_mask():
    aug = Augment(size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), p_jitter=0, p_grey=0, p_blur=0, p_flip=0)
    n = 16
    images = np.zeros((n, 8, 8, 3), np.uint8)  # originals black, variations white
    variations = [np.full((1, 8, 8, 3), 255, np.uint8) for _ in range(n)]
    masks = np.zeros((n, 8, 8), np.float32)
    var_masks = [np.ones((1, 8, 8), np.float32) for _ in range(n)]
    feeder = ViewFeeder(images, n, 0, 1, seed=0, start_step=0, max_steps=2, augments=[aug, aug], masks=masks,
                        variations=variations, variation_masks=var_masks, prob_generated=1.0)
    for step in range(2):
        (views, extra), _ = feeder.next()
        bright = torch.stack([v.flatten(1).mean(1) for v in views]) > 0  # [2, n]: which slot shows the variation
        assert (bright.sum(0) == 1).all(), "exactly one of the two views comes from the variation"
        assert 0 < bright[0].sum() < n  # both slots get used
        m = torch.stack([x.flatten(1).mean(1) for x in extra["masks"]]) > 0.5
        assert torch.equal(m, bright), "each view's mask is the mask of the image it was cropped from"
    # the same step gives the same pairing (a pure function of seed, rank and step: resumable)
    def pattern(step):
        return [[int(x.mean()) for x in view] for view in feeder._sources(feeder.indices(step), step)[0]]

    assert pattern(5) == pattern(5) and pattern(5) != pattern(6)
