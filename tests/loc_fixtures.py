"""Tiny localization datasets written from generated shapes scenes: COCO instances, JSONL with boxes, Pascal VOC.

Every file is built in the test's temporary folder (nothing is checked in). Boxes are the shapes' exact pixel boxes,
masks their exact pixels (COCO: polygons for squares and triangles, RLE for circles; JSONL: PNG files).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pycocotools.mask as coco_mask
from PIL import Image

from paligemma_ft.data import shapes

KINDS = {name: i + 1 for i, name in enumerate(shapes.KINDS)}  # COCO category ids.


def scene(index: int, size=(96, 64)):
    """(image uint8[H, W, 3], scene, masks) of example `index` of seed 3 at `size` = (width, height)."""
    s = shapes.make_scene(3, index, size)
    return shapes.render(s), s, shapes.shape_masks(s)


def _polygon(shape) -> list[float]:
    x0, y0, x1, y1 = shape.box
    if shape.kind == "square":
        return [x0, y0, x1, y0, x1, y1, x0, y1]
    return [(x0 + x1) / 2, y0, x1, y1, x0, y1]


def write_coco(root: pathlib.Path, n: int, split: str = "train", start: int = 0, size=(96, 64)) -> pathlib.Path:
    """`root/annotations/instances_<split>2017.json` and `root/<split>2017/*.png`; returns the annotation file."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2017").mkdir(exist_ok=True)
    images, anns = [], []
    for i in range(start, start + n):
        image, s, masks = scene(i, size)
        name = f"{i:06d}.png"
        Image.fromarray(image).save(root / f"{split}2017" / name)
        images.append({"id": 1000 + i, "file_name": name, "width": size[0], "height": size[1]})
        for shape, mask in zip(s.shapes, masks):
            x0, y0, x1, y1 = shape.box
            if shape.kind == "circle":
                rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
                seg = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
            else:
                seg = [_polygon(shape)]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": 1000 + i,
                    "category_id": KINDS[shape.kind],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": float(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": seg,
                }
            )
    categories = [{"id": v, "name": k} for k, v in KINDS.items()]
    path = root / "annotations" / f"instances_{split}2017.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return path


def jsonl_rows(n: int, start: int = 0, size=(96, 64), coords: str = "pixel", refexp: bool = False) -> list[dict]:
    """JSONL rows (images `images/<i>.png`, masks `masks/<i>_<k>.png`, written by `write_jsonl`)."""
    rows = []
    for i in range(start, start + n):
        _, s, _ = scene(i, size)
        boxes = []
        for k, shape in enumerate(s.shapes):
            x0, y0, x1, y1 = shape.box
            if coords == "normalized":
                x0, x1, y0, y1 = x0 / size[0], x1 / size[0], y0 / size[1], y1 / size[1]
            box = {"xyxy": [x0, y0, x1, y1], "mask": f"masks/{i}_{k}.png"}
            if not refexp:
                box["label"] = shape.kind
            boxes.append(box)
        row = {"image": f"images/{i}.png", "boxes": boxes[:1] if refexp else boxes}
        if refexp:
            row["prefix"] = f"the {s.shapes[0].colour} {s.shapes[0].kind}"
        rows.append(row)
    return rows


def write_jsonl(root: pathlib.Path, name: str, rows: list[dict], size=(96, 64)) -> pathlib.Path:
    """Writes `rows` to `root/name` with the images and masks they name."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    for row in rows:
        i = int(pathlib.Path(row["image"]).stem)
        image, _, masks = scene(i, size)
        Image.fromarray(image).save(root / row["image"])
        for k, mask in enumerate(masks):
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{i}_{k}.png")
    path = root / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_voc(root: pathlib.Path, n: int, size=(96, 64)) -> pathlib.Path:
    """`root/Annotations/*.xml` and `root/JPEGImages/*.png` (VOC's 1-based inclusive pixel boxes)."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(exist_ok=True)
    for i in range(n):
        image, s, _ = scene(i, size)
        Image.fromarray(image).save(root / "JPEGImages" / f"{i}.png")
        objects = "".join(
            f"<object><name>{sh.kind}</name><bndbox><xmin>{sh.box[0] + 1}</xmin><ymin>{sh.box[1] + 1}</ymin>"
            f"<xmax>{sh.box[2]}</xmax><ymax>{sh.box[3]}</ymax></bndbox></object>"
            for sh in s.shapes
        )
        (root / "Annotations" / f"{i}.xml").write_text(
            f"<annotation><filename>{i}.png</filename><size><width>{size[0]}</width><height>{size[1]}</height>"
            f"<depth>3</depth></size>{objects}</annotation>"
        )
    return root / "Annotations"
