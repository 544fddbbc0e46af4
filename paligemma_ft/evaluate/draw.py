"""Drawing localization outputs: boxes with their labels and filled masks, on an image.

Shared by `paligemma-ft predict --draw`, the evaluation galleries (HTML thumbnails and the PNG contact sheet) and
the Streamlit app, so a box looks the same everywhere. Boxes are `evaluate.detection.Box` (or their dict form, as
read back from a predictions JSONL); masks are bool[H, W] arrays at any resolution or COCO RLE dicts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (128, 128, 0),
)
REFERENCE, PREDICTION = (0, 200, 0), (230, 0, 0)  # Gallery colours: references green, predictions red.
MASK_ALPHA = 0.45


def coords(box: Any) -> tuple[float, float, float, float]:
    """(y0, x0, y1, x1) of a Box or of its dict form."""
    if isinstance(box, Mapping):
        return box["y0"], box["x0"], box["y1"], box["x1"]
    return box.y0, box.x0, box.y1, box.x1


def label_of(box: Any) -> str:
    return str(box.get("label", "") if isinstance(box, Mapping) else box.label)


def as_mask(mask: Any, height: int, width: int) -> np.ndarray | None:
    """bool[height, width] of a bool array (resized, nearest) or a COCO RLE dict; None for None."""
    if mask is None:
        return None
    if isinstance(mask, Mapping):
        from paligemma_ft.data.masks import coco_mask_module  # noqa: PLC0415 - pycocotools, only for masks.

        rle = dict(mask)
        if isinstance(rle.get("counts"), str):
            rle["counts"] = rle["counts"].encode("ascii")
        mask = coco_mask_module().decode(rle)
    mask = np.asarray(mask).astype(bool)
    if mask.shape != (height, width):
        mask = (
            np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST))
            > 127
        )
    return mask


def draw_objects(
    image: np.ndarray | Image.Image,
    boxes: Sequence[Any],
    masks: Sequence[Any] | None = None,
    *,
    colour: tuple[int, int, int] | None = None,
    labels: bool = True,
    colours: dict[str, tuple[int, int, int]] | None = None,
    line_width: int | None = None,
    label_below: bool = False,
) -> Image.Image:
    """`image` with each box outlined (and its mask filled, half transparent) and labelled.

    Args:
      image: uint8[H, W, 3] or a PIL image (not modified).
      boxes: boxes with normalised coordinates.
      masks: optional, one per box (None where a box has no mask).
      colour: one colour for everything (galleries); default one palette colour per label.
      labels: write each box's label above it.
      colours: label -> colour, shared across calls so a label keeps its colour (filled in as labels appear).
      line_width: box outline width in pixels (default 1 % of the shorter side).
      label_below: write labels under the box instead of above it.
    """
    im = (image.copy() if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))).convert(
        "RGB"
    )
    colours = {} if colours is None else colours
    pick = lambda b: colour or colours.setdefault(label_of(b), PALETTE[len(colours) % len(PALETTE)])  # noqa: E731
    if masks is not None:
        pixels = np.asarray(im, np.float32)
        for box, mask in zip(boxes, masks):
            m = as_mask(mask, im.height, im.width)
            if m is not None and m.any():
                pixels[m] = (1 - MASK_ALPHA) * pixels[m] + MASK_ALPHA * np.asarray(pick(box), np.float32)
        im = Image.fromarray(pixels.round().astype(np.uint8))
    draw = ImageDraw.Draw(im)
    width = line_width or max(1, round(min(im.size) / 100))
    for box in boxes:
        c = pick(box)
        y0, x0, y1, x1 = coords(box)
        x0, y0, x1, y1 = round(x0 * im.width), round(y0 * im.height), round(x1 * im.width), round(y1 * im.height)
        draw.rectangle([x0, y0, x1, y1], outline=c, width=width)
        text = label_of(box)
        if labels and text:
            left, top, right, bottom = draw.textbbox((x0, y0), text)
            h = bottom - top + 2
            if label_below:
                top_y = y1 if y1 + h <= im.height else y1 - h  # Under the box if it fits.
            else:
                top_y = y0 - h if y0 - h >= 0 else y0  # Above the box if it fits.
            draw.rectangle([x0, top_y, x0 + (right - left) + 4, top_y + h], fill=c)
            draw.text((x0 + 2, top_y), text, fill=(255, 255, 255))
    return im


def draw_comparison(
    image: np.ndarray | Image.Image,
    boxes: Mapping[str, Sequence[Any]] | None,
    masks: Mapping[str, Sequence[Any]] | None = None,
    *,
    min_side: int = 0,
    labels: bool = True,
) -> Image.Image:
    """References (green, thick, labels above) and predictions (red, thin, labels below) on one image, so a box
    predicted exactly on its reference shows both; small images are first enlarged to `min_side`."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    im = im.convert("RGB")
    if min_side and min(im.size) < min_side:  # A 64 px image would hide its labels: enlarge, nearest.
        scale = min_side / min(im.size)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.NEAREST)
    thin = max(1, round(min(im.size) / 128))
    for key, c, width, below in (("references", REFERENCE, 3 * thin, False), ("prediction", PREDICTION, thin, True)):
        items = list((boxes or {}).get(key) or [])
        item_masks = list((masks or {}).get(key) or [])
        item_masks += [None] * (len(items) - len(item_masks))
        im = draw_objects(
            im, items, item_masks if masks else None, colour=c, labels=labels, line_width=width, label_below=below
        )
    return im
