"""GenView's view generator (tasks/views/generate.py) on the tiny random Stable unCLIP pipeline: the real
diffusers classes and call path, no download."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.views.generate import (TINY_MODEL, VariationGenerator, encode_jpeg, load_pipeline, pipeline_fingerprint,
                                  view_seed)

SETTINGS = {"size": 32, "steps": 3}


def _decode(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB")).astype(int)


def _images(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [encode_jpeg(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def gen():
    torch.set_num_threads(1)
    return VariationGenerator(TINY_MODEL, settings=SETTINGS, threads=1)


class _CountingPipe:
    """Records the noise level of every pipeline call, then calls the real pipeline."""

    def __init__(self, pipe):
        self.pipe, self.levels = pipe, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, **kw):
        self.levels.append((kw["noise_level"], len(kw["image"])))
        return self.pipe(**kw)


def test_seed_is_a_function_of_the_id():
    assert view_seed("img-1") == view_seed("img-1") != view_seed("img-2")
    assert view_seed("img-1", 0) != view_seed("img-1", 1)
    assert 0 <= view_seed("x") < 2 ** 63


def test_views_reproducible_per_id_and_grouped_by_noise_level(gen):
    imgs = _images(4)
    counting = _CountingPipe(gen.pipe)
    gen.pipe = counting
    try:
        out = gen({"id": ["a", "b", "c", "d"], "image": imgs, "noise_level": [0, 300, 0, 300]})
    finally:
        gen.pipe = counting.pipe
    assert sorted(counting.levels) == [(0, 2), (300, 2)]  # one call per noise level, never mixed
    assert out["id"] == ["a", "b", "c", "d"] and out["noise_level"] == [0, 300, 0, 300]
    assert out["error"] == [""] * 4 and out["seed"] == [view_seed(i) for i in "abcd"]
    views = [_decode(v) for v in out["view"]]
    assert all(v.shape == (32, 32, 3) for v in views)
    # The same id gives the same view alone, in another batch, or after other work.
    alone = gen({"id": ["c"], "image": [imgs[2]], "noise_level": [0]})
    assert np.abs(_decode(alone["view"][0]) - views[2]).max() <= 2
    # Different ids (seeds) or different noise levels give different views of the same image.
    same_img = gen({"id": ["p", "q", "p"], "image": [imgs[0]] * 3, "noise_level": [0, 0, 400]})
    p0, q0, p400 = (_decode(v) for v in same_img["view"])
    assert np.abs(p0 - q0).mean() > 1.0 and np.abs(p0 - p400).mean() > 1.0


def test_failed_image_is_reported_and_the_rest_generated():
    g = VariationGenerator(TINY_MODEL, settings=SETTINGS, threads=1, retries=2, fail_ids=("bad",))
    out = g({"id": ["ok1", "bad", "ok2"], "image": _images(3), "noise_level": [100, 100, 100]})
    assert out["view"][1] == b"" and "after 3 attempt(s)" in out["error"][1] and "injected failure" in out["error"][1]
    assert out["error"][0] == out["error"][2] == "" and len(out["view"][0]) > 0 and len(out["view"][2]) > 0
    # An undecodable image fails alone too, with the decoder's reason.
    out = g({"id": ["x", "y"], "image": [b"not an image", _images(1)[0]], "noise_level": [0, 0]})
    assert out["view"][0] == b"" and out["error"][0] and out["error"][1] == ""


def test_local_folder_loads_the_same_pipeline(tmp_path, gen):
    gen.pipe.save_pretrained(tmp_path / "unclip")
    loaded = load_pipeline(str(tmp_path / "unclip"))
    assert type(loaded).__name__ == "StableUnCLIPImg2ImgPipeline"
    assert pipeline_fingerprint(loaded, "x")["weights_sha256"] == gen.fingerprint["weights_sha256"]
    other = VariationGenerator(TINY_MODEL, settings=SETTINGS, threads=1, seed=1)
    assert other.fingerprint["weights_sha256"] != gen.fingerprint["weights_sha256"]


def test_missing_model_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="cannot load the view generator .*local folder"):
        load_pipeline("no-such-org/no-such-unclip")
