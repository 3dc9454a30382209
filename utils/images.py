"""Opening and decoding images: one policy for every path that reads a picture.

The feature cache, `caption`, CLIPScore, the notebook explorer and the web demo all decode through
`prepare_image`, so one photo gives the same pixels, and so the same caption, everywhere:
- EXIF orientation is applied (a phone photo taken upright is upright, whatever its pixels' order);
- JPEGs decode at a reduced scale no smaller than `draft_side(resolution)` (twice CLIP's input):
  milliseconds instead of a second for a large photo, and the same pixels after CLIP's resize;
- an image over MAX_IMAGE_PIXELS is refused, before it is decoded, with its size;
- every mode (palette, transparency, 16-bit, CMYK, ...) becomes 8-bit RGB, transparent parts on white.
"""

from __future__ import annotations

import functools
import io
import os
import tarfile
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")

# The most pixels an image may have (width x height, as its file states): 120 MP lets the largest
# phone photos (108 MP) and 10000 x 10000 scans in, and keeps one decode under about 360 MB of RGB.
MAX_IMAGE_PIXELS = 120_000_000
ORIENTATION = 0x0112  # the EXIF tag saying how the camera was held
DRAFT_FACTOR = 2  # JPEGs decode at no less than DRAFT_FACTOR x CLIP's input side

# Pillow warns above its own MAX_IMAGE_PIXELS and refuses above twice that. Every image of the course goes
# through `check_size`, which refuses larger ones with a message naming the size: Pillow's warning would
# only repeat it in its own words, so it is silenced; its refusal (above twice the limit) stays as a backstop.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class UnreadableImage(Exception):
    """An image that cannot be decoded; str() is the reason ("zero bytes", "truncated JPEG", ...)."""


def draft_side(resolution: int) -> int:
    """The side a JPEG is decoded at (at least) for a CLIP whose input is `resolution` pixels square."""
    return DRAFT_FACTOR * int(resolution)


def check_size(width: int, height: int, max_pixels: int | None = None) -> None:
    """Raise UnreadableImage for an image over `max_pixels` (default MAX_IMAGE_PIXELS), saying its size."""
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if width * height > limit:
        raise UnreadableImage(f"too large: {width}x{height} pixels, over the limit of {limit / 1e6:g} "
                              "megapixels; shrink it first")


_TAR_LOCK = threading.Lock()  # one TarFile has one file position: threads take turns


@functools.lru_cache(maxsize=8)
def _open_shard(tar_path: str, pid: int) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:  # noqa: ARG001
    # (pid is read by lru_cache only: it is the cache key that gives each process its own file)
    """A shard opened once per process: the pid is in the key so a forked DataLoader worker opens its own
    file instead of sharing (and moving) its parent's file position."""
    tar = tarfile.open(tar_path)
    return tar, {m.name: m for m in tar.getmembers()}


def read_image_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of an image file, or of "<shard.tar>::<member>"; UnreadableImage says why not."""
    tar_path, sep, member = os.fspath(path).partition("::")
    try:
        if not sep:
            with open(tar_path, "rb") as f:
                return f.read()
        with _TAR_LOCK:
            tar, members = _open_shard(os.path.abspath(tar_path), os.getpid())
            if member not in members:
                raise UnreadableImage("missing file")
            return tar.extractfile(members[member]).read()
    except FileNotFoundError:
        raise UnreadableImage("missing file") from None
    except PermissionError:
        raise UnreadableImage("permission denied") from None
    except IsADirectoryError:
        raise UnreadableImage("a folder, not an image file") from None
    except (OSError, tarfile.TarError) as exc:
        raise UnreadableImage(f"cannot read ({exc})") from None


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float greyscale scaled by its real range: most such files use a small part of 0..65535."""
    a = np.nan_to_num(np.asarray(img, dtype=np.float32))
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:  # flat image: keep it dark or bright without dividing by zero
        lo, hi = min(lo, 0.0), max(hi, 1.0)
    return Image.fromarray(((a - lo) * (255.0 / (hi - lo))).round().astype(np.uint8))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode as 8-bit RGB: 16-bit scaled by its range, transparent parts on white (as a viewer shows them)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def prepare_image(img: Image.Image, draft: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """The one decoding policy, for a PIL image (opened, perhaps not yet loaded): size limit, JPEG draft,
    EXIF orientation, RGB. A PIL image given by a caller goes through here as a file does."""
    check_size(img.width, img.height, max_pixels)
    if draft and img.format in ("JPEG", "MPO") and getattr(img, "tile", None):  # not decoded yet
        img.draft("RGB", (draft, draft))
    img.load()
    if img.getexif().get(ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)  # a copy, turned as the camera meant, without the orientation tag
    return to_rgb(img)


# The first bytes of the formats photos come in: a file that starts like one but cannot be opened was cut short.
_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG": "PNG", b"GIF8": "GIF"}


@functools.lru_cache(maxsize=1)
def _decodable_formats() -> tuple[str, ...]:
    """Every format Pillow reads but EPS, which it hands to Ghostscript: an upload to the web demo must
    never run a PostScript program."""
    Image.init()
    return tuple(f for f in Image.ID if f != "EPS")


def decode_image(data: bytes, draft: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """An RGB image from bytes in memory (an upload in a widget or the web demo), or UnreadableImage.

    `draft` (for JPEG) decodes at a reduced scale no smaller than draft x draft. `max_pixels` (default
    MAX_IMAGE_PIXELS) refuses a larger image before decoding it: memory stays bounded whatever arrives.
    """
    if not data:
        raise UnreadableImage("zero bytes")
    fmt = next((name for magic, name in _SIGNATURES.items() if data.startswith(magic)), None)
    try:
        img = Image.open(io.BytesIO(data), formats=_decodable_formats())
        fmt = img.format or fmt
        return prepare_image(img, draft, max_pixels)
    except UnidentifiedImageError:
        reason = f"truncated {fmt}" if fmt else "not an image (cannot identify image file)"
        raise UnreadableImage(reason) from None
    except Image.DecompressionBombError:
        limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
        raise UnreadableImage(f"too large: over {2 * Image.MAX_IMAGE_PIXELS / 1e6:g} megapixels, over the limit "
                              f"of {limit / 1e6:g} megapixels; shrink it first") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # what Pillow raises on broken data
        message = str(exc)
        if "truncated" in message.lower() or "broken data stream" in message:
            raise UnreadableImage(f"truncated {fmt or 'image'}") from None
        raise UnreadableImage(f"cannot decode {fmt or 'image'} ({message})") from None


def open_image(path: str | os.PathLike, draft: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """A fully loaded RGB image from a file (or "<shard.tar>::<member>"), or UnreadableImage saying why not."""
    return decode_image(read_image_bytes(path), draft, max_pixels)


def preview_png(image: Image.Image, side: int) -> bytes:
    """The picture as PNG bytes `side` pixels on its long edge, for a widget or a web page: small images
    scaled up without blur, large ones down."""
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    buf = io.BytesIO()
    image.convert("RGB").resize(size, resample).save(buf, format="PNG")
    return buf.getvalue()


def image_name(image, position: int) -> str:
    """A path as given; a PIL image by the file it was opened from, else by its position."""
    if isinstance(image, Image.Image):
        return getattr(image, "filename", "") or f"image {position}"
    return str(image)
