"""Safe image loading: any readable file -> 8-bit RGB PIL image, or a `BadImageError` that names the file.

Mode conversions (PIL mode -> RGB):
  * RGB: unchanged. L, 1, CMYK, YCbCr, LAB, HSV: PIL's own conversion.
  * Anything with alpha (RGBA, LA, PA, P with a transparency entry, ...): composited over WHITE. Transparent
    pixels often hold arbitrary colour (frequently black) under alpha = 0; a browser shows them over a page
    background, which is usually white, so white is what the caption writer saw. Dropping alpha instead would
    show the hidden colour.
  * I;16 (16-bit): value / 257 (65535 -> 255).
  * I (32-bit integer), F (float): the bit depth is not recorded, so the range is read from the data: I with
    values within 0..255 is used as is, within 0..65535 is divided by 257, otherwise min-max scaled;
    F within [0, 1] is multiplied by 255, otherwise min-max scaled.
EXIF orientation is applied (the returned image is upright as a viewer shows it).
Images with more than `max_pixels` pixels are refused from the header alone, before decoding
(decompression-bomb guard). PIL refuses on its own above 2 x `PIL.Image.MAX_IMAGE_PIXELS`; that is reported
the same way.
"""
from __future__ import annotations

import io
import logging
import multiprocessing
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import get_worker_info

from minigpt4.common.errors import BadImageError  # defined low, raised here; importable from here
from minigpt4.common.files import NotRegularFileError, require_regular_file

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default warning threshold (1 GiB / 4 bytes per pixel / 3)

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# Exceptions PIL raises for damaged data (truncated streams, bad chunks, broken zlib data, ...).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, zlib.error, struct.error)


class SkipCounter:
    """A count of skipped samples shared by the main process and its DataLoader workers.

    Workers run on copies of the dataset, so a plain integer attribute would only ever count in the copies.
    This keeps one shared-memory slot per process (main process: slot 0, worker k: slot 1 + k) and sums them.
    Each slot has a single writer, so no lock is needed -- which also keeps the counter picklable for
    "spawn"/"forkserver" DataLoader workers (a multiprocessing lock made under "fork" is not).
    """

    SLOTS = 257

    def __init__(self) -> None:
        self._slots = multiprocessing.RawArray("q", self.SLOTS)

    def add(self, n: int = 1) -> int:
        """Add n for the current process; returns the new total over all processes."""
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % (self.SLOTS - 1)
        self._slots[slot] += n
        return self.value

    @property
    def value(self) -> int:
        return int(sum(self._slots))


def _to_8bit(pixels: np.ndarray, mode: str) -> np.ndarray:
    if mode.startswith("I;16"):
        return np.round(pixels.astype(np.float64) / 257.0).astype(np.uint8)
    values = pixels.astype(np.float64)
    if not np.all(np.isfinite(values)):
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif mode == "I" and low >= 0 and high <= 255:
        scaled = values
    elif mode == "I" and low >= 0 and high <= 65535:
        scaled = values / 257.0
    elif high > low:
        scaled = (values - low) / (high - low) * 255.0
    else:
        scaled = np.zeros_like(values)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def _over_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to 8-bit RGB (rules in the module docstring)."""
    mode = image.mode
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and "transparency" in image.info):
        return _over_white(image)
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        gray = _to_8bit(np.asarray(image), mode)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return image.convert("RGB")


def load_rgb(
    source: str | os.PathLike | bytes,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Open `source` (a path or the encoded bytes) and return an upright 8-bit RGB image.

    `name` labels in-memory bytes in errors (e.g. "shard-00003.tar:000123"); `max_pixels=None` disables the
    guard. Raises `BadImageError` for missing, empty, truncated, oversized or undecodable images.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<image bytes>"
        if len(source) == 0:
            raise BadImageError(label, "empty (0 bytes)")
        stream: io.BytesIO | Path = io.BytesIO(bytes(source))
    else:
        label = name or str(source)
        try:  # a FIFO or a link to /dev/zero would block PIL forever: refused from its metadata alone
            path = require_regular_file(source, "image")
        except NotRegularFileError as err:
            raise BadImageError(label, err.reason) from None
        if path.stat().st_size == 0:
            raise BadImageError(label, "empty file (0 bytes)")
        stream = path

    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below is the guard that counts; PIL's warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                width, height = image.size
                if width <= 0 or height <= 0:
                    raise BadImageError(label, f"invalid size {width}x{height}")
                if max_pixels is not None and width * height > max_pixels:
                    raise BadImageError(
                        label,
                        f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels} "
                        "(decompression-bomb guard; raise max_pixels if the image is genuine)",
                    )
                image.load()
                try:
                    upright = ImageOps.exif_transpose(image)
                except Exception as err:  # a damaged EXIF block must not discard a good image
                    logger.debug("%s: ignoring unreadable EXIF orientation (%s)", label, err)
                    upright = image.copy()
                return to_rgb(upright)
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(label, "not a recognised image format") from None
    except Image.DecompressionBombError as err:
        raise BadImageError(label, f"refused by PIL's decompression-bomb guard: {err}") from None
    except _DECODE_ERRORS as err:
        raise BadImageError(label, f"cannot decode image ({type(err).__name__}: {err})") from None
