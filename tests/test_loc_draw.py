"""Drawing localization outputs: boxes, labels and filled masks (shared by predict, the galleries and the app)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from paligemma_ft.commands import app_logic
from paligemma_ft.data import localization, shapes
from paligemma_ft.evaluate import draw, report, segmentation
from paligemma_ft.evaluate.detection import Box, parse_detections
from paligemma_ft.model import vqvae


def test_masks_are_filled_and_boxes_outlined_in_the_label_colour():
    image = np.full((40, 60, 3), 200, np.uint8)
    mask = np.zeros((40, 60), bool)
    mask[10:20, 10:30] = True
    box = Box("cat", 0.2, 0.1, 0.6, 0.6)
    out = np.asarray(draw.draw_objects(image, [box], [mask], labels=False)).astype(int)
    colour = np.array(draw.PALETTE[0])
    tinted = np.round((1 - draw.MASK_ALPHA) * 200 + draw.MASK_ALPHA * colour)
    assert (out[12, 15] == tinted).all() and (out[25, 15] == 200).all()  # Inside the mask / inside the box only.
    assert (out[16, 6] == colour).all()  # The box's left edge, x = round(0.1 * 60).
    rle = segmentation.rle(mask)  # The same mask as read back from a predictions JSONL.
    again = np.asarray(
        draw.draw_objects(image, [dict(label="cat", y0=0.2, x0=0.1, y1=0.6, x1=0.6)], [rle], labels=False)
    )
    np.testing.assert_array_equal(again, out)


def test_gallery_png_draws_references_and_predictions(tmp_path):
    ex = shapes.ShapesSource(2, task="detect", max_shapes=2, snap=8)[0]
    (ref,), _ = parse_detections(ex["suffix"])
    wrong = Box(ref.label, 0.0, 0.0, 0.2, 0.2)
    row = {"image": ex["image_path"], "prompt": ex["prefix"], "boxes": {"references": [ref], "prediction": [wrong]}}
    assert report.write_gallery_png(tmp_path / "g.png", [row], cell=128)
    sheet = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    greens = (sheet == draw.REFERENCE).all(-1).sum()
    reds = (sheet == draw.PREDICTION).all(-1).sum()
    assert greens > 100 and reds > 50  # Both drawn (with their label backgrounds).
    assert not report.write_gallery_png(tmp_path / "none.png", [{"image": str(tmp_path / "missing.png")}])


def test_app_draws_segment_masks_with_a_codec(tmp_path, monkeypatch):
    assert app_logic.build_prompt("segment", " circle ") == "segment circle"
    codec = vqvae.load_codec("random:1")
    image = np.full((64, 64, 3), 250, np.uint8)
    text = localization.loc_tokens((0.1, 0.1, 0.9, 0.9)) + localization.seg_tokens(range(16)) + " circle"
    boxes, _ = parse_detections(text)
    prediction = app_logic.Prediction(text, 0.0, tuple(boxes))
    with_masks = np.asarray(app_logic.draw_prediction(image, prediction, codec))
    boxes_only = np.asarray(app_logic.draw_prediction(image, prediction))
    (mask,) = segmentation.predicted_masks(boxes, 64, 64, codec)
    inner = np.zeros_like(mask)
    inner[20:55, 10:55] = True  # Away from the outline and the label.
    np.testing.assert_array_equal((with_masks != boxes_only).any(-1)[inner], mask[inner])
    monkeypatch.setenv("PALIGEMMA_FT_CODEC", str(tmp_path / "vae-oid.npz"))
    codec, note = app_logic.mask_codec()
    assert codec is None and "Masks are not drawn" in note and "vae-oid.npz" in note
