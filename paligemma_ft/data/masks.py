"""Instance masks: read them (COCO polygons and RLE through pycocotools, PNG files, arrays), crop them for the VQ-VAE
codec, and paste decoded 64 x 64 masks back into their box at image resolution.

Both directions follow big_vision (reference 9):
  * encoding (`refcoco_mask2str`): the box in pixels is `round(v * H or W)`, the mask is cropped to it, resized to
    64 x 64 (bilinear with antialias) with values in [0, 1];
  * decoding (the segmentation evaluator): the box is `int(bin / 1023 * H or W)`, the decoded 64 x 64 mask is
    resized bilinearly (PIL) to the box size and thresholded at 0, then pasted into an empty image-sized mask.

A mask spec is how an annotation refers to a mask without holding its pixels (so sources and evaluation metadata
stay small): `{"polygons": [[x, y, ...], ...]}` or `{"rle": {"size": [H, W], "counts": ...}}` (COCO), `{"png": path}`
(nonzero pixels are the object) or `{"array": bool[H, W]}`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from paligemma_ft.data import images
from paligemma_ft.data.transforms import BadExample

CODEC_SIZE = 64  # The VQ-VAE's mask side.


def coco_mask_module() -> Any:
    """pycocotools.mask (an ImportError naming the extra to install when it is missing)."""
    try:
        import pycocotools.mask as coco_mask  # noqa: PLC0415 - only datasets with masks need it.
    except ImportError:
        raise ImportError("masks need pycocotools: pip install 'paligemma-ft[segmentation]'") from None
    return coco_mask


def check_polygons(polygons: Any) -> list[list[float]]:
    """COCO polygons `[[x0, y0, x1, y1, ...], ...]` as float lists.

    Raises:
      BadExample "bad_mask": not a list of flat coordinate lists of even length >= 6 with finite numbers.
    """
    if not isinstance(polygons, list) or not polygons:
        raise BadExample("bad_mask", "segmentation polygons must be a non-empty list of [x0, y0, x1, y1, ...] lists")
    out = []
    for k, poly in enumerate(polygons):
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
            raise BadExample("bad_mask", f"polygon #{k} must list at least 3 (x, y) points, got {poly!r:.80}")
        try:
            values = [float(v) for v in poly]
        except (TypeError, ValueError):
            raise BadExample("bad_mask", f"polygon #{k} holds a value that is not a number") from None
        if not all(np.isfinite(values)):
            raise BadExample("bad_mask", f"polygon #{k} holds a NaN or infinite coordinate")
        out.append(values)
    return out


def check_rle(rle: Any, height: int, width: int) -> dict:
    """A COCO RLE dict (`counts` as a list or a compressed string) whose `size` is the image's.

    Raises:
      BadExample "bad_mask": not an RLE dict, or its size differs from the image's.
    """
    if not isinstance(rle, Mapping) or "counts" not in rle or "size" not in rle:
        raise BadExample("bad_mask", "RLE segmentation must be a dict with 'size' and 'counts'")
    size = rle["size"]
    if not isinstance(size, list) or len(size) != 2 or [int(s) for s in size] != [height, width]:
        raise BadExample("bad_mask", f"RLE size {size!r} differs from the image's [height, width] [{height}, {width}]")
    counts = rle["counts"]
    if not isinstance(counts, (list, str, bytes)):
        raise BadExample("bad_mask", f"RLE counts must be a list or a string, got {type(counts).__name__}")
    if isinstance(counts, list) and sum(int(c) for c in counts) != height * width:
        raise BadExample("bad_mask", f"RLE counts add up to {sum(counts)} pixels, not the image's {height * width}")
    return dict(rle)


def read_mask(spec: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    """The bool[height, width] mask of a spec (see the module docstring).

    Raises:
      BadExample "bad_mask": unreadable PNG, a mask whose size differs from the image's, a bad polygon/RLE.
    """
    if "array" in spec:
        mask = np.asarray(spec["array"]).astype(bool)
    elif "png" in spec:
        mask = _read_png(spec["png"])
    elif "polygons" in spec:
        cm = coco_mask_module()
        rles = cm.frPyObjects(check_polygons(spec["polygons"]), height, width)
        mask = cm.decode(cm.merge(rles)).astype(bool)
    elif "rle" in spec:
        cm = coco_mask_module()
        rle = check_rle(spec["rle"], height, width)
        if isinstance(rle["counts"], list):  # Uncompressed RLE: pycocotools compresses it first.
            rle = cm.frPyObjects(rle, height, width)
        try:
            mask = cm.decode(rle).astype(bool)
        except Exception as e:  # noqa: BLE001 - pycocotools raises plain exceptions on corrupt counts.
            raise BadExample("bad_mask", f"RLE cannot be decoded: {type(e).__name__}: {e}") from None
    else:
        raise BadExample("bad_mask", f"unknown mask spec with keys {sorted(spec)}")
    if mask.shape != (height, width):
        raise BadExample("bad_mask", f"mask is {mask.shape[1]}x{mask.shape[0]} pixels, the image {width}x{height}")
    return mask


def _read_png(path: str | os.PathLike) -> np.ndarray:
    try:  # Regular files under the size cap only (a named pipe or /dev/zero must not hang or fill memory).
        data = images.read_image_file(path)
    except BadExample as e:
        raise BadExample("bad_mask", f"mask file {path}: {e.detail}") from None
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:  # PNG masks only: no other decoder runs.
            im.load()
            values = np.asarray(im.convert("L") if im.mode not in ("1", "L", "I", "I;16") else im)
    except Exception as e:  # noqa: BLE001 - PIL raises many types.
        raise BadExample("bad_mask", f"mask file {path} is not a readable image: {type(e).__name__}") from None
    return values > 0


def pixel_box(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) in pixels of a normalised box, rounded as big_vision's encoder does."""
    y0, x0, y1, x1 = box
    return round(height * y0), round(width * x0), round(height * y1), round(width * x1)


def codec_input(mask: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """The codec's input for one object: `mask` cropped to `box` (normalised y0, x0, y1, x1), f32[64, 64] in [0, 1].

    Raises:
      BadExample "degenerate_box": the box covers no whole pixel of the mask.
    """
    h, w = mask.shape
    y0, x0, y1, x1 = pixel_box(box, h, w)
    crop = mask[y0:y1, x0:x1].astype(np.float32)
    if crop.size == 0:
        raise BadExample("degenerate_box", f"box {tuple(box)} covers no pixel of the {w}x{h} mask")
    # PIL's bilinear filter widens with the scale when shrinking: tf.image.resize(antialias=True), as big_vision.
    resized = Image.fromarray(crop, mode="F").resize((CODEC_SIZE, CODEC_SIZE), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, np.float32), 0.0, 1.0)


def paste_mask(mask64: np.ndarray, box: Sequence[float], height: int, width: int) -> np.ndarray:
    """bool[height, width]: a decoded f32[64, 64] mask (about [-1, 1]) resized into `box`, as big_vision's evaluator.

    The box is normalised (y0, x0, y1, x1); pixels are `int(v * size)`; an empty box gives an empty mask.
    """
    out = np.zeros((height, width), bool)
    y0, x0, y1, x1 = (int(box[0] * height), int(box[1] * width), int(box[2] * height), int(box[3] * width))
    y0, x0 = max(y0, 0), max(x0, 0)
    y1, x1 = min(y1, height), min(x1, width)
    if y1 <= y0 or x1 <= x0:
        return out
    resized = Image.fromarray(np.asarray(mask64, np.float32), mode="F").resize(
        (x1 - x0, y1 - y0), Image.Resampling.BILINEAR
    )
    out[y0:y1, x0:x1] = np.asarray(resized) > 0.0
    return out


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks of one shape; 0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0
