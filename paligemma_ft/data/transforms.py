"""Small pure transforms from a raw example to model inputs (big_vision reference 4 and 5).

A raw example (see `sources.py`) is a dict `{"id", "image", "image_path", "prefix", "suffix", "references",
"file", "line"}` whose `image` is encoded bytes or a `uint8[H, W, 3]` array. The transforms, applied in order:

    decode       image bytes/array -> uint8[H, W, 3] (EXIF orientation applied, any colour mode to RGB)
    resize       -> float32[R, R, 3] in [0, 255], bilinear with antialias, aspect ratio not kept
    value_range  -> float32[R, R, 3] in [-1, 1]  (x / 127.5 - 1)
    tokenize     -> text, mask_ar, mask_loss (training) or text, mask_ar, mask_input (prompts)

This follows the fine-tuning colab: `tf.image.resize(bilinear, antialias=True)` gives float32 that is not
re-quantized to uint8 before `/127.5 - 1` (big_vision's pp op rounds to uint8 first; the difference is < 1/255).

Every transform raises `BadExample(reason, detail)` on bad input; the pipeline applies the bad-input policy.
"""

from __future__ import annotations

import dataclasses
import io
import re
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from paligemma_ft import tokenizer as tokenizer_lib

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default decompression-bomb limit (~ 9459 x 9459).
Example = dict[str, Any]


class BadExample(ValueError):
    """An example that cannot be used, with a short machine-readable `reason` and where it came from.

    Args:
      reason: a short code counted in the bad-input report, e.g. "malformed_json", "missing_image".
      detail: a human explanation.
      file: the file the example came from (JSONL, annotations or image file), if known.
      line: the 1-based line in `file`, if the source is line based.
    """

    def __init__(self, reason: str, detail: str = "", *, file: str | None = None, line: int | None = None):
        self.reason, self.detail, self.file, self.line = reason, detail, file, line
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else (self.file or "<unknown source>")
        return f"{where}: {self.detail or self.reason} [{self.reason}]"

    def located(self, file: str | None, line: int | None) -> BadExample:
        """This error with `file`/`line` filled in where they are still unknown."""
        if self.file is not None:
            return self
        return BadExample(self.reason, self.detail, file=file, line=self.line if line is None else line)

    def __reduce__(self):  # Keeps keyword arguments through pickling (worker processes, copies).
        return (_rebuild_bad_example, (self.reason, self.detail, self.file, self.line))


def _rebuild_bad_example(reason, detail, file, line) -> BadExample:
    return BadExample(reason, detail, file=file, line=line)


# ----------------------------------------------------------------------------------------------------------- image


def decode_image(data: bytes | np.ndarray, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decodes an image into RGB `uint8[H, W, 3]`.

    Accepts what PIL reads (JPEG, PNG, WebP, GIF (first frame), BMP, ...) in any mode: L, LA, P, PA, RGBA (alpha
    dropped, as big_vision's 3-channel decode), CMYK, 16-bit (`I;16`, scaled to 8 bits) and 32-bit `I`/`F`.
    EXIF orientation is applied. Arrays (e.g. from TFDS) may be `uint8[H, W]`, `[H, W, 1]`, `[H, W, 3]` or
    `[H, W, 4]`.

    The pixel count is read from the header and checked against `max_pixels` before any pixel is decoded, so a
    30000 x 30000 "decompression bomb" is refused in microseconds without allocating memory.

    Raises:
      BadExample: empty data ("empty_image"), too many pixels ("decompression_bomb"), or data that is not a
        decodable image, including truncated files and PNGs failing a CRC check ("unreadable_image").
    """
    if isinstance(data, np.ndarray):
        return _array_to_rgb(data)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadExample("unreadable_image", f"image must be bytes or a uint8 array, got {type(data).__name__}")
    if len(data) == 0:
        raise BadExample("empty_image", "image file is empty (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))  # Reads only the header.
    except Image.DecompressionBombError as e:  # PIL's own limit, at 2x Image.MAX_IMAGE_PIXELS.
        raise BadExample("decompression_bomb", f"image refused: {e}") from None
    except Image.UnidentifiedImageError:  # PIL's message shows the BytesIO object; the first bytes say more.
        raise BadExample(
            "unreadable_image", f"not an image in a format PIL reads (the file starts with {bytes(data[:8])!r})"
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


def resize(image: np.ndarray, res: int) -> np.ndarray:
    """Resizes to `res x res` (aspect ratio not kept), bilinear with antialias, without re-quantizing.

    Args:
      image: uint8 or float32 `[H, W, 3]` in [0, 255].
      res: output side in pixels.

    Returns:
      float32[res, res, 3] in [0, 255].
    """
    image = np.asarray(image)
    if image.shape[:2] == (res, res):
        return image.astype(np.float32)
    # PIL's BILINEAR widens its triangle filter by the scale factor when shrinking, which is the antialiasing
    # of tf.image.resize(antialias=True). Resizing each channel in mode "F" keeps float precision, as the colab.
    channels = [
        Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32), mode="F").resize(
            (res, res), Image.Resampling.BILINEAR
        )
        for c in range(image.shape[-1])
    ]
    return np.stack([np.asarray(c, dtype=np.float32) for c in channels], axis=-1)


def value_range(image: np.ndarray) -> np.ndarray:
    """Maps [0, 255] to float32 [-1, 1] (x / 127.5 - 1), the range SigLIP was trained on."""
    return np.asarray(image, dtype=np.float32) / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------------------ text


def _target_text(example: Mapping[str, Any], lowercase: bool) -> str:
    suffix = example.get("suffix")
    if suffix is None:
        raise BadExample("missing_suffix", "example has no suffix (target text)")
    if not isinstance(suffix, str):
        raise BadExample("bad_field", f"suffix must be a string, got {type(suffix).__name__}")
    if not suffix.strip():
        raise BadExample("empty_suffix", "suffix (target text) is empty")
    return suffix.lower() if lowercase else suffix


def _prefix_text(example: Mapping[str, Any], default: str) -> str:
    prefix = example.get("prefix")
    if prefix is None:
        return default
    if not isinstance(prefix, str):
        raise BadExample("bad_field", f"prefix must be a string, got {type(prefix).__name__}")
    return prefix


def _references(example: Mapping[str, Any], lowercase: bool) -> list[str]:
    refs = list(example.get("references") or [])
    return [r.lower() for r in refs] if lowercase else refs


def tokenize_train(
    example: Example, tok: tokenizer_lib.Tokenizer, prefix: str, text_len: int, *, lowercase: bool = False
) -> Example:
    """Adds the training sequence: `text`, `mask_ar`, `mask_loss` as int32[text_len + 1].

    The `+ 1` is big_vision's: the trainer feeds `text[:, :-1]` and predicts `text[:, 1:]`. The example's own
    `prefix` wins over the default `prefix`. Other keys are kept; `_truncated` tells whether the sequence was cut.

    Raises:
      BadExample: missing ("missing_suffix") or empty ("empty_suffix") target, or a non-string field.
    """
    suffix = _target_text(example, lowercase)
    arrays, truncated = tokenizer_lib.make_train_example(tok, _prefix_text(example, prefix), suffix, text_len + 1)
    return {
        **example,
        **arrays,
        "prefix": _prefix_text(example, prefix),
        "suffix": suffix,
        "references": _references(example, lowercase),
        "_truncated": truncated,
    }


def tokenize_prompt(
    example: Example, tok: tokenizer_lib.Tokenizer, prefix: str, text_len: int, *, lowercase: bool = False
) -> Example:
    """Adds the decoding prompt: `text`, `mask_ar`, `mask_input` as int32[text_len]; keeps references/meta.

    The suffix is the target, so it is not part of the prompt; decoding starts right after the separator.

    Raises:
      BadExample: a prefix that is not a string ("bad_field").
    """
    used_prefix = _prefix_text(example, prefix)
    arrays, truncated = tokenizer_lib.make_prompt(tok, used_prefix, text_len)
    return {
        **example,
        **arrays,
        "prefix": used_prefix,
        "references": _references(example, lowercase),
        "_truncated": truncated,
    }


# ------------------------------------------------------------------------------------------- transforms by name


@dataclasses.dataclass(frozen=True)
class Context:
    """What the named transforms need besides the example.

    Attributes:
      tok: the tokenizer.
      res: image side after `resize`.
      text_len: big_vision's text length (training sequences are `text_len + 1` long).
      prefix: default prefix for examples without one.
      kind: "train" (text, mask_ar, mask_loss) or "prompt" (text, mask_ar, mask_input).
      lowercase: lower-case suffixes and references (the colab does).
      max_pixels: decompression-bomb limit for `decode`.
    """

    tok: tokenizer_lib.Tokenizer
    res: int
    text_len: int
    prefix: str
    kind: str = "train"
    lowercase: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS


def _decode(ex: Example, ctx: Context) -> Example:
    return {**ex, "image": decode_image(ex["image"], max_pixels=ctx.max_pixels)}


def _resize(ex: Example, ctx: Context) -> Example:
    return {**ex, "image": resize(ex["image"], ctx.res)}


def _value_range(ex: Example, ctx: Context) -> Example:
    return {**ex, "image": value_range(ex["image"])}


def _tokenize(ex: Example, ctx: Context) -> Example:
    fn = tokenize_train if ctx.kind == "train" else tokenize_prompt
    return fn(ex, ctx.tok, ctx.prefix, ctx.text_len, lowercase=ctx.lowercase)


TRANSFORMS: dict[str, Callable[[Example, Context], Example]] = {
    "decode": _decode,
    "resize": _resize,
    "value_range": _value_range,
    "tokenize": _tokenize,
}
DEFAULT_TRANSFORMS = ("decode", "resize", "value_range", "tokenize")  # `input.transforms` overrides.


def check_transform_names(names: Sequence[str]) -> None:
    """Raises ValueError naming `input.transforms` entries that are not in `TRANSFORMS`."""
    unknown = [n for n in names if n not in TRANSFORMS]
    if unknown:
        raise ValueError(f"input.transforms has unknown entries {unknown}; known: {sorted(TRANSFORMS)}.")


def apply_transforms(example: Example, names: Sequence[str], ctx: Context) -> Example:
    """Applies the named transforms in order (each a pure function of the example and `ctx`)."""
    for name in names:
        example = TRANSFORMS[name](example, ctx)
    return example
