"""Decode and normalise untrusted image bytes into RGB PNG records (the curate stage's core).

Pure PIL/NumPy: no Ray, MLflow or DVC. ``decode_image`` never raises; every input becomes either an
accepted record or a rejection whose ``reason`` is ``"<code>: <detail>"``. Codes:

``empty``         zero-byte (or missing) payload
``not_an_image``  PIL cannot identify the bytes as any image format
``corrupt``       identified, but the header or pixel data is broken (truncated JPEG, bad PNG chunk, ...)
``too_large``     width*height > max_pixels, decided from the header before any pixel is decoded
``too_small``     the smaller side is < min_side
``error``         anything unexpected (``error: <ExceptionType>: <message>``)

Truncated files are only detected while ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is False (PIL's default);
this module never changes it.
"""
from __future__ import annotations

import hashlib
import io
import struct
import threading
import warnings
import zlib
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Lower-case, without the dot (compare with ``os.path.splitext(p)[1].lower().lstrip(".")``).
SUPPORTED_EXTENSIONS: frozenset[str] = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"})

# Reason codes (the part before the colon in ``reason``).
EMPTY = "empty"
NOT_AN_IMAGE = "not_an_image"
CORRUPT = "corrupt"
TOO_LARGE = "too_large"
TOO_SMALL = "too_small"
ERROR = "error"

ACCEPTED_COLUMNS = ("id", "source", "image", "width", "height", "format", "label")
REJECTED_COLUMNS = ("source", "reason", "id")

_WHITE = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# Exceptions PIL raises for damaged files (besides UnidentifiedImageError at open time).
_DAMAGE = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, struct.error, zlib.error)
# Guards the brief window in which Image.MAX_IMAGE_PIXELS is lifted for a header-only open.
_OPEN_LOCK = threading.Lock()


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)


def _sniff(data: bytes) -> str:
    """Format named by the file's magic bytes ("" if none of ours)."""
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return ""


def has_image_extension(name: str) -> bool:
    """True when ``name`` ends with one of SUPPORTED_EXTENSIONS (case-insensitive)."""
    dot = name.rfind(".")
    return dot >= 0 and name[dot + 1:].lower() in SUPPORTED_EXTENSIONS


def reason_code(reason: str) -> str:
    """The machine-friendly code of a reason string (``"corrupt: ..."`` -> ``"corrupt"``)."""
    return reason.split(":", 1)[0].strip()


def _reject(source: str, code: str, detail: str, digest: str = "") -> dict:
    return {"ok": False, "source": source, "reason": f"{code}: {detail}", "id": digest}


def _open_header(buf: io.BytesIO) -> Image.Image:
    """Lazily open (header only) without PIL's own bomb check; we compare dimensions ourselves.

    MAX_IMAGE_PIXELS is lifted only for the duration of ``Image.open`` and restored under a lock, and
    DecompressionBombWarning is turned into an error inside the same window, so nothing leaks.
    """
    with _OPEN_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                return Image.open(buf)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    """High-bit-depth single-channel images (I;16*, I, F) -> mode L, scaling rather than clipping."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        out = arr.astype(np.float64) / 257.0
    elif im.mode == "I":
        top = float(arr.max()) if arr.size else 0.0
        lo = float(arr.min()) if arr.size else 0.0
        if lo >= 0 and top <= 255:
            out = arr.astype(np.float64)
        elif lo >= 0 and top <= 65535:
            out = arr.astype(np.float64) / 257.0
        else:
            span = max(top - lo, 1.0)
            out = (arr.astype(np.float64) - lo) * (255.0 / span)
    else:  # "F"
        a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        out = a * 255.0 if a.size and a.min() >= 0 and a.max() <= 1.0 else a
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="L")


def _on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, _WHITE)
    canvas.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return canvas


def _normalise_mode(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        im = _to_8bit_gray(im)
        mode = "L"
    if mode in _ALPHA_MODES:
        return _on_white(im)
    if "transparency" in im.info and mode in ("P", "L", "RGB", "1"):
        return _on_white(im)
    if mode == "RGB":
        return im
    return im.convert("RGB")  # L, 1, P (opaque), CMYK, YCbCr, LAB, HSV


def _target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    longest = max(width, height)
    if max_side <= 0 or longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def decode_image(data: bytes | None, source: str, *, max_side: int, min_side: int, max_pixels: int) -> dict:
    """Validate and normalise one encoded image. Never raises.

    Returns ``{"ok": True, "id", "source", "image" (PNG bytes, RGB), "width", "height", "format",
    "reason": ""}`` or ``{"ok": False, "source", "reason": "<code>: <detail>", "id"}``. ``id`` is the
    SHA-256 of the original bytes ("" for an empty payload).
    """
    source = str(source)
    digest = ""
    try:
        if data is None or len(data) == 0:
            return _reject(source, EMPTY, "zero-byte file")
        if not isinstance(data, bytes):
            data = bytes(data)
        digest = hashlib.sha256(data).hexdigest()

        # 1. header only ------------------------------------------------------------------------------
        try:
            im = _open_header(io.BytesIO(data))
        except UnidentifiedImageError:
            sniffed = _sniff(data)
            if sniffed:  # a real image signature that PIL cannot parse: damaged, not foreign
                return _reject(source, CORRUPT, f"{sniffed} signature but unparseable header", digest)
            return _reject(source, NOT_AN_IMAGE, "unrecognised image format", digest)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            return _reject(source, TOO_LARGE, str(exc), digest)
        except _DAMAGE as exc:
            return _reject(source, CORRUPT, f"unreadable header ({type(exc).__name__}: {exc})", digest)
        fmt = im.format or ""
        width, height = im.size
        if width <= 0 or height <= 0:
            return _reject(source, CORRUPT, f"invalid size {width}x{height}", digest)
        if width * height > max_pixels:
            return _reject(source, TOO_LARGE, f"{width}x{height} = {width * height} px > {max_pixels}", digest)
        if min(width, height) < min_side:
            return _reject(source, TOO_SMALL, f"{width}x{height}, smaller side < {min_side}", digest)

        # 2. pixels (first frame of animations) ----------------------------------------------------------
        try:
            if fmt == "JPEG" and max_side > 0 and max(width, height) > 2 * max_side:
                # DCT-domain downscale: decodes at >= the target size, much faster for big photos.
                im.draft(im.mode, _target_size(width, height, max_side))
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            return _reject(source, TOO_LARGE, str(exc), digest)
        except MemoryError as exc:
            return _reject(source, TOO_LARGE, f"out of memory while decoding ({exc})", digest)
        except _DAMAGE as exc:
            return _reject(source, CORRUPT, f"{type(exc).__name__}: {exc}", digest)

        # 3. orientation, colour, size --------------------------------------------------------------------
        try:
            oriented = ImageOps.exif_transpose(im)
            if oriented is not None:
                im = oriented
        except Exception:  # broken EXIF block: keep the stored orientation
            pass
        rgb = _normalise_mode(im)
        size = _target_size(rgb.width, rgb.height, max_side)
        if size != rgb.size:
            rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        out = io.BytesIO()
        rgb.save(out, format="PNG", compress_level=1)
        return {
            "ok": True,
            "id": digest,
            "source": source,
            "image": out.getvalue(),
            "width": rgb.width,
            "height": rgb.height,
            "format": fmt,
            "reason": "",
        }
    except Exception as exc:  # noqa: BLE001 - the contract is "never raise"
        return _reject(source, ERROR, f"{type(exc).__name__}: {exc}", digest)


def _column(batch: Any, name: str) -> list | None:
    if isinstance(batch, Mapping):
        if name not in batch:
            return None
        col = batch[name]
    else:  # pandas DataFrame or pyarrow Table
        names = list(getattr(batch, "column_names", None) or getattr(batch, "columns", []))
        if name not in names:
            return None
        col = batch[name]
    if hasattr(col, "to_pylist"):
        return col.to_pylist()
    return list(col)


def decode_batch(batch: Any, **limits: int) -> tuple[dict, dict]:
    """Decode a columnar batch (``source``, ``bytes``, optional ``label``) -> (accepted, rejected).

    ``limits`` are decode_image's keyword arguments (max_side, min_side, max_pixels). Accepted columns:
    ACCEPTED_COLUMNS; rejected columns: REJECTED_COLUMNS (source, reason, id). Row order is preserved.
    """
    sources = _column(batch, "source") or []
    payloads = _column(batch, "bytes")
    if payloads is None:
        payloads = [None] * len(sources)
    labels = _column(batch, "label")
    if labels is None:
        labels = [""] * len(sources)
    if not (len(sources) == len(payloads) == len(labels)):
        raise ValueError(f"decode_batch: column lengths differ ({len(sources)}, {len(payloads)}, {len(labels)})")
    accepted: dict[str, list] = {k: [] for k in ACCEPTED_COLUMNS}
    rejected: dict[str, list] = {k: [] for k in REJECTED_COLUMNS}
    for src, data, label in zip(sources, payloads, labels):
        rec = decode_image(data, str(src), **limits)
        if rec["ok"]:
            for k in ACCEPTED_COLUMNS[:-1]:
                accepted[k].append(rec[k])
            accepted["label"].append("" if label is None else str(label))
        else:
            for k in REJECTED_COLUMNS:
                rejected[k].append(rec[k])
    return accepted, rejected


def label_from_path(source: str, root: str) -> str:
    """Immediate parent folder name of ``source`` below ``root`` ("" when the file sits in ``root``).

    Works on plain paths and URIs alike (``/`` separators). root/train/cat/x.jpg -> "cat".
    """
    src = str(source).replace("\\", "/")
    base = str(root).replace("\\", "/").rstrip("/")
    if base and src.startswith(base + "/"):
        rel = src[len(base) + 1:]
    elif base and src == base:
        return ""
    else:
        rel = src
    parts = [p for p in rel.split("/") if p]
    return parts[-2] if len(parts) >= 2 else ""


def load_rgb(png_bytes: bytes) -> np.ndarray:
    """Decode an accepted record's image bytes to a uint8 HxWx3 array."""
    with Image.open(io.BytesIO(png_bytes)) as im:
        return np.array(im.convert("RGB"), dtype=np.uint8)

