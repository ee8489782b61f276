import numpy as np
import torch

from tasks.data.transforms import MoCoV2Augment, TwoViews, random_resized_crop_params


def _images(n=4, h=40, w=50):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_two_views_shapes_dtype_and_normalisation():
    views = TwoViews(MoCoV2Augment(size=32), seed=0)(_images())
    assert len(views) == 2
    for v in views:
        assert v.shape == (4, 3, 32, 32) and v.dtype == torch.float32
        assert torch.isfinite(v).all()
        assert v.min() >= (0 - 0.485) / 0.229 - 1e-4 and v.max() <= (1 - 0.406) / 0.225 + 1e-4
    assert not torch.equal(views[0], views[1])


def test_seeded_is_reproducible_and_seeds_differ():
    imgs = _images()
    a = TwoViews(MoCoV2Augment(size=24), seed=3)(imgs)
    b = TwoViews(MoCoV2Augment(size=24), seed=3)(imgs)
    c = TwoViews(MoCoV2Augment(size=24), seed=4)(imgs)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_accepts_tensors_and_greyscale_and_kernel_size():
    aug = MoCoV2Augment(size=64)
    assert aug.kernel_size == 7 and MoCoV2Augment(size=224).kernel_size == 23
    g = torch.Generator().manual_seed(0)
    assert aug(torch.zeros(30, 20, 3, dtype=torch.uint8), g).shape == (3, 64, 64)
    assert aug(np.zeros((30, 20), dtype=np.uint8), g).shape == (3, 64, 64)


def test_crop_params_within_image_and_scale():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_params(60, 80, (0.2, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80 and h > 0 and w > 0
