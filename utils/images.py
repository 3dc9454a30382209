"""Opening and decoding images: one policy for every path that reads a picture.

The feature cache, `caption`, CLIPScore, the notebook explorer and the web demo all decode through
`open_image` / `decode_image` / `prepare_image`, so one photo gives the same pixels, and so the same
caption, everywhere; and a file made to hurt (a FIFO, /dev/zero, a 20 GB sparse file, a 4 KB PNG that
claims 1 x 1,000,000 pixels, a fuzzed file) gets the same one-line refusal everywhere:
- only regular files are opened (a FIFO, a device, a socket is refused from its `stat`, never read), and
  only files up to MAX_FILE_BYTES;
- only the formats the course documents (JPEG, PNG, WebP, BMP, GIF) are handed to Pillow, which runs no
  other decoder (TIFF, ICO, DDS, QOI, EPS, ... are refused by name);
- the size the file states is checked before decoding: at most MAX_IMAGE_PIXELS pixels, and no side more
  than MAX_ASPECT times the other (CLIP scales the short side up to its input: a 1-pixel strip would
  become gigapixels);
- JPEGs decode at a reduced scale no smaller than `draft_side(resolution)` (twice CLIP's input), and
  other formats are box-reduced after decoding by the same rule (1/2, 1/4, 1/8): milliseconds instead of
  a second for a large photo, bounded memory, and the same pixels after CLIP's resize;
- EXIF orientation is applied (a phone photo taken upright is upright, whatever its pixels' order);
- every mode (palette, transparency, 16-bit, CMYK, ...) becomes 8-bit RGB, transparent parts on white;
- whatever Pillow raises on a damaged file becomes UnreadableImage with a reason; a caller may give a
  time budget (`seconds`), checked between the blocks the decoder reads.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import stat
import tarfile
import threading
import time
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")  # the only decoders Pillow is allowed to run
FORMAT_NAMES = "JPEG, PNG, WebP, BMP or GIF"  # the same, in words, for messages

# The most pixels an image may have (width x height, as its file states): 120 MP lets the largest phone
# photos (108 MP) and 10000 x 10000 scans in. Measured on one 120 MP PNG decoded for ViT-B/32 (Pillow 11.3,
# one thread, peak resident memory above the interpreter's): RGB 0.47 GB, 16-bit grey 0.70 GB, RGBA 0.93 GB,
# palette with transparency 1.04 GB, 1-3 s each; a 120 MP JPEG decodes drafted in 0.1 s and 11 MB.
MAX_IMAGE_PIXELS = 120_000_000
MAX_ASPECT = 20  # the long side at most 20 x the short one: panoramas pass, strips that CLIP would blow up do not
MAX_FILE_BYTES = 100 * 2**20  # a file over 100 MB is refused before it is read
ORIENTATION = 0x0112  # the EXIF tag saying how the camera was held
DRAFT_FACTOR = 2  # JPEGs decode at no less than DRAFT_FACTOR x CLIP's input side
# EXIF orientation -> the turn that shows the picture as the camera was held (as ImageOps.exif_transpose)
_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_90}

# Pillow warns above its own MAX_IMAGE_PIXELS and refuses above twice that. Every image of the course goes
# through `check_size`, which refuses larger ones with a message naming the size: Pillow's warning would
# only repeat it in its own words, so it is silenced; its refusal (above twice the limit) stays as a backstop.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class UnreadableImage(Exception):
    """An image that cannot be used; str() is the reason ("zero bytes", "truncated JPEG", ...), saying
    what to do where the reason alone does not. Callers name the file: "skipped FILE: reason"."""


def draft_side(resolution: int) -> int:
    """The side a JPEG is decoded at (at least) for a CLIP whose input is `resolution` pixels square."""
    return DRAFT_FACTOR * int(resolution)


def check_size(width: int, height: int, max_pixels: int | None = None) -> None:
    """Raise UnreadableImage for an image with no pixels, over `max_pixels` (default MAX_IMAGE_PIXELS), or
    longer than MAX_ASPECT times its width (or wider), saying its size: checked on the size a file states,
    before anything is decoded or resized."""
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if width < 1 or height < 1:
        raise UnreadableImage(f"no pixels: the file says {width}x{height}")
    if width * height > limit:
        raise UnreadableImage(f"too large: {width}x{height} pixels, over the limit of {limit / 1e6:g} "
                              "megapixels; shrink it first")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise UnreadableImage(f"a strip of {width}x{height} pixels, one side over {MAX_ASPECT} times the other "
                              "(CLIP would scale its short side up to its input); crop it first")


def _draft_scale(width: int, height: int, draft: int | None) -> int:
    """Pillow's JPEG draft rule: 8, 4, 2 or 1, the largest that keeps both sides at least `draft`."""
    scale = min(width // draft, height // draft) if draft else 1
    return next((s for s in (8, 4, 2) if scale >= s), 1)


def _megabytes(n: int) -> str:
    return f"{n / 2**30:.3g} GB" if n >= 2**30 else f"{n / 2**20:.3g} MB"


_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _check_file(info: os.stat_result) -> None:
    """A regular file of at most MAX_FILE_BYTES, or UnreadableImage saying what it is instead."""
    if stat.S_ISDIR(info.st_mode):
        raise UnreadableImage("a folder, not an image file")
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a file")
        raise UnreadableImage(f"not a regular file but {kind}; give the path of an image file")
    if info.st_size > MAX_FILE_BYTES:
        raise UnreadableImage(f"a file of {_megabytes(info.st_size)}, over the limit of {_megabytes(MAX_FILE_BYTES)} "
                              "for an image; shrink it or save it as a JPEG")


def _read_file(path: str) -> bytes:
    """The bytes of a regular file: its `stat` is checked before it is opened (a device is never opened),
    and it is opened without blocking and checked again, so a FIFO swapped in meanwhile cannot hang us."""
    _check_file(os.stat(path))
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with open(fd, "rb") as f:
        _check_file(os.fstat(fd))
        data = f.read(MAX_FILE_BYTES + 1)  # a file that grew since its stat is still cut at the limit
    if len(data) > MAX_FILE_BYTES:
        raise UnreadableImage(f"a file over the limit of {_megabytes(MAX_FILE_BYTES)} for an image; shrink it or "
                              "save it as a JPEG")
    return data


_TAR_LOCK = threading.Lock()  # one TarFile has one file position: threads take turns


@functools.lru_cache(maxsize=8)
def _open_shard(tar_path: str, pid: int) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:  # noqa: ARG001
    # (pid is read by lru_cache only: it is the cache key that gives each process its own file)
    """A shard opened once per process: the pid is in the key so a forked DataLoader worker opens its own
    file instead of sharing (and moving) its parent's file position."""
    info = os.stat(tar_path)
    if not stat.S_ISREG(info.st_mode):  # a FIFO named as a shard would block tarfile.open
        raise UnreadableImage(f"its shard {tar_path} is not a regular file")
    tar = tarfile.open(tar_path)
    return tar, {m.name: m for m in tar.getmembers()}


def read_image_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of an image file, or of "<shard.tar>::<member>"; UnreadableImage says why not."""
    tar_path, sep, member = os.fspath(path).partition("::")
    try:
        if not sep:
            return _read_file(tar_path)
        with _TAR_LOCK:
            tar, members = _open_shard(os.path.abspath(tar_path), os.getpid())
            if member not in members:
                raise UnreadableImage("missing file")
            info = members[member]
            if not info.isfile():
                raise UnreadableImage("not a regular file in its shard")
            if info.size > MAX_FILE_BYTES:
                raise UnreadableImage(f"a file of {_megabytes(info.size)}, over the limit of "
                                      f"{_megabytes(MAX_FILE_BYTES)} for an image")
            return tar.extractfile(info).read(MAX_FILE_BYTES + 1)
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


def _reduce(img: Image.Image, draft: int) -> Image.Image:
    """A decoded image that is not a drafted JPEG, box-reduced by the JPEG draft rule (1/2, 1/4, 1/8 while
    both sides stay at least `draft`): the costly conversions below then run on the small image. Modes
    `reduce` cannot average (palette, 1-bit, 16-bit) are converted first; small images are left as they are."""
    scale = _draft_scale(img.width, img.height, draft)
    if scale == 1:
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        img = img.convert("I")
    elif img.has_transparency_data and img.mode not in ("RGBA", "LA"):
        img = img.convert("RGBA")
    elif img.mode not in ("L", "RGB", "I", "F", "RGBA", "LA"):
        img = img.convert("RGB")
    return img.reduce(scale)


@contextlib.contextmanager
def _as_unreadable(fmt: str | None, max_pixels: int | None = None):
    """Whatever Pillow raises on a damaged or hostile file, as UnreadableImage with a reason."""
    try:
        yield
    except UnreadableImage:
        raise
    except UnidentifiedImageError:
        raise UnreadableImage(f"truncated {fmt}" if fmt else "not an image (cannot identify image file)") from None
    except Image.DecompressionBombError:
        limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
        raise UnreadableImage(f"too large: over {2 * Image.MAX_IMAGE_PIXELS / 1e6:g} megapixels, over the limit "
                              f"of {limit / 1e6:g} megapixels; shrink it first") from None
    except MemoryError:
        raise UnreadableImage("not enough memory to decode it; shrink it first") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # what Pillow raises on broken data
        message = str(exc)
        if "truncated" in message.lower() or "broken data stream" in message:
            raise UnreadableImage(f"truncated {fmt or 'image'}") from None
        raise UnreadableImage(f"cannot decode {fmt or 'image'} ({message})") from None
    except Exception as exc:  # a fuzzed file can make a decoder raise anything (IndexError, ZeroDivisionError, ...)
        raise UnreadableImage(f"cannot decode {fmt or 'image'} ({type(exc).__name__}: {exc})") from None


def prepare_image(img: Image.Image, draft: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """The one decoding policy, for a PIL image (opened, perhaps not yet loaded): size and shape limits,
    JPEG draft or the same reduction after decoding, EXIF orientation, RGB. A PIL image given by a caller
    goes through here as a file does."""
    with _as_unreadable(getattr(img, "format", None), max_pixels):
        check_size(img.width, img.height, max_pixels)
        drafted = bool(draft and img.format in ("JPEG", "MPO") and getattr(img, "tile", None))  # not decoded yet
        if drafted:
            img.draft("RGB", (draft, draft))
        img.load()
        turn = _TURNS.get(img.getexif().get(ORIENTATION, 1))
        if draft and not drafted:
            img = _reduce(img, draft)
        if turn is not None:
            img = img.transpose(turn)  # a copy, turned as the camera meant
        return to_rgb(img)


# The first bytes of the formats photos come in: a file that starts like one but cannot be opened was cut short.
_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG": "PNG", b"GIF8": "GIF"}
# ... and of formats Pillow could read but the course does not hand it: refused by name, never decoded
_OTHER_FORMATS = {b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"\x00\x00\x01\x00": "ICO", b"\x00\x00\x02\x00": "CUR",
                  b"DDS ": "DDS", b"qoif": "QOI", b"8BPS": "PSD", b"%!PS": "PostScript (EPS)",
                  b"\xc5\xd0\xd3\xc6": "PostScript (EPS)", b"%PDF": "PDF", b"\x00\x00\x00\x0cjP  ": "JPEG 2000",
                  b"\xffO\xffQ": "JPEG 2000", b"icns": "ICNS", b"SIMPLE  =": "FITS", b"BLP": "BLP",
                  b"\x0a\x05\x01": "PCX", b"\x01\xda": "SGI", b"\x59\xa6\x6a\x95": "Sun raster"}
_FTYP = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"avif": "AVIF"}  # ISO media: "....ftyp<brand>"


def _other_format(data: bytes) -> str | None:
    """The name of a format the course does not read, from a file's first bytes; None if not one of those."""
    if data[4:8] == b"ftyp" and data[8:12] in _FTYP:
        return _FTYP[data[8:12]]
    return next((name for magic, name in _OTHER_FORMATS.items() if data.startswith(magic)), None)


class _Budget(io.BytesIO):
    """Bytes in memory that refuse to be read past a deadline: Pillow's decoders read their input block by
    block (64 KB), so a decode stops within one block's work of `seconds`."""

    def __init__(self, data: bytes, seconds: float | None):
        super().__init__(data)
        self.seconds = seconds
        self.start()

    def start(self) -> None:
        """The budget counts from now (the decode, not the wait for a turn to decode)."""
        self.deadline = None if self.seconds is None else time.monotonic() + self.seconds

    def read(self, size: int | None = -1) -> bytes:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise UnreadableImage(f"it took over {self.seconds:g} s to decode, this server's limit; send a smaller "
                                  "image")
        return super().read(size)


def decode_image(data: bytes, draft: int | None = None, max_pixels: int | None = None, seconds: float | None = None,
                 gate=None) -> Image.Image:
    """An RGB image from bytes in memory (an upload in a widget or the web demo), or UnreadableImage.

    `draft` decodes JPEGs at a reduced scale no smaller than draft x draft, and reduces other formats
    likewise after decoding. `max_pixels` (default MAX_IMAGE_PIXELS) and MAX_ASPECT refuse an image before
    it is decoded: memory stays bounded whatever arrives. `seconds`: a time budget for the decode.
    `gate(pixels)`: a context manager the decode runs under, given the pixels it will decode (the web demo
    queues large images there); what it raises passes through.
    """
    if not data:
        raise UnreadableImage("zero bytes")
    if len(data) > MAX_FILE_BYTES:
        raise UnreadableImage(f"a file of {_megabytes(len(data))}, over the limit of {_megabytes(MAX_FILE_BYTES)} for "
                              "an image; shrink it or save it as a JPEG")
    fmt = next((name for magic, name in _SIGNATURES.items() if data.startswith(magic)), None)
    with _as_unreadable(fmt, max_pixels):
        stream = _Budget(data, seconds)
        try:
            img = Image.open(stream, formats=IMAGE_FORMATS)
        except UnidentifiedImageError:
            other = None if fmt else _other_format(data)
            if other:
                raise UnreadableImage(f"not an image the course reads: {other} format; save it as {FORMAT_NAMES}") \
                    from None
            raise
        check_size(img.width, img.height, max_pixels)
    pixels = img.width * img.height  # what the decoder fills: a JPEG only its draft's share
    if img.format in ("JPEG", "MPO"):
        pixels //= _draft_scale(img.width, img.height, draft) ** 2
    with gate(pixels) if gate else contextlib.nullcontext():
        stream.start()
        return prepare_image(img, draft, max_pixels)


def open_image(path: str | os.PathLike, draft: int | None = None, max_pixels: int | None = None,
               seconds: float | None = None) -> Image.Image:
    """A fully loaded RGB image from a file (or "<shard.tar>::<member>"), or UnreadableImage saying why not."""
    return decode_image(read_image_bytes(path), draft, max_pixels, seconds)


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
