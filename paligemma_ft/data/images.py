"""Reading and decoding image files: the one place where a dataset image, a `predict` input, an app upload or a
gallery thumbnail is turned into pixels.

    data = read_image_file(path, max_bytes=...)     # bytes of a regular file, size checked before reading
    image = decode_image(data, max_pixels=...)      # uint8[H, W, 3], format and pixel count checked first
    image = load_image(path)                        # both

What is refused, before any pixel is decoded (each a `BadExample` with a reason code):
  - anything that is not a regular file: a folder, a named pipe (reading it would wait forever for a writer), a
    device such as `/dev/zero` (endless) or a socket ("not_a_file"); the file is checked before it is opened
    (opening some devices has effects) and again through the opened handle;
  - a file larger than `max_bytes` (`input.max_image_bytes`, default 64 MiB), from its size before reading
    ("image_too_large");
  - a format outside `ALLOWED_FORMATS` ("unreadable_image"), whatever the file is called: PIL is only asked to
    try these formats, so it never hands data to an external program (EPS/PS go to Ghostscript) or to a decoder
    that works inside `open()`;
  - more than `max_pixels` pixels (`input.max_image_pixels`), read from the header ("decompression_bomb").

The allowed formats are those a user's dataset plausibly holds, each decoded in-process by Pillow's own or a
bundled library, and each with its size in the header that `Image.open` reads (so the pixel check comes before
any decode): JPEG (and MPO, multi-picture JPEG), PNG, WebP, GIF (first frame), BMP and TIFF (scans, microscopy).
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import zlib

import numpy as np
from PIL import Image, ImageOps

from paligemma_ft.data.errors import BadExample

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default decompression-bomb limit (~ 9459 x 9459).
DEFAULT_MAX_BYTES = 64 * 2**20  # `input.max_image_bytes`: a 64 MiB photo is already unusual for fine-tuning.
_FORMAT_NAMES = ", ".join("WebP" if f == "WEBP" else f for f in ALLOWED_FORMATS)
_NOT_REGULAR = (
    (stat.S_ISDIR, "folder"),
    (stat.S_ISFIFO, "named pipe"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


def _kind(mode: int) -> str | None:
    """What a non-regular file is ("named pipe", ...), or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _NOT_REGULAR if test(mode)), "special file")


def _refuse_special(path: str, mode: int) -> None:
    kind = _kind(mode)
    if kind is not None:
        raise BadExample("not_a_file", f"image file {path} is a {kind}; only regular files are read as images")


def _refuse_large(path: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise BadExample(
            "image_too_large",
            f"image file {path} is {size:,} bytes, over input.max_image_bytes={max_bytes:,}; "
            "shrink or re-encode it, or raise the limit",
        )


def read_image_file(path: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of an image file, if it is a regular file of at most `max_bytes` bytes.

    Raises:
      BadExample: "missing_image" (no such file), "not_a_file" (folder, pipe, device, socket), "image_too_large"
        (over `max_bytes`, known before reading), "unreadable_image" (permissions, I/O errors).
    """
    name = os.fspath(path)
    try:
        _refuse_special(name, os.stat(name).st_mode)  # Before opening: opening a device can have effects.
        # O_NONBLOCK: if the file was swapped for a pipe since the check, opening it still returns at once.
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise BadExample("missing_image", f"image file {name} does not exist") from None
    except OSError as e:  # Permissions, a dangling link's loop, I/O errors.
        raise BadExample("unreadable_image", f"image file {name} cannot be read: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())  # The file actually opened.
        _refuse_special(name, info.st_mode)
        _refuse_large(name, info.st_size, max_bytes)
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise BadExample("unreadable_image", f"image file {name} cannot be read: {e.strerror or e}") from None
    _refuse_large(name, len(data), max_bytes)  # It grew while being read.
    return data


def load_image(
    path: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """`read_image_file` then `decode_image`: uint8[H, W, 3]; a `BadExample` names the file."""
    try:
        return decode_image(read_image_file(path, max_bytes=max_bytes), max_pixels=max_pixels)
    except BadExample as e:
        raise e.located(os.fspath(path), None) from None


def _sniff(prefix: bytes) -> str | None:
    """The format PIL would take `prefix` for among all its plugins, only to name it in a refusal (the plugins'
    `accept` functions look at the first bytes; nothing is opened or decoded)."""
    Image.init()
    for fmt in Image.ID:
        accept = Image.OPEN.get(fmt, (None, None))[1]
        try:
            if accept is not None and accept(prefix):
                return fmt
        except Exception:  # noqa: BLE001, S112 - a plugin's check failing says nothing about the file.
            continue
    return None


def open_header(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A PIL image of `data` with only its header read, after checking its format and pixel count.

    Raises:
      BadExample: "empty_image", "unreadable_image" (not one of `ALLOWED_FORMATS`, or a broken header),
        "decompression_bomb" (more than `max_pixels` pixels).
    """
    if len(data) == 0:
        raise BadExample("empty_image", "image file is empty (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # Reads only the header.
    except Image.DecompressionBombError as e:  # PIL's own limit, at 2x Image.MAX_IMAGE_PIXELS.
        raise BadExample("decompression_bomb", f"image refused: {e}") from None
    except Image.UnidentifiedImageError:  # PIL's message shows the BytesIO object; the first bytes say more.
        sniffed = _sniff(bytes(data[:16]))
        looks = f"it looks like {sniffed}, which is not read; " if sniffed else ""
        raise BadExample(
            "unreadable_image",
            f"not an image in an allowed format ({_FORMAT_NAMES}); {looks}the file starts with {bytes(data[:8])!r}",
        ) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types (SyntaxError, OSError, ...).
        raise BadExample("unreadable_image", f"not a decodable image: {_describe(e)}") from None
    width, height = im.size
    if width * height > max_pixels:
        raise BadExample(
            "decompression_bomb",
            f"image of {width}x{height} = {width * height} pixels exceeds "
            f"input.max_image_pixels={max_pixels}; refused before decoding",
        )
    return im


def decode_image(data: bytes | np.ndarray, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decodes an image into RGB `uint8[H, W, 3]`.

    Accepts `ALLOWED_FORMATS` (JPEG, PNG, WebP, GIF (first frame), BMP, TIFF) in any mode: L, LA, P, PA, RGBA
    (alpha dropped, as big_vision's 3-channel decode), CMYK, 16-bit (`I;16`, scaled to 8 bits) and 32-bit `I`/`F`.
    EXIF orientation is applied. Arrays (e.g. from TFDS) may be `uint8[H, W]`, `[H, W, 1]`, `[H, W, 3]` or
    `[H, W, 4]`.

    The format and the pixel count are read from the header and checked before any pixel is decoded, so a
    30000 x 30000 "decompression bomb" is refused in microseconds without allocating memory.

    Raises:
      BadExample: empty data ("empty_image"), too many pixels ("decompression_bomb"), or data that is not a
        decodable image of an allowed format, including truncated files and PNGs failing a CRC check
        ("unreadable_image").
    """
    if isinstance(data, np.ndarray):
        return _array_to_rgb(data)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadExample("unreadable_image", f"image must be bytes or a uint8 array, got {type(data).__name__}")
    im = open_header(bytes(data), max_pixels=max_pixels)
    if im.format == "PNG":
        _check_png_crcs(bytes(data))
    try:
        im.seek(0)  # First frame of animated GIF/WebP.
        im.load()  # Truncated files fail here (ImageFile.LOAD_TRUNCATED_IMAGES stays False).
        im = ImageOps.exif_transpose(im)
        return _pil_to_rgb(im)
    except Exception as e:  # noqa: BLE001
        raise BadExample("unreadable_image", f"image could not be decoded: {_describe(e)}") from None


def _describe(error: Exception) -> str:
    """`Type: message` without object addresses (`at 0x7f...`), so one bad file always gets the same text and the
    bad-input report, which merges identical entries, counts it once however often it is read."""
    return f"{type(error).__name__}: {re.sub(r' at 0x[0-9a-fA-F]+', '', str(error))}"


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png_crcs(data: bytes) -> None:
    """Refuses a PNG whose critical chunks (IHDR, PLTE, IDAT, IEND) fail their CRC-32, as libpng does.

    PIL checks only the chunks before the image data, so a bit flip inside IDAT would otherwise decode into wrong
    pixels without a word. Ancillary chunks (lower-case first letter) are skipped here: libpng only warns on them
    (PIL itself checks those that come before the image data).
    The check reads the bytes once (CRC-32 runs at GB/s), and stops at IEND or where the file is cut short, which
    `load()` then reports as a truncated file.
    """
    pos = len(_PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length = struct.unpack(">I", data[pos : pos + 4])[0]
        kind = data[pos + 4 : pos + 8]
        end = pos + 8 + length
        if end + 4 > len(data):
            return
        if kind[:1].isupper() and struct.unpack(">I", data[end : end + 4])[0] != zlib.crc32(data[pos + 4 : end]):
            raise BadExample(
                "unreadable_image", f"corrupt PNG: chunk {kind.decode('latin-1')!r} at byte {pos} fails its CRC check"
            )
        if kind == b"IEND":
            return
        pos = end + 4


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    """PIL image of any mode -> uint8[H, W, 3]."""
    if im.mode.startswith("I;16"):  # 16-bit grayscale: keep the full range, scaled to 8 bits.
        return _gray16_to_rgb(np.asarray(im).astype(np.float32))
    if im.mode == "I":
        values = np.asarray(im).astype(np.float32)
        # 32-bit ints mostly come from 16-bit sources (PNG/TIFF); values above 255 mean that range.
        return _gray16_to_rgb(values) if values.max(initial=0) > 255 else _gray_to_rgb(values)
    if im.mode == "F":
        return _gray_to_rgb(np.asarray(im))
    # L, LA, P, PA, RGBA, CMYK, YCbCr, 1, ...: PIL's conversion; alpha is dropped like a 3-channel decode.
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _gray16_to_rgb(values: np.ndarray) -> np.ndarray:
    return _gray_to_rgb(values / 257.0)  # 65535 / 257 = 255.


def _gray_to_rgb(values: np.ndarray) -> np.ndarray:
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise BadExample("unreadable_image", f"image array must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape:
        raise BadExample("unreadable_image", f"image array must be [H, W] or [H, W, 1|3|4], got {array.shape}")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])
