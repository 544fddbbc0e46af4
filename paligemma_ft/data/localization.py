"""Boxes and masks as PaliGemma text: `<locY0><locX0><locY1><locX1>[<seg>x16] label ; ...` (reference 9).

An annotated object becomes four `<locNNNN>` tokens, y first: each normalised coordinate v in [0, 1] is the bin
`round(v * 1023)` clipped to [0, 1023], as big_vision's `refcoco_mask2str` (decoding divides by 1023 again, so a box
survives the round trip within half a bin). Coordinates are normalised to the image; the config's resize squashes
the image to `res x res` without cropping, so they are also the coordinates after the resize. For segmentation, 16
`<segNNN>` tokens follow: the VQ-VAE codes of the mask cropped to the box (`masks.codec_input`). Then the label, if
the object has one (referring expressions, as big_vision's RefCOCO, have none). Objects are joined by " ; ".

Training examples get the prefix `"<task> label1 ; label2"` (the labels in the order of their first object) unless
the row has its own, and the objects in one of three orders (`input.data.order`):

    listed   as the annotation lists them (always used for evaluation references)
    area     largest box first
    random   a new order every epoch, from (seed, epoch, example): a resumed run sees the same orders

The random order needs the epoch, which only the pipeline knows: sources leave `_order` in the raw example and the
pipeline's loader calls `with_epoch(example, epoch)` before the transforms.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from paligemma_ft.data.transforms import BadExample

TASKS = ("detect", "segment")
_COMMON_KEYS = {"source", "image_dir", "allow_outside", "task", "order", "seed", "codec"}
SOURCE_KEYS = {  # `input.data` keys of the annotation sources (`annotations.py`).
    "coco_instances": _COMMON_KEYS | {"annotations", "prompt_labels"},
    "jsonl_boxes": _COMMON_KEYS | {"path", "coords"},
    "voc": _COMMON_KEYS | {"annotations"},
}
ORDERS = ("listed", "area", "random")
COORDS = ("pixel", "normalized")
LOC_SCALE = 1023  # big_vision: bin = round(v * 1023), v = bin / 1023.
_EDGE_SLACK = 1e-3  # Relative overshoot accepted (and clipped) at the image border: float rounding in exports.


@dataclasses.dataclass(frozen=True)
class Obj:
    """One annotated object.

    Attributes:
      label: its class name or None (a referring expression's target has no label in its suffix).
      box: (y0, x0, y1, x1) normalised to the image, in [0, 1], y1 > y0 and x1 > x0.
      mask: a mask spec (`masks.read_mask`) or None.
    """

    label: str | None
    box: tuple[float, float, float, float]
    mask: Mapping[str, Any] | None = None

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


def check_choice(value: Any, choices: Sequence[str], key: str) -> str:
    """`value` if it is one of `choices`; else ValueError naming `input.data.<key>`."""
    if value not in choices:
        raise ValueError(f"input.data.{key}={value!r} must be one of {list(choices)}.")
    return value


def _numbers(values: Any, what: str) -> list[float]:
    if not isinstance(values, (list, tuple)) or len(values) != 4:
        raise BadExample("bad_box_format", f"{what} must be a list of 4 numbers, got {values!r:.80}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise BadExample("bad_box_format", f"{what} holds {v!r:.40}, not a number")
        if not math.isfinite(v):
            raise BadExample("bad_box_format", f"{what} holds a NaN or infinite value")
        out.append(float(v))
    return out


def normalise_box(
    values: Any, fmt: str, coords: str, width: int | None, height: int | None, what: str = "box"
) -> tuple[float, float, float, float]:
    """(y0, x0, y1, x1) in [0, 1] from an `xyxy` or `xywh` box in pixel or normalised coordinates.

    Args:
      values: the 4 numbers as annotated.
      fmt: "xyxy" (corners) or "xywh" (top-left corner, width, height; COCO's `bbox`).
      coords: "pixel" (needs width and height) or "normalized" (fractions of the image side).
      width, height: the image size in pixels.
      what: how messages name the box (e.g. "boxes[2].xyxy").

    Raises:
      BadExample: "bad_box_format" (not 4 finite numbers), "box_outside_image" (beyond the image by more than
        0.1 % of its side; smaller overshoots are clipped), "degenerate_box" (no width or height).
    """
    x0, y0, a, b = _numbers(values, what)
    x1, y1 = (x0 + a, y0 + b) if fmt == "xywh" else (a, b)
    if coords == "pixel":
        if not width or not height:
            raise BadExample("unreadable_image", f"{what}: the image size is unknown, pixel boxes cannot be normalised")
        x0, x1, y0, y1 = x0 / width, x1 / width, y0 / height, y1 / height
    if x1 <= x0 or y1 <= y0:
        raise BadExample(
            "degenerate_box", f"{what} {values!r} has no area (x1 <= x0 or y1 <= y0 after reading it as {fmt})"
        )
    if min(x0, y0) < -_EDGE_SLACK or max(x1, y1) > 1 + _EDGE_SLACK:
        size = f" of the {width}x{height} image" if coords == "pixel" else " ([0, 1] in normalized coordinates)"
        raise BadExample("box_outside_image", f"{what} {values!r} ({fmt}, {coords}) lies outside the image{size}")
    box = tuple(min(max(v, 0.0), 1.0) for v in (y0, x0, y1, x1))
    bins = [round(v * LOC_SCALE) for v in box]
    if bins[2] <= bins[0] or bins[3] <= bins[1]:
        raise BadExample("degenerate_box", f"{what} {values!r} is thinner than one of the 1024 location bins")
    return box  # type: ignore[return-value]


def loc_tokens(box: Sequence[float]) -> str:
    """`<locY0><locX0><locY1><locX1>` of a normalised (y0, x0, y1, x1) box: round(v * 1023), clipped."""
    return "".join(f"<loc{min(max(round(v * LOC_SCALE), 0), LOC_SCALE):04d}>" for v in box)


def seg_tokens(codes: Sequence[int]) -> str:
    """`<segNNN>` x 16 of the codec's codes."""
    return "".join(f"<seg{int(c):03d}>" for c in codes)


def object_text(tokens: str, label: str | None) -> str:
    return f"{tokens} {label}" if label else tokens


def order_objects(objects: Sequence[Any], order: str, areas: Sequence[float], rng: np.random.Generator | None) -> list:
    """`objects` in `order` ("listed", "area": largest first, ties as listed, "random": a permutation from `rng`)."""
    if order == "area":
        return [objects[i] for i in sorted(range(len(objects)), key=lambda i: -areas[i])]
    if order == "random":
        assert rng is not None
        return [objects[i] for i in rng.permutation(len(objects))]
    return list(objects)


def prompt(task: str, labels: Sequence[str | None]) -> str:
    """`"detect a ; b"`: the task and the distinct labels in order of first appearance."""
    unique = list(dict.fromkeys(label for label in labels if label))
    return f"{task} {' ; '.join(unique)}" if unique else task


def texts(parts: Sequence[tuple[str, str | None]], task: str, prefix: str | None) -> tuple[str, str]:
    """(prefix, suffix) for objects given as (tokens, label) in their final order; the row's prefix wins."""
    suffix = " ; ".join(object_text(tokens, label) for tokens, label in parts)
    return (prefix if prefix is not None else prompt(task, [label for _, label in parts])), suffix


def localized_example(
    base: Mapping[str, Any],
    parts: Sequence[tuple[str, str | None]],
    areas: Sequence[float],
    *,
    task: str,
    order: str,
    seed: int,
    index: int,
    row_prefix: str | None,
) -> dict[str, Any]:
    """A raw example (see `sources.py`) with `prefix`, `suffix` and `references` built from its objects.

    `references` always hold the listed order (what evaluation compares against); `suffix` is in `order`, with
    `random` left to `with_epoch` (the order of epoch 0 until then).
    """
    listed_prefix, listed = texts(parts, task, row_prefix)
    out = {**base, "references": [listed]}
    if order == "random":
        out["_order"] = {"parts": list(parts), "task": task, "seed": seed, "index": index, "prefix": row_prefix}
        return with_epoch(out, 0)
    ordered = order_objects(parts, order, areas, None)
    out["prefix"], out["suffix"] = texts(ordered, task, row_prefix)
    return out


def with_epoch(example: dict[str, Any], epoch: int) -> dict[str, Any]:
    """The example with its objects in epoch `epoch`'s random order (a no-op for other orders and examples)."""
    spec = example.get("_order")
    if spec is None:
        return example
    rng = np.random.default_rng([spec["seed"], epoch, spec["index"]])
    ordered = order_objects(spec["parts"], "random", [], rng)
    prefix, suffix = texts(ordered, spec["task"], spec["prefix"])
    return {**example, "prefix": prefix, "suffix": suffix}
