"""Detection outputs: parse `<loc>` strings into labelled boxes, IoU, COCO-style AP and mAP.

PaliGemma writes detections as `<locY0><locX0><locY1><locX1> label ; <loc...>x4 label ; ...` (reference 9):
four 4-digit tokens in the order y_min, x_min, y_max, x_max, each a bin in [0, 1023] of the coordinate
normalised to the image size. big_vision decodes a bin as N / 1023 and encodes a coordinate as round(v * 1023)
clipped to [0, 1023]; so do we (`loc_bins=1024` -> divisor 1023). Optional `<segNNN>` tokens after the four
locations (segmentation outputs) are kept in `Box.seg` for the mask metrics (`segmentation.py`) and ignored here.

AP follows COCO: per label, predictions are matched greedily to the unmatched ground truth box of the same label
with the highest IoU (a match needs IoU >= threshold), precision is made monotone and sampled at 101 recall
points (0, 0.01, ..., 1). Labels are compared lower-cased with whitespace collapsed. Only labels present in the
ground truth are averaged (COCO skips categories without ground truth, so boxes of labels absent from the ground
truth do not lower AP). Generated detections carry no confidence, so predictions
are ranked by their position in the output (the model's first box first), ties across images broken by image
order.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from paligemma_ft.evaluate.ids import check_same_ids

_SEGMENT = re.compile(r"((?:<loc\d{4}>){4})((?:<seg\d{3}>)*)(.*)", re.DOTALL)
_LOC = re.compile(r"<loc(\d{4})>")
_SEG = re.compile(r"<seg(\d{3})>")
COCO_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.5, 0.55, ..., 0.95
_RECALL_POINTS = np.linspace(0.0, 1.0, 101)


@dataclasses.dataclass(frozen=True)
class Box:
    """A labelled box; coordinates are fractions of the image height (y) and width (x), in [0, 1].

    `seg` holds the `<segNNN>` codes that followed the box (a mask needs exactly 16), or None.
    """

    label: str
    y0: float
    x0: float
    y1: float
    x1: float
    seg: tuple[int, ...] | None = None


def _parse(text: str, loc_bins: int, require_label: bool = True) -> tuple[list[Box], int]:
    """Returns (well-formed boxes, number of malformed `;`-separated segments); `require_label=False` accepts
    boxes without a label (referring expressions' outputs, as big_vision's RefCOCO format)."""
    if not text.strip():
        return [], 0  # Nothing detected is a valid answer; recall takes care of it.
    boxes, bad = [], 0
    for segment in text.split(";"):
        m = _SEGMENT.fullmatch(segment.strip())
        if m is None:
            bad += 1  # Garbage, a partial loc group, or text before the locations.
            continue
        label = " ".join(m.group(3).split())
        y0, x0, y1, x1 = (int(v) for v in _LOC.findall(m.group(1)))
        if (not label and require_label) or "<loc" in label or max(y0, x0, y1, x1) >= loc_bins or y1 <= y0 or x1 <= x0:
            bad += 1  # Missing label, another loc group glued on, a bin out of range, or an empty/inverted box.
            continue
        scale = float(loc_bins - 1)
        seg = tuple(int(v) for v in _SEG.findall(m.group(2))) or None
        boxes.append(Box(label, y0 / scale, x0 / scale, y1 / scale, x1 / scale, seg))
    return boxes, bad


def parse_detections(text: str, *, loc_bins: int = 1024, require_label: bool = True) -> tuple[list[Box], bool]:
    """Parses a `<loc>` detection string; never raises on malformed input.

    Args:
      text: decoded model output, e.g. `"<loc0100><loc0200><loc0500><loc0600> cat ; <loc...>x4 dog"`.
      loc_bins: number of location tokens (bins 0 .. loc_bins - 1; coordinates are bin / (loc_bins - 1)).
      require_label: a box without a label is malformed (False: allowed, its label is "").

    Returns:
      (boxes, ok): the well-formed boxes in output order, and whether every segment was well formed
      (an empty string is well formed: no detections). Malformed segments are dropped.
    """
    boxes, bad = _parse(text, loc_bins, require_label)
    return boxes, bad == 0


def encode_box(box: Box, *, loc_bins: int = 1024) -> str:
    """`<locY0><locX0><locY1><locX1> label`, each bin round(v * (loc_bins - 1)) clipped to the valid range."""
    scale = loc_bins - 1
    bins = [min(max(int(round(v * scale)), 0), scale) for v in (box.y0, box.x0, box.y1, box.x1)]
    locs = "".join(f"<loc{b:04d}>" for b in bins)
    return f"{locs} {box.label}" if box.label else locs


def encode_detections(boxes: Sequence[Box], *, loc_bins: int = 1024) -> str:
    """Several boxes in PaliGemma's format, joined by ` ; `."""
    return " ; ".join(encode_box(b, loc_bins=loc_bins) for b in boxes)


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (labels ignored); 0 when the union is empty."""
    ih = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    iw = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    inter = ih * iw
    union = (a.y1 - a.y0) * (a.x1 - a.x0) + (b.y1 - b.y0) * (b.x1 - b.x0) - inter
    return inter / union if union > 0 else 0.0


def _label(box: Box) -> str:
    return " ".join(box.label.lower().split())


def iou_matrix(preds: Sequence[Box], gts: Sequence[Box]) -> np.ndarray:
    """f64[len(preds), len(gts)] box IoUs."""
    return np.array([[iou(p, g) for g in gts] for p in preds], np.float64).reshape(len(preds), len(gts))


def _ap_one_label(
    label: str,
    preds: Sequence[Sequence[Box]],
    gts: Sequence[Sequence[Box]],
    ious: Sequence[np.ndarray],
    threshold: float,
) -> float:
    """COCO 101-point AP of one label; predictions ranked by (position in output, image index)."""
    gt = [[j for j, g in enumerate(boxes) if _label(g) == label] for boxes in gts]
    n_gt = sum(len(g) for g in gt)
    ranked = sorted((pos, img) for img, boxes in enumerate(preds) for pos, p in enumerate(boxes) if _label(p) == label)
    used: list[set[int]] = [set() for _ in gt]
    hits = []
    for pos, img in ranked:
        best, best_j = threshold, -1
        for j in gt[img]:  # COCO's greedy match: the highest IoU >= threshold among unmatched boxes (last on ties).
            overlap = ious[img][pos, j]
            if j not in used[img] and overlap >= best:
                best, best_j = overlap, j
        if best_j >= 0:
            used[img].add(best_j)
        hits.append(best_j >= 0)
    if not hits:
        return 0.0
    tp = np.cumsum(hits)
    recall = tp / n_gt
    precision = tp / np.arange(1, len(hits) + 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # Best precision at this recall or beyond.
    idx = np.searchsorted(recall, _RECALL_POINTS, side="left")
    return float(np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0).mean())


def average_precision(
    preds_per_image: Sequence[Sequence[Box]],
    gts_per_image: Sequence[Sequence[Box]],
    iou_threshold: float = 0.5,
    *,
    ious: Sequence[np.ndarray] | None = None,
) -> float:
    """Mean over ground-truth labels of the COCO 101-point AP at one IoU threshold; nan without ground truth.

    Args:
      preds_per_image: for each image, its predicted boxes in output order (the order is their rank).
      gts_per_image: for each image (same order), its ground-truth boxes.
      iou_threshold: minimum IoU of a true positive.
      ious: per image, f[n_pred, n_gt] overlaps to match with (default: box IoU; mask AP passes mask IoUs).
    """
    if len(preds_per_image) != len(gts_per_image):
        raise ValueError(
            f"average_precision: {len(preds_per_image)} prediction lists for {len(gts_per_image)} ground-truth lists"
        )
    labels = sorted({_label(g) for boxes in gts_per_image for g in boxes})
    if not labels:
        return float("nan")
    if ious is None:
        ious = [iou_matrix(p, g) for p, g in zip(preds_per_image, gts_per_image)]
    return float(np.mean([_ap_one_label(lab, preds_per_image, gts_per_image, ious, iou_threshold) for lab in labels]))


def _mean_best_iou(preds: Sequence[Box], gts: Sequence[Box]) -> float | None:
    """Per-example score: mean over ground-truth boxes of the best IoU with a same-label prediction."""
    if not gts:
        return None
    return float(np.mean([max([iou(p, g) for p in preds if _label(p) == _label(g)], default=0.0) for g in gts]))


def detection_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    loc_bins: int = 1024,
    require_label: bool = True,
) -> dict[str, Any]:
    """Detection metrics over a split.

    Args:
      predictions: id -> decoded output string.
      references: id -> target strings in the same format; the boxes of all of an id's strings are pooled (a
        detection example normally has one target string).
      loc_bins: number of location tokens.
      require_label: boxes without a label are malformed (False for referring-expression outputs).

    Returns:
      A dict with floats `ap50`, `ap75`, `map` (mean AP over IoU 0.5:0.05:0.95), `well_formed_rate` (the
      format-validity rate: fraction of outputs whose every segment parses), `empty_rate` (fraction of outputs
      that are empty: no object found), `mean_iou` (mean of the per-example IoU over examples with ground
      truth), ints `n`, `malformed_segments`, `per_example` (id -> {"iou": float | None, "well_formed",
      "n_pred", "n_ref"}), `boxes` (id -> {"prediction": [Box], "references": [Box]}) and `warnings`.
    """
    ids = check_same_ids(predictions, references, "detection_metrics")
    preds, gts, per, boxes, warnings = [], [], {}, {}, []
    bad_total = bad_refs = 0
    for k in ids:
        refs: Sequence[str] = [references[k]] if isinstance(references[k], str) else references[k]  # type: ignore[list-item]
        p, bad = _parse(predictions[k], loc_bins, require_label)
        g = []
        for r in refs:
            rb, rbad = _parse(r, loc_bins, require_label)
            g += rb
            bad_refs += rbad
        bad_total += bad
        preds.append(p)
        gts.append(g)
        per[k] = {"iou": _mean_best_iou(p, g), "well_formed": float(bad == 0), "n_pred": len(p), "n_ref": len(g)}
        boxes[k] = {"prediction": p, "references": g}
    if bad_refs:
        warnings.append(f"{bad_refs} reference segments are not well-formed detection targets and were ignored.")
    if not any(gts):
        warnings.append("No ground-truth boxes in the split: AP is undefined (nan).")
    overlaps = [iou_matrix(p, g) for p, g in zip(preds, gts)]
    aps = {t: average_precision(preds, gts, t, ious=overlaps) for t in COCO_THRESHOLDS}
    ious = [v["iou"] for v in per.values() if v["iou"] is not None]
    return {
        "ap50": aps[0.5],
        "ap75": aps[0.75],
        "map": float(np.mean(list(aps.values()))),
        "well_formed_rate": float(np.mean([v["well_formed"] for v in per.values()])),
        "empty_rate": float(np.mean([not predictions[k].strip() for k in ids])),
        "mean_iou": float(np.mean(ious)) if ious else float("nan"),
        "malformed_segments": bad_total,
        "n": len(ids),
        "per_example": per,
        "boxes": boxes,
        "warnings": warnings,
    }
