"""Decode any image file a user has into an RGB uint8 array, or say why not.

Every way an image can be unusable maps to one of SKIP_REASONS, so the cache
can skip it, count it and carry on; odd modes (alpha, 16-bit, float, CMYK,
palette, grayscale) are converted rather than rejected. A file is read whole
first (only a regular file, only up to a size limit) and then decoded from
memory, so a failure is either of reading the file (READ_REASONS: the same
bytes may read fine next time) or of its bytes (DECODE_REASONS: they never will).
"""
from __future__ import annotations

import errno
import io
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from trainers.errors import UserError

# What decoding bytes that were read can fail with: properties of the bytes, which a cache may keep.
DECODE_REASONS = ("empty", "truncated", "not_an_image", "corrupt", "too_large")
# What reading a file can fail with: a broken or looping link or no permission (unreadable), a device, FIFO
# or socket (not_a_file), over MAX_FILE_MB (too_large), gone or replaced since it was listed (vanished),
# an I/O error of the disk or network mount (io_error). None is a property of the bytes.
READ_REASONS = ("unreadable", "not_a_file", "too_large", "vanished", "io_error")
SKIP_REASONS = tuple(dict.fromkeys(DECODE_REASONS + READ_REASONS))

# A file is read whole before decoding, so this bounds the memory one decode takes: 64 MB holds any camera
# JPEG (a 50 MP one is ~25 MB) and a 20 MP uncompressed RGB TIFF. FER_MAX_IMAGE_MB changes it.
MAX_FILE_MB = 64
MAX_FILE_ENV = "FER_MAX_IMAGE_MB"

# 250 MP is ~16,000 x 16,000: larger than any camera photo, and a full RGBA
# decode of it already needs 1 GB, so anything bigger is refused from its header.
MAX_PIXELS = 250_000_000

# Pillow's own bomb guard warns above MAX_IMAGE_PIXELS (~89 MP by default) and
# raises above twice that (~179 MP), which would refuse a 200 MP scan we can
# shrink, and would print a raw warning for a header we refuse anyway. Our own
# check reads the same header and refuses anything over MAX_PIXELS before any
# pixel is decoded, so while any decode_image call runs Pillow's guard is off
# (the global is None); the last call to finish restores the user's value.
# Calls overlap freely: the lock only guards the count, so threaded decoding
# stays parallel.
_PIL_LIMIT_LOCK = threading.Lock()
_pil_limit_users = 0
_pil_limit_saved: int | None = None

# Leading bytes of formats Pillow reads: a file that starts like one of these
# but cannot be identified was almost always cut off mid-download.
_SIGNATURES = (
    b"\xff\xd8\xff",          # JPEG
    b"\x89PNG\r\n\x1a\n",     # PNG
    b"GIF87a", b"GIF89a",     # GIF
    b"II*\x00", b"MM\x00*",   # TIFF
)

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageSkipped(Exception):
    """An image file that cannot be used; ``reason`` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Unread(str):
    """A skip reason from reading a file rather than decoding its bytes (one of READ_REASONS): counted like
    any reason, never cached, as the file may read fine next time."""


def decode_image(path: Path, max_side: int = 1024) -> np.ndarray:
    """Return the image at ``path`` as H x W x 3 uint8 RGB, long side <= max_side; raise ImageSkipped if unusable."""
    return decode_image_bytes(read_image_file(Path(path)), max_side)[0]


def decode_image_bytes(data: bytes, max_side: int = 1024, max_pixels: int | None = None) -> tuple[np.ndarray, int]:
    """decode_image for an encoded image held in memory (a file read, an upload); also the long side of the
    full-size upright image, so positions found in the decoded copy can be given in the sender's pixels.
    max_pixels: MAX_PIXELS when None."""
    if not data:
        raise ImageSkipped("empty", "no bytes")
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    return _decode(io.BytesIO(data), max_side, limit, lambda: bytes(data[:16]))


def max_file_bytes() -> int:
    """The largest image file read: MAX_FILE_MB, or FER_MAX_IMAGE_MB when set."""
    text = os.environ.get(MAX_FILE_ENV, "").strip()
    if not text:
        return MAX_FILE_MB * 2**20
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"{MAX_FILE_ENV}={text!r}: set it to a whole number of MB (the largest image file "
                        f"read), or unset it for {MAX_FILE_MB} MB")
    return int(text) * 2**20


def checked_stat(path: Path) -> os.stat_result:
    """The stat of a regular file of at most max_file_bytes(); ImageSkipped (a read reason) otherwise.
    Follows links, as reading does: a link to a regular file, inside the folder or not, is that file."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise _read_failure(path, exc) from exc
    _check_regular_and_size(info)
    return info


def read_image_file(path: Path) -> bytes:
    """The bytes of the regular file at path (at most max_file_bytes()); ImageSkipped with a read reason when
    it is something else or cannot be read. A FIFO or device is never opened, and a file swapped for one
    after the check is opened without blocking and refused."""
    checked_stat(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise _read_failure(path, exc) from exc
    with os.fdopen(fd, "rb") as handle:
        try:
            info = os.fstat(fd)
            _check_regular_and_size(info)
            # One byte more than its size: a file still growing is read on, up to one byte over the limit.
            data = handle.read(info.st_size + 1)
            limit = max_file_bytes()
            if len(data) > info.st_size:
                data += handle.read(limit + 1 - len(data))
        except OSError as exc:
            raise ImageSkipped("io_error", f"cannot read: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise ImageSkipped("too_large", f"grew past {limit // 2**20} MB while being read")
    return data


def decode_side(image_size: int) -> int:
    """The long side images are decoded at before aligning to image_size: 4x the output (the warp samples
    from it), at least 256 px; training, production and serving all decode at this size."""
    return max(4 * image_size, 256)


def _decode(source, max_side: int, max_pixels: int, head) -> tuple[np.ndarray, int]:
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    try:
        with _pil_bomb_guard_off(), Image.open(source) as im:   # lazy: reads the header only
            full_side = _load_within_limit(im, max_side, max_pixels)
            ImageOps.exif_transpose(im, in_place=True)
            return _to_rgb(_shrink(_expand_palette(im), max_side)), full_side
    except ImageSkipped:
        raise
    # Pillow signals bad data with many exception types (OSError, SyntaxError,
    # ValueError, struct.error, zlib.error, EOFError ...); a bad file must be
    # skipped and counted, never end the sweep, so all of them are classified.
    except Exception as exc:
        raise _classify(exc, head) from exc


def centre_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Crop the centred largest square of an H x W x 3 uint8 image and resize it to size x size."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 array, got shape {rgb.shape} dtype {rgb.dtype}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    height, width = rgb.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = np.ascontiguousarray(rgb[top:top + side, left:left + side])
    # Pillow's bilinear filter widens its support when shrinking, so this antialiases.
    resized = Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8).copy()


def _check_regular_and_size(info: os.stat_result) -> None:
    # A FIFO blocks its reader until a writer comes, /dev/zero never ends: only regular files are read.
    if stat.S_ISDIR(info.st_mode):
        raise ImageSkipped("unreadable", "a folder, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise ImageSkipped("not_a_file", "not a regular file (a device, FIFO or socket)")
    limit = max_file_bytes()
    if info.st_size > limit:
        raise ImageSkipped("too_large", f"{info.st_size / 2**20:.0f} MB is over {limit // 2**20} MB "
                                        f"({MAX_FILE_ENV} sets the limit)")


def _read_failure(path: Path, exc: OSError) -> ImageSkipped:
    """Why a path could not be stat'ed or opened: a broken or looping link and no permission are the folder's
    state (unreadable); a path no longer there was moved or deleted since it was listed (vanished)."""
    why = exc.strerror or str(exc)
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        if os.path.lexists(path):
            return ImageSkipped("unreadable", f"a link to nothing ({why})")
        return ImageSkipped("vanished", f"no longer there ({why})")
    if exc.errno in (errno.ELOOP, errno.EACCES, errno.EPERM):
        return ImageSkipped("unreadable", why)
    return ImageSkipped("io_error", why)


@contextmanager
def _pil_bomb_guard_off() -> Iterator[None]:
    """Turn Pillow's pixel limit off for the duration (ours applies), restoring it when the last user leaves."""
    global _pil_limit_users, _pil_limit_saved
    with _PIL_LIMIT_LOCK:
        if _pil_limit_users == 0:
            _pil_limit_saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _pil_limit_users += 1
    try:
        yield
    finally:
        with _PIL_LIMIT_LOCK:
            _pil_limit_users -= 1
            if _pil_limit_users == 0:
                Image.MAX_IMAGE_PIXELS = _pil_limit_saved


def _load_within_limit(im: Image.Image, max_side: int, max_pixels: int) -> int:
    """Refuse headers over max_pixels, then decode (JPEG at reduced scale when large); the full long side."""
    width, height = im.size
    if width * height > max_pixels:
        raise ImageSkipped("too_large", f"{width} x {height} pixels is over {max_pixels / 1e6:g} MP")
    im.draft("RGB", (max_side, max_side))  # JPEG decodes at 1/2, 1/4 or 1/8 scale; no-op elsewhere
    im.load()
    return max(width, height)


def _expand_palette(im: Image.Image) -> Image.Image:
    """Turn palette, 1-bit and transparent images into modes that can be averaged when shrinking."""
    if "transparency" in im.info and im.mode in ("1", "L", "P", "RGB"):
        return im.convert("RGBA")
    if im.mode in ("P", "PA"):
        return im.convert("RGBA" if im.mode == "PA" else "RGB")
    if im.mode == "1":
        return im.convert("L")
    return im


def _shrink(im: Image.Image, max_side: int) -> Image.Image:
    """Resize in place so the long side is at most max_side, keeping the aspect ratio."""
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return im


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to an H x W x 3 uint8 RGB array."""
    if im.mode in _ALPHA_MODES:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA"))
    elif im.mode in _SIXTEEN_BIT_MODES or im.mode == "F":
        gray = _stretch_to_uint8(np.asarray(im))
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def _stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map the image's actual value range onto 0..255 (16-bit and float data rarely fill their type)."""
    values = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _classify(exc: Exception, head) -> ImageSkipped:
    """Map an exception raised while decoding to the reason it gets skipped for."""
    message = str(exc) or type(exc).__name__
    # The warning arrives as an exception only when warnings are errors (python -W error).
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageSkipped("too_large", message)
    if isinstance(exc, UnidentifiedImageError):
        if _has_image_signature(head()):
            return ImageSkipped("truncated", "starts like an image but its header is cut short or corrupt")
        return ImageSkipped("not_an_image", "not a format Pillow can read")
    if isinstance(exc, EOFError) or "truncated" in message.lower():
        return ImageSkipped("truncated", message)
    # The bytes are in memory: an OSError here is Pillow's word for bad data, not a failed read.
    return ImageSkipped("corrupt", f"corrupt image data ({type(exc).__name__}: {message})")


def _has_image_signature(head: bytes) -> bool:
    """Whether the bytes begin with the magic bytes of a format Pillow reads."""
    is_webp = head[:4] == b"RIFF" and head[8:12] == b"WEBP"  # RIFF alone is also WAV, AVI ...
    return head.startswith(_SIGNATURES) or is_webp
