"""A corpus of hostile image files, written at test time (no binary fixtures in the repository).

``make_hostile_corpus(folder)`` returns {relative path: expected outcome} for every entry the folder
lister must account for. Outcomes: "ok" (accepted), "duplicate" (accepted by decode, dropped by exact
dedup), or the reason code of the rejection ("empty", "not_an_image", "corrupt", "too_large",
"too_small", "not_a_file", "unreadable"). Expectations assume the limits in HOSTILE_LIMITS.

Entries deliberately *absent* from the mapping (the lister must ignore them): IGNORED (hidden files,
non-image extensions).

Documented choices:
* a directory named ``dir.jpg`` is reported by the lister as ``not_a_file`` *and* descended into (the
  image inside it is accepted);
* a FIFO / broken symlink named like an image is ``not_a_file`` (never opened, so nothing blocks);
* a chmod-000 file is ``unreadable`` - except when the process can still read it (root), where it is
  expected to be "ok".
"""
from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image

HOSTILE_LIMITS = {"max_side": 64, "min_side": 8, "max_pixels": 10_000_000}
IGNORED = (".hidden.jpg", "notes.txt", "good/README.md", ".cache/inside.png")


def _png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height RGB pixels, followed by a tiny (bogus) IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b"")


def noise_rgb(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def two_colour(size: tuple[int, int], left=(255, 0, 0), right=(0, 0, 255)) -> Image.Image:
    """Left half ``left``, right half ``right``."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = left
    arr[:, w // 2:] = right
    return Image.fromarray(arr)


def exif_rotated_jpeg(size=(40, 20), orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _jpeg_bytes(two_colour(size), quality=95, exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def palette_with_transparency() -> bytes:
    """32x32 P image: left half index 0 (black, transparent), right half index 1 (red)."""
    im = Image.new("P", (32, 32), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    im.paste(1, (16, 0, 32, 32))
    return _png_bytes(im, transparency=0)


def png16_ramp() -> bytes:
    """64x64 16-bit grayscale, horizontal ramp 0..65535."""
    ramp = np.linspace(0, 65535, 64).astype(np.uint16)
    arr = np.tile(ramp, (64, 1))
    im = Image.frombytes("I;16", (64, 64), arr.astype("<u2").tobytes())
    return _png_bytes(im)


def cmyk_jpeg() -> bytes:
    return _jpeg_bytes(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), quality=95)


def la_png() -> bytes:
    """32x32 LA: fully transparent -> must come out white."""
    return _png_bytes(Image.new("LA", (32, 32), (0, 0)))


def _write(root: str, rel: str, data: bytes) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


def make_hostile_corpus(folder: str) -> dict[str, str]:
    """Write the corpus under ``folder``; return {relative path: expected outcome}."""
    root = os.fspath(folder)
    os.makedirs(root, exist_ok=True)
    expected: dict[str, str] = {}

    def put(rel: str, data: bytes, outcome: str) -> None:
        _write(root, rel, data)
        expected[rel] = outcome

    good_png = _png_bytes(noise_rgb((48, 40), 1))
    put("good/a.png", good_png, "ok")
    put("good/a_copy.png", good_png, "duplicate")  # sorts after good/a.png, so the copy is dropped
    put("good/b.jpg", _jpeg_bytes(noise_rgb((50, 30), 2), quality=90), "ok")
    put("good/UPPER.JPG", _jpeg_bytes(noise_rgb((30, 30), 3)), "ok")
    put("good/c.webp", _webp_or_png(noise_rgb((33, 44), 4)), "ok")
    buf = io.BytesIO()
    noise_rgb((20, 20), 5).save(buf, format="BMP")
    put("good/d.bmp", buf.getvalue(), "ok")
    buf = io.BytesIO()
    noise_rgb((24, 16), 6).save(buf, format="TIFF")
    put("good/e.tiff", buf.getvalue(), "ok")
    put("good/big.png", _png_bytes(noise_rgb((200, 100), 7), compress_level=1), "ok")  # downscaled to 64x32

    put("odd/cmyk.jpg", cmyk_jpeg(), "ok")
    put("odd/png16.png", png16_ramp(), "ok")
    put("odd/palette_transparent.png", palette_with_transparency(), "ok")
    put("odd/la.png", la_png(), "ok")
    put("odd/exif_rot6.jpg", exif_rotated_jpeg(), "ok")
    put("odd/animated.gif", animated_gif(), "ok")

    jpeg = _jpeg_bytes(noise_rgb((128, 128), 8), quality=95)
    put("bad/truncated.jpg", jpeg[: len(jpeg) // 2], "corrupt")
    bad_crc = bytearray(_png_bytes(noise_rgb((16, 16), 9)))
    bad_crc[29] ^= 0xFF  # flip a byte of the IHDR CRC
    put("bad/bad_crc.png", bytes(bad_crc), "corrupt")
    put("bad/empty.jpg", b"", "empty")
    put("bad/text.jpg", b"this is not an image, just text\n" * 4, "not_an_image")
    put("bad/html.png", b"<html><body>404 Not Found</body></html>", "not_an_image")
    put("bad/bomb_header.png", png_header_claiming(30_000, 30_000), "too_large")  # > PIL's own bomb limit
    put("bad/big_1bit.png", _png_bytes(Image.new("1", (5000, 5000), 0)), "too_large")
    put("bad/tiny.png", _png_bytes(noise_rgb((4, 4), 10)), "too_small")
    put("bad/thin.png", _png_bytes(noise_rgb((300, 3), 11)), "too_small")

    # a directory named like an image: reported, and descended into
    os.makedirs(os.path.join(root, "dir.jpg"), exist_ok=True)
    expected["dir.jpg"] = "not_a_file"
    put("dir.jpg/inside.png", _png_bytes(noise_rgb((16, 16), 12)), "ok")

    if hasattr(os, "mkfifo"):
        os.mkfifo(os.path.join(root, "bad", "pipe.png"))
        expected["bad/pipe.png"] = "not_a_file"
    os.symlink(os.path.join(root, "does-not-exist.png"), os.path.join(root, "bad", "broken_link.png"))
    expected["bad/broken_link.png"] = "not_a_file"

    locked = os.path.join(root, "bad", "locked.png")
    _write(root, "bad/locked.png", _png_bytes(noise_rgb((16, 16), 13)))
    os.chmod(locked, 0)
    expected["bad/locked.png"] = "ok" if os.access(locked, os.R_OK) else "unreadable"

    # ignored by the lister
    _write(root, ".hidden.jpg", good_png)
    _write(root, "notes.txt", b"hello")
    _write(root, "good/README.md", b"# readme")
    _write(root, ".cache/inside.png", good_png)
    return expected


def _webp_or_png(im: Image.Image) -> bytes:
    from PIL import features

    buf = io.BytesIO()
    im.save(buf, format="WEBP" if features.check("webp") else "PNG")
    return buf.getvalue()
