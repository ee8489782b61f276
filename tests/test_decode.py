"""Curate-stage decoding: hostile inputs, normalisation rules, batch wrapper, listing."""
from __future__ import annotations

import hashlib
import io
import os
import sys

import numpy as np
import pytest
from PIL import Image, ImageFile

sys.path.insert(0, os.path.dirname(__file__))
import hostile  # noqa: E402
from hostile import HOSTILE_LIMITS, IGNORED, make_hostile_corpus  # noqa: E402

from tasks.curation.dedup import dedup  # noqa: E402
from tasks.data.decode import (  # noqa: E402
    SUPPORTED_EXTENSIONS,
    decode_batch,
    decode_image,
    has_image_extension,
    label_from_path,
    load_rgb,
    reason_code,
)
from tasks.data.listing import list_images, read_bytes  # noqa: E402


def _decode(data: bytes, source: str = "x", **over) -> dict:
    return decode_image(data, source, **{**HOSTILE_LIMITS, **over})


def _rgb(rec: dict) -> np.ndarray:
    assert rec["ok"], rec["reason"]
    arr = load_rgb(rec["image"])
    assert arr.dtype == np.uint8 and arr.shape == (rec["height"], rec["width"], 3)
    return arr.astype(int)


@pytest.fixture(params=["as_is", "simulated_non_root"])
def corpus(request, tmp_path, monkeypatch):
    if request.param == "simulated_non_root":
        # as root, chmod 000 does not stop reads; pretend we are an ordinary user for the locked file
        real_access = os.access

        def access(path, mode, *a, **kw):
            if str(path).endswith("locked.png") and mode & os.R_OK:
                return False
            return real_access(path, mode, *a, **kw)

        monkeypatch.setattr(os, "access", access)
    root = tmp_path / "corpus"
    expected = make_hostile_corpus(str(root))
    yield str(root), expected
    os.chmod(root / "bad" / "locked.png", 0o644)


def test_hostile_corpus_full_accounting(corpus):
    root, expected = corpus
    files, problems = list_images(root)
    outcome: dict[str, str] = {}
    for path, reason in problems:
        outcome[os.path.relpath(path, root)] = reason_code(reason)
    accepted = []
    for path in files:
        rel = os.path.relpath(path, root)
        assert rel not in outcome
        data, why = read_bytes(path)
        if data is None:
            outcome[rel] = reason_code(why)
            continue
        rec = decode_image(data, rel, **HOSTILE_LIMITS)
        assert set(rec) >= {"ok", "source", "reason", "id"}
        if rec["ok"]:
            assert rec["reason"] == "" and rec["id"] == hashlib.sha256(data).hexdigest()
            accepted.append(rec)
        else:
            assert ": " in rec["reason"], rec["reason"]
            outcome[rel] = reason_code(rec["reason"])
    kept, dups = dedup(accepted)
    for rec in kept:
        outcome[rec["source"]] = "ok"
    for rec in dups:
        assert rec["reason"].startswith("duplicate: same content as ")
        outcome[rec["source"]] = "duplicate"
    # 100 % accounting: every candidate ends up in exactly one bucket, with the expected code
    assert outcome == expected
    assert len(files) + len(problems) == len(expected)
    for name in IGNORED:
        assert os.path.join(root, name) not in files
    assert dups[0]["reason"] == "duplicate: same content as good/a.png"
    if os.access(os.path.join(root, "bad", "locked.png"), os.R_OK):
        assert expected["bad/locked.png"] == "ok"
    else:
        assert expected["bad/locked.png"] == "unreadable"


def test_hidden_and_non_image_entries_are_ignored(corpus):
    root, _ = corpus
    files, problems = list_images(root)
    seen = {os.path.relpath(p, root) for p in files} | {os.path.relpath(p, root) for p, _ in problems}
    assert not any(part.startswith(".") for rel in seen for part in rel.split(os.sep))
    assert not any(rel.endswith((".txt", ".md")) for rel in seen)
    assert files == sorted(files)


def test_truncated_jpeg_is_corrupt_and_global_state_untouched():
    jpeg = hostile._jpeg_bytes(hostile.noise_rgb((128, 128), 0), quality=95)
    saved = Image.MAX_IMAGE_PIXELS
    rec = _decode(jpeg[: len(jpeg) // 2])
    assert rec["reason"].startswith("corrupt: ")
    assert rec["id"] == hashlib.sha256(jpeg[: len(jpeg) // 2]).hexdigest()
    assert Image.MAX_IMAGE_PIXELS == saved and not ImageFile.LOAD_TRUNCATED_IMAGES


def test_too_large_decided_from_header_before_decoding():
    saved = Image.MAX_IMAGE_PIXELS
    # the pixel data is bogus: had it been decoded, the reason would be "corrupt"
    rec = _decode(hostile.png_header_claiming(30_000, 30_000), max_pixels=10**12)
    assert reason_code(rec["reason"]) == "corrupt"
    rec = _decode(hostile.png_header_claiming(30_000, 30_000))
    assert rec["reason"].startswith("too_large: 30000x30000")
    assert Image.MAX_IMAGE_PIXELS == saved
    rec = _decode(hostile.png_header_claiming(100, 100), max_pixels=9_999)
    assert reason_code(rec["reason"]) == "too_large"


def test_empty_and_garbage_never_raise():
    assert _decode(b"")["reason"].startswith("empty: ")
    assert _decode(None)["reason"].startswith("empty: ")  # type: ignore[arg-type]
    assert reason_code(_decode(b"GIF89a")["reason"]) in ("corrupt", "not_an_image")
    rec = _decode(12345)  # type: ignore[arg-type]
    assert not rec["ok"] and rec["reason"].startswith("error: TypeError")


def test_exif_orientation_is_applied():
    rec = _decode(hostile.exif_rotated_jpeg((40, 20), 6))
    assert (rec["width"], rec["height"]) == (20, 40)
    arr = _rgb(rec)
    # stored: left red / right blue; orientation 6 = rotate 90 degrees clockwise -> top red / bottom blue
    assert arr[2, 10, 0] > 200 and arr[2, 10, 2] < 60
    assert arr[37, 10, 2] > 200 and arr[37, 10, 0] < 60


def test_animated_gif_first_frame():
    rec = _decode(hostile.animated_gif())
    assert rec["format"] == "GIF"
    assert _rgb(rec).reshape(-1, 3).mean(0).round().tolist() == [255, 0, 0]


def test_cmyk_16bit_palette_alpha_modes():
    red = _rgb(_decode(hostile.cmyk_jpeg())).reshape(-1, 3).mean(0)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60

    ramp = _rgb(_decode(hostile.png16_ramp()))
    assert (ramp[..., 0] == ramp[..., 1]).all() and (ramp[..., 1] == ramp[..., 2]).all()
    assert ramp[0, 0, 0] <= 2 and ramp[0, -1, 0] >= 253  # scaled, not clipped to 255
    assert 100 < ramp[0, 32, 0] < 160

    pal = _rgb(_decode(hostile.palette_with_transparency()))
    assert pal[:, :16].min() == 255  # transparent -> white
    assert (pal[:, 16:] == [255, 0, 0]).all()

    assert _rgb(_decode(hostile.la_png())).min() == 255

    rgba = Image.new("RGBA", (20, 20), (0, 0, 255, 0))
    rgba.paste((0, 255, 0, 255), (10, 0, 20, 20))
    arr = _rgb(_decode(hostile._png_bytes(rgba)))
    assert (arr[:, :10] == 255).all() and (arr[:, 10:] == [0, 255, 0]).all()

    gray = _rgb(_decode(hostile._png_bytes(Image.new("L", (16, 16), 77))))
    assert (gray == 77).all()


def test_downscale_keeps_aspect_and_max_side_zero_keeps_size():
    data = hostile._png_bytes(hostile.noise_rgb((300, 120), 3))
    rec = _decode(data, max_side=64)
    assert (rec["width"], rec["height"]) == (64, 26)
    rec = _decode(data, max_side=0)
    assert (rec["width"], rec["height"]) == (300, 120)
    assert (load_rgb(rec["image"]) == np.asarray(Image.open(io.BytesIO(data)))).all()  # lossless
    # large JPEGs use DCT draft decoding but still end at exactly max_side
    jpg = _decode(hostile._jpeg_bytes(hostile.noise_rgb((640, 400), 4)), max_side=64)
    assert (jpg["width"], jpg["height"]) == (64, 40) and jpg["format"] == "JPEG"


def test_too_small_and_deterministic_output():
    assert _decode(hostile._png_bytes(hostile.noise_rgb((7, 100), 0)))["reason"].startswith("too_small: ")
    data = hostile._jpeg_bytes(hostile.noise_rgb((90, 70), 5))
    a, b = _decode(data, "s"), _decode(data, "s")
    assert a == b and a["ok"] and a["image"].startswith(b"\x89PNG")


def test_decode_batch_splits_and_keeps_order():
    good = hostile._png_bytes(hostile.noise_rgb((16, 16), 0))
    batch = {
        "source": ["r/cat/1.png", "r/dog/2.jpg", "r/cat/3.png", "r/4.png"],
        "bytes": [good, b"nope", good, b""],
        "label": ["cat", "dog", "cat", ""],
    }
    acc, rej = decode_batch(batch, **HOSTILE_LIMITS)
    assert acc["source"] == ["r/cat/1.png", "r/cat/3.png"] and acc["label"] == ["cat", "cat"]
    assert set(acc) == {"id", "source", "image", "width", "height", "format", "label"}
    assert all(len(v) == 2 for v in acc.values())
    assert rej["source"] == ["r/dog/2.jpg", "r/4.png"]
    assert [reason_code(r) for r in rej["reason"]] == ["not_an_image", "empty"]
    acc2, rej2 = decode_batch({"source": np.array(batch["source"]), "bytes": np.array(batch["bytes"], dtype=object)},
                              **HOSTILE_LIMITS)
    assert acc2["label"] == ["", ""] and acc2["image"] == acc["image"] and rej2["reason"] == rej["reason"]
    empty_acc, empty_rej = decode_batch({"source": [], "bytes": []}, **HOSTILE_LIMITS)
    assert empty_acc["source"] == [] and empty_rej["source"] == []


def test_label_from_path_and_extensions():
    assert label_from_path("/data/cats/a.jpg", "/data") == "cats"
    assert label_from_path("/data/cats/a.jpg", "/data/") == "cats"
    assert label_from_path("/data/a.jpg", "/data") == ""
    assert label_from_path("/data/train/n014/x.JPEG", "/data") == "n014"
    assert label_from_path("s3://bucket/imgs/dog/1.png", "s3://bucket/imgs") == "dog"
    assert {"jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"} == set(SUPPORTED_EXTENSIONS)
    assert has_image_extension("A.JPEG") and has_image_extension("b.TiF") and not has_image_extension("c.txt")
    assert not has_image_extension("jpg") and not has_image_extension("x.")


def test_read_bytes_never_raises(tmp_path):
    assert read_bytes(str(tmp_path / "missing.png"))[1].startswith("unreadable: ")
    assert read_bytes(str(tmp_path))[1].startswith("not_a_file: ")
    (tmp_path / "f.png").write_bytes(b"1234")
    assert read_bytes(str(tmp_path / "f.png")) == (b"1234", "")
    assert read_bytes(str(tmp_path / "f.png"), max_bytes=2)[1].startswith("too_large: ")


def test_list_images_single_file_and_missing_root(tmp_path):
    p = tmp_path / "one.png"
    p.write_bytes(hostile._png_bytes(hostile.noise_rgb((8, 8), 0)))
    assert list_images(str(p)) == ([str(p)], [])
    with pytest.raises(FileNotFoundError):
        list_images(str(tmp_path / "nope"))
