"""Sources: JSONL folders (bad lines, path escapes), COCO captions, generated shapes (TFDS: test_data_tfds.py)."""

import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from paligemma_ft.data import shapes, sources
from paligemma_ft.data.transforms import BadExample, decode_image


def png(colour=(10, 20, 30), size=(6, 4)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def write_jsonl(path, lines):
    path.write_bytes(b"".join((json.dumps(x).encode() if not isinstance(x, bytes) else x) + b"\n" for x in lines))
    return path


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png((255, 0, 0)))
    (tmp_path / "images" / "b.png").write_bytes(png((0, 255, 0)))
    return tmp_path


# ------------------------------------------------------------------------------------------------------- JSONL


def test_jsonl_reads_big_vision_layout(folder):
    path = write_jsonl(
        folder / "train.jsonl",
        [
            {"image": "images/a.png", "suffix": "a red square"},
            {"image": "images/b.png", "prefix": "describe en", "suffix": ["green one", "a green square"], "id": "b"},
        ],
    )
    src = sources.make_source({"source": "jsonl", "path": str(path)})
    assert len(src) == 2 and src.skipped == []
    first, second = src[0], src[1]
    assert first["suffix"] == "a red square" and first["references"] == ["a red square"]
    assert first["prefix"] is None and first["id"] == "train.jsonl:1" and first["line"] == 1
    assert decode_image(first["image"])[0, 0].tolist() == [255, 0, 0]
    # A list suffix: several references; training uses the first.
    assert second["suffix"] == "green one" and second["references"] == ["green one", "a green square"]
    assert second["prefix"] == "describe en" and second["id"] == "b"
    assert src.location(1) == (str(path), 2)


def test_jsonl_image_dir_and_references_key(folder, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("lists")
    path = write_jsonl(elsewhere / "val.jsonl", [{"image": "a.png", "suffix": "x", "captions": ["c1", "c2"]}])
    src = sources.JsonlSource(path, image_dir=folder / "images", references_key="captions")
    assert src[0]["references"] == ["c1", "c2"] and src[0]["suffix"] == "x"


BAD_LINES = [
    (b'{"image": "images/a.png", "suffix": ', "malformed_json"),
    (b'["images/a.png"]', "malformed_json"),
    (b'{"image": "images/a.png", "suffix": "caf\xe9"}', "non_utf8"),
    (b'{"suffix": "no image"}', "missing_image_field"),
    (b'{"image": "images/a.png", "suffix": 7}', "bad_field"),
    (b'{"image": "images/a.png", "prefix": 3, "suffix": "x"}', "bad_field"),
]


@pytest.mark.parametrize("line, reason", BAD_LINES)
def test_jsonl_bad_lines_skip_and_error(folder, line, reason):
    good = json.dumps({"image": "images/a.png", "suffix": "ok"}).encode()
    path = folder / "data.jsonl"
    path.write_bytes(good + b"\n" + line + b"\n\n" + good + b"\n")  # The blank line is not an example.
    src = sources.JsonlSource(path)
    assert len(src) == 2 and [src.location(i)[1] for i in range(2)] == [1, 4]
    assert [(e.file, e.line, e.reason) for e in src.skipped] == [(str(path), 2, reason)]
    with pytest.raises(BadExample, match=re.escape(f"{path}:2")) as info:
        sources.JsonlSource(path, bad_input="error")
    assert info.value.reason == reason


def test_jsonl_missing_image_names_file_and_line(folder):
    path = write_jsonl(
        folder / "d.jsonl", [{"image": "images/a.png", "suffix": "x"}, {"image": "images/nope.png", "suffix": "y"}]
    )
    src = sources.JsonlSource(path)
    with pytest.raises(BadExample) as info:
        src[1]
    assert info.value.reason == "missing_image" and (info.value.file, info.value.line) == (str(path), 2)
    assert "nope.png" in str(info.value)


def test_jsonl_path_escapes_refused_unless_allowed(tmp_path):
    root, outside = tmp_path / "ds", tmp_path / "outside"
    (root / "images").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(png())
    (root / "images" / "a.png").write_bytes(png())
    os.symlink(outside / "secret.png", root / "images" / "link.png")
    path = write_jsonl(
        root / "d.jsonl",
        [
            {"image": "../outside/secret.png", "suffix": "x"},  # `..` escape
            {"image": str(outside / "secret.png"), "suffix": "x"},  # absolute path elsewhere
            {"image": "images/link.png", "suffix": "x"},  # symlink resolving outside
            {"image": str(root / "images" / "a.png"), "suffix": "x"},  # absolute but inside: fine
            {"image": "images/../images/a.png", "suffix": "x"},
        ],
    )  # `..` that stays inside: fine
    src = sources.JsonlSource(path)
    for i in range(3):
        with pytest.raises(BadExample, match="outside the image folder") as info:
            src[i]
        assert info.value.reason == "path_escape" and info.value.line == i + 1
    assert decode_image(src[3]["image"]).shape == (4, 6, 3)
    assert decode_image(src[4]["image"]).shape == (4, 6, 3)
    permissive = sources.make_source({"source": "jsonl", "path": str(path), "allow_outside": True})
    assert all(decode_image(permissive[i]["image"]).shape == (4, 6, 3) for i in range(3))


def test_jsonl_missing_file_and_unknown_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match="input.data.path"):
        sources.make_source({"source": "jsonl", "path": str(tmp_path / "none.jsonl")})
    with pytest.raises(ValueError, match=r"unknown keys \['imgdir'\]"):
        sources.make_source({"source": "jsonl", "path": "x", "imgdir": "y"})
    with pytest.raises(ValueError, match="input.data.source='csv'"):
        sources.make_source({"source": "csv"})


# -------------------------------------------------------------------------------------------------------- COCO


def coco_file(folder, anns):
    data = {
        "images": [
            {"id": 1, "file_name": "a.png"},
            {"id": 2, "file_name": "b.png"},
            {"id": 3, "file_name": "gone.png"},
        ],
        "annotations": anns,
    }
    path = folder / "captions.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_train_per_annotation_eval_per_image(folder):
    anns = [
        {"id": 10, "image_id": 1, "caption": "red one"},
        {"id": 11, "image_id": 2, "caption": "green"},
        {"id": 12, "image_id": 1, "caption": "a red square"},
        {"id": 13, "image_id": 3, "caption": "lost"},
    ]
    path = coco_file(folder, anns)
    cfg = {"source": "coco", "annotations": str(path), "image_dir": str(folder / "images")}
    train = sources.make_source(cfg, mode="train")
    assert len(train) == 4
    assert [train[i]["suffix"] for i in range(3)] == ["red one", "green", "a red square"]
    assert train[0]["references"] == ["red one", "a red square"] and train[0]["id"] == "1"
    ev = sources.make_source(cfg, mode="eval")
    assert len(ev) == 3
    assert ev[0]["references"] == ["red one", "a red square"] and ev[1]["references"] == ["green"]
    with pytest.raises(BadExample) as info:
        ev[2]
    assert info.value.reason == "missing_image" and "image id 3" in str(info.value)


def test_coco_bad_annotations_and_bad_file(folder):
    path = coco_file(
        folder,
        [
            {"id": 10, "image_id": 1, "caption": "ok"},
            {"id": 11, "image_id": 99, "caption": "x"},
            {"id": 12, "image_id": 2},
        ],
    )
    src = sources.CocoSource(path, folder / "images")
    assert len(src) == 1 and [e.reason for e in src.skipped] == ["bad_annotation"] * 2
    with pytest.raises(BadExample, match="annotation #1"):
        sources.CocoSource(path, folder / "images", bad_input="error")
    (folder / "broken.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match="not a COCO captions file"):
        sources.CocoSource(folder / "broken.json", folder)


def test_coco_duplicate_and_colliding_image_ids_are_bad_input_naming_the_ids(folder):
    """Without the check, the second `id: 1` silently replaced the first: a's captions were paired with image b."""
    (folder / "images" / "c.png").write_bytes(png((0, 0, 255)))
    data = {
        "images": [
            {"id": 1, "file_name": "a.png"},
            {"id": 1, "file_name": "b.png"},  # Duplicate.
            {"id": 7, "file_name": "b.png"},
            {"id": "7", "file_name": "c.png"},  # Collides with 7: both are example id "7".
            {"id": 2, "file_name": "c.png"},
            {"id": [5], "file_name": "a.png"},  # Not an id at all.
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "red"},
            {"id": 11, "image_id": 1, "caption": "a red square"},
            {"id": 12, "image_id": 7, "caption": "green"},
            {"id": 13, "image_id": "7", "caption": "blue"},
            {"id": 14, "image_id": 2, "caption": "blue square"},
        ],
    }
    path = folder / "captions.json"
    path.write_text(json.dumps(data))
    for mode in ("train", "eval"):
        src = sources.CocoSource(path, folder / "images", mode=mode)
        # Only the image with a unique id is left, with its own caption and pixels.
        assert [src[i]["id"] for i in range(len(src))] == ["2"]
        assert src[0]["references"] == ["blue square"] and src[0]["image"] == png((0, 0, 255))
        reasons = [(e.reason, e.file, e.line) for e in src.skipped]
        assert reasons == [
            ("duplicate_image_id", str(path), None),
            ("colliding_image_id", str(path), None),
            ("bad_image_id", str(path), None),
        ]
        duplicate, colliding, bad = (str(e) for e in src.skipped)
        assert "image id 1 is used by 2 images (#0 id 1 'a.png', #1 id 1 'b.png')" in duplicate
        assert "its 2 caption(s) are left out" in duplicate
        assert "image ids 7 and '7' are the same example id '7'" in colliding and "2 caption(s)" in colliding
        assert "#5 id [5] 'a.png'" in bad
    with pytest.raises(BadExample, match=r"image id 1 is used by 2 images") as info:
        sources.CocoSource(path, folder / "images", bad_input="error")
    assert info.value.reason == "duplicate_image_id"


# ------------------------------------------------------------------------------------------------------ shapes


def test_shapes_deterministic_from_seed():
    a = [shapes.make_example(3, i, "long_caption") for i in range(4)]
    b = [shapes.make_example(3, i, "long_caption") for i in reversed(range(4))][::-1]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        assert x["suffix"] == y["suffix"]
    other = shapes.make_example(4, 0, "long_caption")
    assert other["suffix"] != a[0]["suffix"] or not np.array_equal(other["image"], a[0]["image"])
    # Every task draws the same image for the same (seed, index).
    np.testing.assert_array_equal(shapes.make_example(3, 1, "detect")["image"], a[1]["image"])


def test_shapes_captions_follow_the_scene_left_to_right():
    for i in range(20):
        ex = shapes.make_example(0, i, "caption")
        scene = ex["scene"]
        assert 1 <= len(scene.shapes) <= 4
        assert len({s.colour for s in scene.shapes}) == len(scene.shapes)  # Distinct colours.
        assert [(s.col, s.row) for s in scene.shapes] == sorted((s.col, s.row) for s in scene.shapes)
        assert ex["suffix"] == " and ".join(f"a {s.colour} {s.kind}" for s in scene.shapes)
        # The drawn colour is at the centre of every shape.
        for s in scene.shapes:
            x0, y0, x1, y1 = s.box
            cx, cy = int((x0 + x1) / 2), int(y0 + 0.7 * (y1 - y0))  # Low enough to be inside a triangle.
            assert ex["image"][cy, cx].tolist() == list(shapes.COLOURS[s.colour])


def test_shapes_count_and_detect_formats():
    for i in range(20):
        count = shapes.make_example(1, i, "count")
        kind = re.fullmatch(r"answer en how many (circle|square|triangle)s are there\?", count["prefix"]).group(1)
        assert count["suffix"] == str(sum(s.kind == kind for s in count["scene"].shapes))
        det = shapes.make_example(1, i, "detect")
        kind = det["prefix"].removeprefix("detect ")
        boxes = [s for s in det["scene"].shapes if s.kind == kind]
        parts = det["suffix"].split(" ; ")
        assert len(parts) == len(boxes) >= 1
        for part, s in zip(parts, boxes):
            locs = [
                int(v) for v in re.fullmatch(r"<loc(\d{4})><loc(\d{4})><loc(\d{4})><loc(\d{4})> " + kind, part).groups()
            ]
            x0, y0, x1, y1 = s.box
            assert locs == [
                round(y0 / 64 * 1023),
                round(x0 / 64 * 1023),
                round(y1 / 64 * 1023),
                round(x1 / 64 * 1023),
            ]  # y_min x_min y_max x_max, round(v * 1023).
    assert shapes.loc_tokens((-5, 0, 70, 64), 64, 64) == "<loc0000><loc0000><loc1023><loc1023>"  # Clipped.


def test_shapes_source_and_folder(tmp_path):
    src = sources.make_source({"source": "shapes", "n": 5, "seed": 2, "task": "count", "image_size": 32})
    assert len(src) == 5 and src[4]["image"].shape == (32, 32, 3) and src[4]["prefix"].startswith("answer en")
    with pytest.raises(ValueError, match="not a shapes task"):
        sources.make_source({"source": "shapes", "task": "segmentation"})
    paths = shapes.write_shapes_folder(tmp_path / "ds", 6, seed=2, task="caption", n_val=2, image_size=(40, 30))
    train = sources.JsonlSource(paths["train"])
    val = sources.JsonlSource(paths["val"])
    assert len(train) == 6 and len(val) == 2
    assert train[5]["suffix"] == shapes.make_example(2, 5, "caption")["suffix"]
    assert val[0]["suffix"] == shapes.make_example(2, 6, "caption")["suffix"]  # Val continues the indices.
    np.testing.assert_array_equal(
        decode_image(train[1]["image"]), shapes.make_example(2, 1, "caption", (40, 30))["image"]
    )
