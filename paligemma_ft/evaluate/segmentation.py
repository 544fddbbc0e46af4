"""Segmentation and referring-expression metrics on PaliGemma outputs (`<loc>`x4 `<seg>`x16 [label] ; ...).

Masks are scored as big_vision's segmentation evaluator does (reference 9): the 16 codes of each predicted object
go through the VQ-VAE decoder (`paligemma_ft.model.vqvae`), the 64 x 64 result is resized bilinearly into the
predicted box at the image's resolution and thresholded at 0 (`data.masks.paste_mask`), and compared with the
ground-truth mask at full resolution. A predicted object without exactly 16 valid codes has an empty mask.

    segmentation_metrics   the detection metrics (box AP, validity, empty outputs) plus `miou` (mean over
                           ground-truth objects of the best same-label mask IoU), `mask_ap50`, `mask_ap75` and
                           `mask_map` (COCO AP with mask IoU, ranked like box AP), `invalid_masks`
    refexp_metrics         one target per example: the FIRST predicted box (big_vision's `boxacc`) scored by IoU:
                           `acc50` (accuracy at IoU 0.5), `acc75`, `mean_iou`, validity and empty rates, and with
                           masks big_vision's `miou` (the first predicted mask against the target's)

Ground-truth masks come from the examples' `objects` (see `data/localization.py`), with `image_size`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from paligemma_ft.data import masks as masks_lib
from paligemma_ft.evaluate import detection
from paligemma_ft.evaluate.ids import check_same_ids

NUM_SEG_TOKENS = 16
NUM_CODES = 128


def _codes_ok(box: detection.Box) -> bool:
    return box.seg is not None and len(box.seg) == NUM_SEG_TOKENS and all(0 <= c < NUM_CODES for c in box.seg)


def predicted_masks(boxes: Sequence[detection.Box], height: int, width: int, codec: Any) -> list[np.ndarray]:
    """bool[height, width] per predicted object: its decoded mask pasted into its box (empty without 16 codes)."""
    valid = [i for i, b in enumerate(boxes) if _codes_ok(b)]
    out = [np.zeros((height, width), bool) for _ in boxes]
    if valid:
        decoded = codec.decode(np.array([boxes[i].seg for i in valid], np.int32))
        for i, m64 in zip(valid, decoded):
            b = boxes[i]
            out[i] = masks_lib.paste_mask(m64, (b.y0, b.x0, b.y1, b.x1), height, width)
    return out


def rle(mask: np.ndarray) -> dict[str, Any]:
    """A bool[H, W] mask as COCO's compressed RLE with a text `counts` (JSON-ready; `data.masks.read_mask` reads it)."""
    out = masks_lib.coco_mask_module().encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in out["size"]], "counts": out["counts"].decode("ascii")}


def _gt_masks(objects: Sequence[Any] | None, size: Sequence[int] | None) -> list[np.ndarray] | None:
    if not objects or size is None or any(getattr(o, "mask", None) is None for o in objects):
        return None
    h, w = int(size[0]), int(size[1])
    return [masks_lib.read_mask(o.mask, h, w) for o in objects]


def _gt_boxes(objects: Sequence[Any]) -> list[detection.Box]:
    return [detection.Box(o.label or "", *o.box) for o in objects]


def mask_iou_matrix(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> np.ndarray:
    """f64[len(preds), len(gts)] mask IoUs."""
    return np.array([[masks_lib.mask_iou(p, g) for g in gts] for p in preds], np.float64).reshape(len(preds), len(gts))


def segmentation_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    objects: Mapping[Hashable, Sequence[Any] | None],
    image_sizes: Mapping[Hashable, Sequence[int] | None],
    codec: Any,
    *,
    loc_bins: int = 1024,
    require_label: bool = True,
) -> dict[str, Any]:
    """Box and mask metrics over a split (see the module docstring).

    Args:
      predictions: id -> decoded output.
      references: id -> target strings (box metrics; their `<seg>` codes are not used for masks).
      objects: id -> the ground-truth objects (`localization.Obj` with a mask spec), listed order.
      image_sizes: id -> (height, width) of the original image.
      codec: a `MaskCodec` (decodes the predicted codes).
      loc_bins, require_label: as `detection.detection_metrics`.

    Returns:
      The detection metrics plus `miou`, `mask_ap50`, `mask_ap75`, `mask_map`, `invalid_masks` (predicted objects
      without 16 valid codes), `per_example[id]["mask_iou"]` and `masks` (id -> {"prediction", "references"}: bool
      masks as COCO RLE, for drawing).
    """
    out = detection.detection_metrics(predictions, references, loc_bins=loc_bins, require_label=require_label)
    ids = check_same_ids(predictions, objects, "segmentation_metrics")
    preds, gts, ious, best, masks = [], [], [], [], {}
    invalid = missing = 0
    for k in ids:
        gt = _gt_masks(objects[k], image_sizes.get(k))
        if gt is None and objects[k]:
            missing += 1
            continue
        size = image_sizes.get(k) or (1, 1)  # No size only for an example without objects: nothing to paste.
        h, w = int(size[0]), int(size[1])
        p_boxes = out["boxes"][k]["prediction"]
        p_masks = predicted_masks(p_boxes, h, w, codec)
        invalid += sum(not _codes_ok(b) for b in p_boxes)
        g_boxes = _gt_boxes(objects[k] or [])
        m = mask_iou_matrix(p_masks, gt or [])
        preds.append(p_boxes)
        gts.append(g_boxes)
        ious.append(m)
        per_gt = [
            max([m[i, j] for i, p in enumerate(p_boxes) if detection._label(p) == detection._label(g)], default=0.0)
            for j, g in enumerate(g_boxes)
        ]
        best += per_gt
        out["per_example"][k]["mask_iou"] = float(np.mean(per_gt)) if per_gt else None
        # Kept as RLE: full-resolution masks of a whole split would not fit in memory.
        masks[k] = {"prediction": [rle(x) for x in p_masks], "references": [rle(x) for x in gt or []]}
    aps = {t: detection.average_precision(preds, gts, t, ious=ious) for t in detection.COCO_THRESHOLDS}
    if missing:
        out["warnings"].append(f"{missing} examples have objects without masks: left out of the mask metrics.")
    out.update(
        miou=float(np.mean(best)) if best else float("nan"),
        mask_ap50=aps[0.5],
        mask_ap75=aps[0.75],
        mask_map=float(np.mean(list(aps.values()))),
        invalid_masks=invalid,
        masks=masks,
    )
    return out


def refexp_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    objects: Mapping[Hashable, Sequence[Any] | None] | None = None,
    image_sizes: Mapping[Hashable, Sequence[int] | None] | None = None,
    codec: Any = None,
    loc_bins: int = 1024,
) -> dict[str, Any]:
    """Referring-expression accuracy: the first predicted box against the first reference box.

    Args:
      predictions: id -> decoded output (labels optional).
      references: id -> target strings; the first box of the first string is the target.
      objects, image_sizes, codec: with all three, masks are scored too (`miou`, big_vision's mean IoU of the
        first predicted mask with the target's mask; an invalid prediction scores 0).

    Returns:
      `acc50`, `acc75`, `mean_iou`, `well_formed_rate`, `empty_rate`, `n`, optionally `miou`; `per_example`
      (id -> {"iou", "well_formed", "mask_iou"?}), `boxes` and `masks` (for drawing) and `warnings`.
    """
    ids = check_same_ids(predictions, references, "refexp_metrics")
    per: dict[Hashable, dict[str, Any]] = {}
    boxes: dict[Hashable, Any] = {}
    masks: dict[Hashable, Any] = {}
    warnings: list[str] = []
    for k in ids:
        refs: list[str] = [references[k]] if isinstance(references[k], str) else list(references[k])  # type: ignore[list-item]
        target = next(
            (b for r in refs for b in detection.parse_detections(r, loc_bins=loc_bins, require_label=False)[0]), None
        )
        pred, ok = detection.parse_detections(predictions[k], loc_bins=loc_bins, require_label=False)
        first = pred[:1]
        score = detection.iou(first[0], target) if first and target else 0.0
        per[k] = {"iou": score if target else None, "well_formed": float(ok)}
        boxes[k] = {"prediction": first, "references": [target] if target else []}
        if codec is not None and objects is not None and image_sizes is not None:
            gt = _gt_masks((objects.get(k) or [])[:1], image_sizes.get(k))
            if gt is not None:
                h, w = (int(v) for v in image_sizes[k] or (1, 1))
                p = predicted_masks(first, h, w, codec) if first else [np.zeros((h, w), bool)]
                per[k]["mask_iou"] = masks_lib.mask_iou(p[0], gt[0])
                masks[k] = {"prediction": [rle(x) for x in p[:1]] if first else [], "references": [rle(gt[0])]}
    scored = [v["iou"] for v in per.values() if v["iou"] is not None]
    if len(scored) < len(ids):
        warnings.append(f"{len(ids) - len(scored)} examples have no reference box and are not scored.")
    out: dict[str, Any] = {
        "acc50": float(np.mean([s >= 0.5 for s in scored])) if scored else float("nan"),
        "acc75": float(np.mean([s >= 0.75 for s in scored])) if scored else float("nan"),
        "mean_iou": float(np.mean(scored)) if scored else float("nan"),
        "well_formed_rate": float(np.mean([v["well_formed"] for v in per.values()])),
        "empty_rate": float(np.mean([not predictions[k].strip() for k in ids])),
        "n": len(ids),
        "per_example": per,
        "boxes": boxes,
        "masks": masks,
        "warnings": warnings,
    }
    mask_scores = [v["mask_iou"] for v in per.values() if "mask_iou" in v]
    if mask_scores:
        out["miou"] = float(np.mean(mask_scores))
    return out
