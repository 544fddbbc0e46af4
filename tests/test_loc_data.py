"""Boxes and masks from annotations to PaliGemma's localization text: the round trip, the three annotation sources,
object orders (random per epoch, resumable), masks through a codec, and every bad input named with its place."""

from __future__ import annotations

import json
import pathlib

import hypothesis.strategies as st
import loc_fixtures as fx
import numpy as np
import pytest
from hypothesis import given, settings

from paligemma_ft.config import load_config
from paligemma_ft.data import BadExample, localization, make_train_iter, masks, sources
from paligemma_ft.data.pipeline import make_eval_batches
from paligemma_ft.evaluate.detection import parse_detections
from paligemma_ft.tokenizer import Tokenizer

BIN = 1 / 1023
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


# --- box -> tokens -> box -------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.integers(1, 4000),
    st.integers(1, 4000),
    st.tuples(*[st.floats(0, 1, allow_nan=False)] * 4),
    st.sampled_from(["xyxy", "xywh"]),
    st.sampled_from(["pixel", "normalized"]),
)
def test_box_tokens_box_within_one_bin(width, height, corners, fmt, coords):
    # A valid box built from two sorted pairs (at least 2 bins apart, so it is never thinner than a bin).
    a, b = sorted(corners[:2])
    c, d = sorted(corners[2:])
    x0, x1 = a * 0.99, a * 0.99 + max(b - a * 0.99, 2.1 * BIN) * 0.99
    y0, y1 = c * 0.99, c * 0.99 + max(d - c * 0.99, 2.1 * BIN) * 0.99
    scale = (width, height) if coords == "pixel" else (1, 1)
    px = [x0 * scale[0], y0 * scale[1], x1 * scale[0], y1 * scale[1]]
    values = px if fmt == "xyxy" else [px[0], px[1], px[2] - px[0], px[3] - px[1]]
    box = localization.normalise_box(values, fmt, coords, width, height)
    text = localization.object_text(localization.loc_tokens(box), "thing")
    (back,), ok = parse_detections(text)
    assert ok and back.label == "thing"
    for got, want in zip((back.y0, back.x0, back.y1, back.x1), (y0, x0, y1, x1)):
        assert abs(got - want) <= 0.5 * BIN + 1e-9  # Within half a bin: round(v * 1023) / 1023.


def test_loc_tokens_are_big_visions():
    assert localization.loc_tokens((0.0, 0.5, 1.0, 0.2501)) == "<loc0000><loc0512><loc1023><loc0256>"
    assert localization.seg_tokens([0, 7, 127]) == "<seg000><seg007><seg127>"
    assert localization.prompt("detect", ["cat", None, "dog", "cat"]) == "detect cat ; dog"


# --- The sources ----------------------------------------------------------------------------------------------


def _objects_text(s, width=96, height=64, kinds=None):
    parts = []
    for shape in s.shapes:
        if kinds is None or shape.kind in kinds:
            x0, y0, x1, y1 = shape.box
            parts.append(localization.loc_tokens((y0 / height, x0 / width, y1 / height, x1 / width)) + " " + shape.kind)
    return " ; ".join(parts)


def test_coco_instances_source(tmp_path):
    path = fx.write_coco(tmp_path, 4)
    data = {"source": "coco_instances", "annotations": str(path), "image_dir": str(tmp_path / "train2017")}
    src = sources.make_source(data)
    assert len(src) == 4 and not src.skipped
    for i in range(4):
        ex = src[i]
        _, s, _ = fx.scene(i)
        assert ex["suffix"] == _objects_text(s) == ex["references"][0]
        assert ex["prefix"] == localization.prompt("detect", [sh.kind for sh in s.shapes])
        assert ex["image_size"] == (64, 96) and ex["id"] == str(1000 + i)
        assert [o.label for o in ex["objects"]] == [sh.kind for sh in s.shapes]
        # The annotation's mask is the shape's: exact from RLE; from a polygon, up to how pycocotools and PIL
        # rasterise edges (a few pixels of these small shapes).
        for obj, mask in zip(ex["objects"], fx.scene(i)[2]):
            got = masks.read_mask(obj.mask, 64, 96)
            assert masks.mask_iou(got, mask) == 1.0 if obj.label == "circle" else masks.mask_iou(got, mask) > 0.6
    every = sources.make_source({**data, "prompt_labels": "all"})[0]
    assert every["prefix"] == "detect circle ; square ; triangle"


def test_coco_images_without_objects_and_crowds(tmp_path):
    path = fx.write_coco(tmp_path, 3)
    raw = json.loads(path.read_text())
    raw["annotations"] = [a for a in raw["annotations"] if a["image_id"] != 1001]  # Image 1 has no objects.
    raw["annotations"][0]["iscrowd"] = 1  # A crowd region is neither a target nor an error.
    path.write_text(json.dumps(raw))
    data = {"source": "coco_instances", "annotations": str(path), "image_dir": str(tmp_path / "train2017")}
    train = sources.make_source(data)
    assert [train[i]["id"] for i in range(len(train))] == ["1000", "1002"] and not train.skipped
    assert len(train[0]["objects"]) == len(fx.scene(0)[1].shapes) - 1
    evaluation = sources.make_source(data, mode="eval")
    assert [evaluation[i]["id"] for i in range(len(evaluation))] == ["1000", "1001", "1002"]
    assert evaluation[1]["references"] == [""] and evaluation[1]["prefix"] == "detect"


@pytest.mark.parametrize("coords", ["pixel", "normalized"])
def test_jsonl_boxes_source(tmp_path, coords):
    path = fx.write_jsonl(tmp_path, "train.jsonl", fx.jsonl_rows(3, coords=coords))
    src = sources.make_source({"source": "jsonl_boxes", "path": str(path), "coords": coords})
    assert len(src) == 3
    for i in range(3):
        assert src[i]["suffix"] == _objects_text(fx.scene(i)[1]) and src[i]["line"] == i + 1


def test_jsonl_xywh_and_referring_expressions(tmp_path):
    rows = fx.jsonl_rows(2, refexp=True)
    for row in rows:
        x0, y0, x1, y1 = row["boxes"][0].pop("xyxy")
        row["boxes"][0]["xywh"] = [x0, y0, x1 - x0, y1 - y0]
    path = fx.write_jsonl(tmp_path, "val.jsonl", rows)
    ex = sources.make_source({"source": "jsonl_boxes", "path": str(path), "coords": "pixel"})[0]
    s = fx.scene(0)[1]
    assert ex["prefix"] == f"the {s.shapes[0].colour} {s.shapes[0].kind}"  # The row's sentence.
    assert ex["suffix"] == _objects_text(s).split(" ; ")[0].rsplit(" ", 1)[0]  # No label: big_vision's RefCOCO.


def test_voc_source(tmp_path):
    folder = fx.write_voc(tmp_path, 3)
    src = sources.make_source({"source": "voc", "annotations": str(folder), "image_dir": str(tmp_path / "JPEGImages")})
    assert len(src) == 3 and src[2]["suffix"] == _objects_text(fx.scene(2)[1])
    assert src.location(0) == (str(folder / "0.xml"), None)


def test_orders(tmp_path):
    rows = [
        {
            "image": "images/0.png",
            "boxes": [{"label": "a", "xyxy": [0, 0, 10, 10]}, {"label": "b", "xyxy": [0, 0, 50, 40]}],
        }
    ]
    path = fx.write_jsonl(tmp_path, "t.jsonl", rows)
    data = {"source": "jsonl_boxes", "path": str(path), "coords": "pixel"}
    listed = sources.make_source(data)[0]
    area = sources.make_source({**data, "order": "area"})[0]
    assert listed["suffix"].split(" ; ")[0].endswith(" a") and area["suffix"].split(" ; ")[0].endswith(" b")
    assert (listed["prefix"], area["prefix"]) == ("detect a ; b", "detect b ; a")
    assert area["references"] == listed["references"] == [listed["suffix"]]  # Evaluation: always as listed.
    # Random: a fixed order per (seed, epoch, example); over epochs both orders appear.
    random = sources.make_source({**data, "order": "random", "seed": 5})[0]
    orders = {localization.with_epoch(random, e)["suffix"] for e in range(12)}
    assert orders == {listed["suffix"], area["suffix"]}
    assert localization.with_epoch(random, 3) == localization.with_epoch(random, 3)


def test_random_order_per_epoch_resumes_exactly(tmp_path):
    path = fx.write_jsonl(tmp_path, "t.jsonl", fx.jsonl_rows(6, size=(96, 64)))
    tok = Tokenizer.from_spec("builtin:tiny")
    input_cfg = {
        "data": {"source": "jsonl_boxes", "path": str(path), "coords": "pixel", "order": "random"},
        "res": 32,
        "text_len": 48,
        "batch_size": 2,
        "num_workers": 0,
    }
    it = make_train_iter(input_cfg, tok, process_index=0, process_count=1)
    for _ in range(4):
        next(it)
    state = it.get_state()
    rest = [next(it)["text"] for _ in range(8)]  # Epochs 1 to 3.
    resumed = make_train_iter(input_cfg, tok, process_index=0, process_count=1)
    resumed.set_state(json.loads(json.dumps(state)))
    np.testing.assert_array_equal(np.stack(rest), np.stack([next(resumed)["text"] for _ in range(8)]))
    # The object order differs between epochs (the same 6 images, other token sequences).
    epochs = [sorted(map(bytes, np.concatenate(rest[k : k + 3]))) for k in (2, 5)]
    assert epochs[0] != epochs[1]


def test_segment_task_encodes_masks_and_eval_batches_carry_objects(tmp_path):
    path = fx.write_jsonl(tmp_path, "t.jsonl", fx.jsonl_rows(3))
    data = {"source": "jsonl_boxes", "path": str(path), "coords": "pixel", "task": "segment", "codec": "random:0"}
    src = sources.make_source(data)
    for i in range(3):
        ex = src[i]
        (boxes, ok) = parse_detections(ex["suffix"])
        assert ok and ex["prefix"].startswith("segment ") and all(len(b.seg) == 16 for b in boxes)
    tok = Tokenizer.from_spec("builtin:tiny")
    batch = next(make_eval_batches(data, {"data": data, "res": 32, "text_len": 16, "num_workers": 0}, tok, 4))
    meta = batch["_meta"][0]
    assert meta["image_size"] == (64, 96) and len(meta["objects"]) == len(fx.scene(0)[1].shapes)
    assert batch["_mask"].tolist() == [True, True, True, False]


def test_missing_codec_fails_before_training(tmp_path, monkeypatch):
    from paligemma_ft.training import loop as train
    from paligemma_ft.training import setup as setup_lib

    monkeypatch.setenv("PALIGEMMA_FT_CODEC", str(tmp_path / "nowhere" / "vae-oid.npz"))
    monkeypatch.setattr(setup_lib, "init_params", lambda *a, **k: pytest.fail("the run reached the model"))
    path = fx.write_jsonl(tmp_path, "t.jsonl", fx.jsonl_rows(2))
    config = load_config(str(CONFIGS / "demo_detect.py"), ["--config.input.batch_size=8", "--config.total_steps=1"])
    with config.unlocked():
        config.input.data = {"source": "jsonl_boxes", "path": str(path), "coords": "pixel", "task": "segment"}
    with pytest.raises(FileNotFoundError, match=r"(?s)vae-oid.npz does not exist.*curl -L -o"):
        train.run(config, tmp_path / "run")


# --- Bad inputs: each named, with its place ---------------------------------------------------------------------


def _jsonl_box(**box):
    return json.dumps({"image": "images/0.png", "boxes": [{"label": "circle", **box}]})


JSONL_BAD = [
    (_jsonl_box(xyxy=[10, 10, 200, 20]), "box_outside_image", "outside the image of the 96x64 image"),
    (_jsonl_box(xyxy=[-5, 10, 20, 20]), "box_outside_image", "lies outside"),
    (_jsonl_box(xyxy=[30, 10, 20, 20]), "degenerate_box", "has no area"),
    (_jsonl_box(xywh=[30, 10, 0, 20]), "degenerate_box", "has no area"),
    (_jsonl_box(xyxy=[30, 10, 30.01, 20]), "degenerate_box", "thinner than one of the 1024 location bins"),
    (_jsonl_box(xyxy=[1, 2, 3]), "bad_box_format", "must be a list of 4 numbers"),
    (_jsonl_box(xyxy=[1, 2, "3", 4]), "bad_box_format", "not a number"),
    (_jsonl_box(xyxy=[1, 2, float("nan"), 4]), "bad_box_format", "NaN or infinite"),
    (_jsonl_box(xyxy=[1, 2, 3, 4], xywh=[1, 2, 3, 4]), "bad_box_format", "exactly one of 'xyxy' and 'xywh'"),
    (_jsonl_box(box=[1, 2, 3, 4]), "bad_box_format", "exactly one of"),
    (_jsonl_box(xyxy=[1, 2, 30, 40], colour="red"), "bad_box_format", "unknown keys ['colour']"),
    (_jsonl_box(xyxy=[1, 2, 30, 40], label="a ; b"), "bad_label", "without ';'"),
    (json.dumps({"image": "images/0.png", "boxes": [{"xyxy": [1, 2, 30, 40]}]}), "bad_label", "non-empty string"),
    (json.dumps({"image": "images/0.png", "boxes": {"xyxy": [1, 2, 3, 4]}}), "bad_box_format", "no 'boxes' list"),
    (_jsonl_box(xyxy=[1, 2, 30, 40], mask="masks/missing.png"), "bad_mask", "does not exist"),
    (_jsonl_box(xyxy=[1, 2, 30, 40], mask="masks/small.png"), "bad_mask", "mask is 8x8 pixels, the image 96x64"),
    (_jsonl_box(xyxy=[1, 2, 30, 40], mask=3), "bad_mask", "must be a PNG path"),
    ('{"image": "images/0.png", "boxes": [', "malformed_json", "not valid JSON"),
]


@pytest.mark.parametrize("line, reason, detail", JSONL_BAD)
def test_bad_jsonl_boxes_are_named(tmp_path, line, reason, detail):
    fx.write_jsonl(tmp_path, "good.jsonl", fx.jsonl_rows(1))
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "masks" / "small.png")
    path = tmp_path / "data.jsonl"
    path.write_text((tmp_path / "good.jsonl").read_text() + line + "\n")
    task = "segment" if "mask" in line else "detect"
    data = {"source": "jsonl_boxes", "path": str(path), "coords": "pixel", "task": task, "codec": "random:0"}
    src = sources.make_source(data)  # Under "skip": listed with file and line, now or when the row is read.
    errors = list(src.skipped)
    for i in range(len(src)):
        try:
            src[i]
        except BadExample as e:
            errors.append(e)
    assert [(e.file, e.line, e.reason) for e in errors] == [(str(path), 2, reason)]
    assert detail in errors[0].detail
    if src.skipped:  # Found while reading the file: "error" stops there, naming the place.
        with pytest.raises(BadExample, match=rf"{path}:2: .*\[{reason}\]"):
            sources.make_source(data, bad_input="error")


def _coco_change(change):
    def apply(raw):
        change(raw["annotations"][1])
        return raw

    return apply


COCO_BAD = [
    (_coco_change(lambda a: a.update(bbox=[90, 10, 20, 20])), "box_outside_image", "outside the image"),
    (_coco_change(lambda a: a.update(bbox=[10, 10, 0, 20])), "degenerate_box", "has no area"),
    (_coco_change(lambda a: a.update(bbox=[10, 10, 20])), "bad_box_format", "list of 4 numbers"),
    (_coco_change(lambda a: a.update(bbox=None)), "bad_box_format", "list of 4 numbers"),
    (_coco_change(lambda a: a.update(category_id=99)), "unknown_category", "category_id 99"),
    (_coco_change(lambda a: a.update(image_id=5)), "bad_annotation", "image_id 5"),
    (_coco_change(lambda a: a.update(segmentation=[[1, 2, 3]])), "bad_mask", "at least 3 (x, y) points"),
    (_coco_change(lambda a: a.update(segmentation={"size": [10, 10], "counts": "x"})), "bad_mask", "RLE size"),
]


@pytest.mark.parametrize("change, reason, detail", COCO_BAD)
def test_bad_coco_annotations_are_named(tmp_path, change, reason, detail):
    path = fx.write_coco(tmp_path, 3)
    raw = change(json.loads(path.read_text()))
    path.write_text(json.dumps(raw))
    data = {"source": "coco_instances", "annotations": str(path), "image_dir": str(tmp_path / "train2017")}
    src = sources.make_source(data)
    assert [(e.file, e.reason) for e in src.skipped] == [(str(path), reason)]
    assert "annotation #1 (id 2)" in src.skipped[0].detail and detail in src.skipped[0].detail
    # The whole image is left out (a partial list of objects would teach the model to miss one).
    bad_image = raw["annotations"][1]["image_id"]
    assert str(bad_image) not in [src[i]["id"] for i in range(len(src))]
    with pytest.raises(BadExample, match=rf"annotation #1 .*\[{reason}\]"):
        sources.make_source(data, bad_input="error")


def test_config_errors_name_the_key(tmp_path):
    path = fx.write_jsonl(tmp_path, "t.jsonl", fx.jsonl_rows(1))
    with pytest.raises(ValueError, match="input.data.coords is required"):
        sources.make_source({"source": "jsonl_boxes", "path": str(path)})
    with pytest.raises(ValueError, match=r"input.data.order='size' must be one of \['listed', 'area', 'random'\]"):
        sources.make_source({"source": "jsonl_boxes", "path": str(path), "coords": "pixel", "order": "size"})
    with pytest.raises(ValueError, match=r"unknown keys \['label_order'\]"):
        sources.make_source({"source": "coco_instances", "annotations": "x", "image_dir": "y", "label_order": 1})
    with pytest.raises(ValueError, match="input.data.annotations is required"):
        sources.make_source({"source": "coco_instances", "image_dir": "y"})
