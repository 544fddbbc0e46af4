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
Image files are read and decoded by `paligemma_ft.data.images` (allowed formats, size and pixel limits);
`decode_image` and `BadExample` are importable from here too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from paligemma_ft import tokenizer as tokenizer_lib
from paligemma_ft.data.errors import BadExample
from paligemma_ft.data.images import DEFAULT_MAX_PIXELS, decode_image  # Decoding lives in images.py.

Example = dict[str, Any]


# ----------------------------------------------------------------------------------------------------------- image


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
