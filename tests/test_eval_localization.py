"""Localization metrics: box and mask AP cross-checked against pycocotools' COCOeval on the same boxes and masks,
segmentation mIoU with masks pasted at image resolution, referring-expression accuracy, validity and empty rates,
and the evaluators' files (predictions with RLE masks, HTML gallery, PNG contact sheet)."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from paligemma_ft.data import localization, masks, shapes
from paligemma_ft.data.pipeline import make_eval_batches
from paligemma_ft.evaluate import detection, make_evaluator, segmentation
from paligemma_ft.evaluate.detection import Box
from paligemma_ft.tokenizer import Tokenizer

LABELS = ("cat", "dog", "bird", "fish")  # "fish" is never in the ground truth.
CATEGORIES = LABELS + shapes.KINDS


def _random_split(seed: int, n_images: int = 12):
    """Ground truth and predictions in normalised coordinates: noisy copies (some far off), misses, extras."""
    rng = np.random.default_rng(seed)
    gts, preds = [], []
    for _ in range(n_images):
        g = []
        for _ in range(rng.integers(0, 6)):
            y0, x0 = rng.uniform(0, 0.7, 2)
            h, w = rng.uniform(0.05, 0.3, 2)
            g.append(Box(str(rng.choice(LABELS[:3])), y0, x0, y0 + h, x0 + w))
        p = []
        for b in g:
            if rng.random() < 0.8:  # Found, with noise of up to a third of its size.
                dy, dx = rng.normal(0, 0.35 * (b.y1 - b.y0)), rng.normal(0, 0.35 * (b.x1 - b.x0))
                label = b.label if rng.random() < 0.9 else str(rng.choice(LABELS))
                p.append(Box(label, max(b.y0 + dy, 0), max(b.x0 + dx, 0), min(b.y1 + dy, 1), min(b.x1 + dx, 1)))
        for _ in range(rng.integers(0, 3)):  # False positives, some of a label absent from the ground truth.
            y0, x0 = rng.uniform(0, 0.8, 2)
            p.append(Box(str(rng.choice(LABELS)), y0, x0, y0 + 0.1, x0 + 0.15))
        order = rng.permutation(len(p))  # The output order is the rank.
        preds.append([p[i] for i in order if p[i].y1 > p[i].y0 and p[i].x1 > p[i].x0])
        gts.append(g)
    return preds, gts


def _cocoeval(preds, gts, sizes, iou_type="bbox", pred_masks=None, gt_masks=None):
    """COCOeval's stats[0:3] (mAP, AP50, AP75) on the same objects, scores decreasing with the output position."""
    cats = {name: i + 1 for i, name in enumerate(CATEGORIES)}
    images, anns, dets = [], [], []
    for img, ((h, w), g, p) in enumerate(zip(sizes, gts, preds)):
        images.append({"id": img + 1, "width": w, "height": h})
        for j, b in enumerate(g):
            box = [b.x0 * w, b.y0 * h, (b.x1 - b.x0) * w, (b.y1 - b.y0) * h]
            ann = {"id": len(anns) + 1, "image_id": img + 1, "category_id": cats[b.label], "bbox": box}
            ann.update(iscrowd=0, area=box[2] * box[3])
            if gt_masks is not None:
                ann["segmentation"] = segmentation.rle(gt_masks[img][j])
                ann["area"] = float(gt_masks[img][j].sum())
            anns.append(ann)
        for pos, b in enumerate(p):
            det = {"image_id": img + 1, "category_id": cats[b.label], "score": 1.0 - pos / 1000}
            det["bbox"] = [b.x0 * w, b.y0 * h, (b.x1 - b.x0) * w, (b.y1 - b.y0) * h]
            if pred_masks is not None:
                det["segmentation"] = segmentation.rle(pred_masks[img][pos])
            dets.append(det)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress.
        gt = COCO()
        gt.dataset = {
            "images": images,
            "annotations": anns,
            "categories": [{"id": v, "name": k} for k, v in cats.items()],
        }
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[:3]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_box_ap_equals_cocoeval(seed):
    """Our AP ranks boxes by output position, ties across images by image order; COCOeval ranks by score, its ties
    by image order too (stable sort). Scores 1 - position / 1000 make the two rankings one, so the numbers agree."""
    preds, gts = _random_split(seed)
    sizes = [(480, 640)] * len(gts)
    ours = [
        np.mean([detection.average_precision(preds, gts, t) for t in detection.COCO_THRESHOLDS]),
        detection.average_precision(preds, gts, 0.5),
        detection.average_precision(preds, gts, 0.75),
    ]
    theirs = _cocoeval(preds, gts, sizes)
    assert 0.05 < theirs[1] < 0.95  # A split where AP is neither trivial nor zero.
    np.testing.assert_allclose(ours, theirs, atol=1e-9)


def test_detection_metrics_reports_validity_and_empty_rates():
    loc = localization.loc_tokens
    predictions = {"a": f"{loc((0, 0, 0.5, 0.5))} cat", "b": "", "c": "garbage", "d": f"{loc((0, 0, 1, 1))} dog ;"}
    references = {k: [f"{loc((0, 0, 0.5, 0.5))} cat"] for k in predictions}
    out = detection.detection_metrics(predictions, references)
    assert out["well_formed_rate"] == 0.5 and out["empty_rate"] == 0.25  # "" parses (nothing found); 2 do not.
    # One of four references found, ranked first: precision 1 up to recall 1/4, i.e. at 26 of COCO's 101 points.
    assert out["ap50"] == pytest.approx(26 / 101)


class BoxFillCodec:
    """Decodes every code sequence to an all-positive 64 x 64 mask: a predicted mask is then its whole box."""

    def decode(self, indices):
        return np.ones((len(indices), 64, 64), np.float32)


def _segmentation_split(seed: int):
    """Shapes scenes: ground-truth objects with exact masks; predictions = noisy boxes with 16 codes."""
    preds, objects, sizes, gt_masks = {}, {}, {}, {}
    rng = np.random.default_rng(seed)
    for i in range(10):
        s = shapes.make_scene(seed, i, (96, 64))
        kind = s.shapes[0].kind
        ex = shapes.scene_objects(s, kind)
        objects[i], sizes[i] = ex["objects"], ex["image_size"]
        gt_masks[i] = [masks.read_mask(o.mask, 64, 96) for o in ex["objects"]]
        parts = []
        for o in ex["objects"]:
            if rng.random() < 0.85:
                box = np.clip(np.array(o.box) + rng.normal(0, 0.03, 4), 0, 1)
                parts.append(
                    localization.loc_tokens(box) + localization.seg_tokens(rng.integers(0, 128, 16)) + " " + kind
                )
        preds[i] = " ; ".join(parts)
    refs = {i: [" ; ".join(localization.loc_tokens(o.box) + " " + o.label for o in objects[i])] for i in objects}
    return preds, refs, objects, sizes, gt_masks


def test_mask_metrics_equal_cocoeval_and_paste_like_big_vision():
    preds, refs, objects, sizes, gt_masks = _segmentation_split(4)
    out = segmentation.segmentation_metrics(preds, refs, objects, sizes, BoxFillCodec())
    ids = sorted(preds)
    p_boxes = [out["boxes"][i]["prediction"] for i in ids]
    p_masks = [
        [masks.paste_mask(np.ones((64, 64)), (b.y0, b.x0, b.y1, b.x1), 64, 96) for b in p_boxes[k]]
        for k in range(len(ids))
    ]
    for k, i in enumerate(ids):  # The predicted masks, as RLE: each box's pixels, int(v * size) as big_vision.
        assert [masks.read_mask({"rle": r}, 64, 96).sum() for r in out["masks"][i]["prediction"]] == [
            m.sum() for m in p_masks[k]
        ]
    g_boxes = [[Box(o.label, *o.box) for o in objects[i]] for i in ids]
    theirs = _cocoeval(p_boxes, g_boxes, [sizes[i] for i in ids], "segm", p_masks, [gt_masks[i] for i in ids])
    np.testing.assert_allclose([out["mask_map"], out["mask_ap50"], out["mask_ap75"]], theirs, atol=1e-9)
    # mIoU: per ground-truth object, the best same-label predicted mask (a square filling its box scores ~1).
    best = []
    for k, i in enumerate(ids):
        for g in gt_masks[i]:
            best.append(max([masks.mask_iou(p, g) for p in p_masks[k]], default=0.0))
    assert out["miou"] == pytest.approx(np.mean(best)) and 0 < out["miou"] < 1
    assert out["invalid_masks"] == 0 and out["well_formed_rate"] == 1.0


def test_predicted_mask_without_16_codes_is_empty():
    box = Box("a", 0.1, 0.1, 0.5, 0.5, seg=(1, 2, 3))
    (m,) = segmentation.predicted_masks([box], 32, 32, BoxFillCodec())
    assert not m.any()
    objects = {0: [localization.Obj("a", (0.1, 0.1, 0.5, 0.5), {"array": np.ones((32, 32), bool)})]}
    text = localization.loc_tokens((0.1, 0.1, 0.5, 0.5)) + "<seg001><seg002> a"
    out = segmentation.segmentation_metrics({0: text}, {0: [text]}, objects, {0: (32, 32)}, BoxFillCodec())
    assert out["invalid_masks"] == 1 and out["miou"] == 0.0 and out["ap50"] == 1.0  # The box is still right.


def test_refexp_accuracy_takes_the_first_box():
    loc = localization.loc_tokens
    target = loc((0.1, 0.1, 0.5, 0.5))
    predictions = {
        "hit": f"{loc((0.1, 0.1, 0.5, 0.55))} ; {loc((0.6, 0.6, 0.9, 0.9))}",
        "second": f"{loc((0.6, 0.6, 0.9, 0.9))} ; {target}",  # Right box second: a miss, as big_vision's boxacc.
        "close": loc((0.1, 0.1, 0.45, 0.4)),  # IoU 0.6: counts at 0.5, not at 0.75.
        "empty": "",
        "junk": "the cat",
    }
    out = segmentation.refexp_metrics(predictions, {k: [target] for k in predictions})
    assert out["acc50"] == pytest.approx(2 / 5) and out["acc75"] == pytest.approx(1 / 5)
    assert out["per_example"]["close"]["iou"] == pytest.approx(0.35 * 0.3 / 0.16, abs=0.01)
    assert out["well_formed_rate"] == pytest.approx(4 / 5) and out["empty_rate"] == pytest.approx(1 / 5)


class Answers:
    """A predictor that answers from a table of id -> text (the evaluators' Predictor protocol)."""

    def __init__(self, answers):
        self.answers = answers

    def generate(self, batch):
        return [self.answers.get(m.get("id"), "") if m else "" for m in batch["_meta"]]


def test_segmentation_and_refexp_evaluators_write_their_files(tmp_path):
    data = dict(source="shapes", n=6, seed=0, task="segment", image_size=64, codec="random:0", max_shapes=2)
    tok = Tokenizer.from_spec("builtin:tiny")
    input_cfg = {"data": data, "res": 64, "text_len": 8, "num_workers": 0}
    examples = [shapes.ShapesSource(6, task="segment", codec="random:0", max_shapes=2)[i] for i in range(6)]
    answers = {ex["id"]: ex["suffix"] for ex in examples}  # Perfect boxes, the reference codes.
    answers[examples[0]["id"]] = "<loc0001> nothing"  # One malformed output.
    seg = make_evaluator("seg", {"type": "segmentation", "codec": "random:0", "data": data})
    metrics = seg.run(Answers(answers), make_eval_batches(data, input_cfg, tok, 4), tmp_path, 5)
    assert metrics["n"] == 6 and metrics["well_formed_rate"] == pytest.approx(5 / 6)
    assert {"miou", "mask_map", "mask_ap50", "ap50", "empty_rate", "invalid_masks"} <= set(metrics)
    rows = [json.loads(line) for line in (tmp_path / "predictions_seg_step5.jsonl").read_text().splitlines()]
    assert all(len(r["masks"]["references"]) == r["score"]["n_ref"] for r in rows)
    assert rows[1]["masks"]["prediction"][0]["size"] == [64, 64]  # COCO RLE at image resolution.
    assert (tmp_path / "gallery_seg_step5.png").stat().st_size > 1000
    assert (tmp_path / "gallery_seg_step5.html").read_text().count("data:image/jpeg") == 6  # Generated images drawn.

    ref = make_evaluator("ref", {"type": "refexp", "codec": "random:0", "constrain": "refseg", "data": data})
    metrics = ref.run(Answers(answers), make_eval_batches(data, input_cfg, tok, 4), tmp_path, 5)
    assert metrics["acc50"] == pytest.approx(5 / 6) and "miou" in metrics
