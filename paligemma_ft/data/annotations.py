"""Sources of boxes and masks: COCO instances files, JSONL rows with `boxes`, Pascal VOC XML.

Each yields raw examples (see `sources.py`) whose prefix and suffix are PaliGemma's localization text (see
`localization.py`), plus `objects` (the `Obj`s, listed order) and `image_size` (height, width) for evaluation:

    coco_instances  `instances_*.json`: `images` (id, file_name, width, height), `categories` (id, name),
                    `annotations` (image_id, category_id, bbox [x, y, w, h] in pixels, segmentation polygons or
                    RLE, iscrowd). Crowd regions are left out (COCO's evaluation ignores them too).
    jsonl_boxes     one JSON object a line: {"image": "a.jpg", "prefix": "..." (optional),
                    "boxes": [{"label": "cat", "xyxy": [x0, y0, x1, y1]} | {"label": ..., "xywh": [...]},
                              ... each optionally with "mask": "masks/a_0.png"]}
                    in pixel or normalised coordinates, as `input.data.coords` declares ("pixel" | "normalized").
                    A row without a prefix gets `"<task> label1 ; label2"`; a box without a label (a referring
                    expression's target: the row's prefix says which object) gets no label in the suffix.
    voc             a folder of Pascal VOC XML files (`object/name`, `object/bndbox` xmin ymin xmax ymax, 1-based
                    pixels as VOC writes them), images in `image_dir`.

Modes: "train" gives one example per image with at least one object; "eval" one per image (images without objects
too: their outputs should be empty). Bad annotations follow the bad-input policy, with file and line (JSONL) or the
annotation id (COCO) or the XML file (VOC): every one of an image's objects must be usable, since dropping one
would teach the model to miss it. Reasons: bad_box_format, box_outside_image, degenerate_box, bad_label,
bad_mask, unknown_category, bad_annotation.

With `task="segment"` every object needs a mask, and the mask codec (`input.data.codec`, default `oi` =
vae-oid.npz) is loaded when the source is built, so a missing file fails before training.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import threading
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any

import numpy as np

from paligemma_ft.data import images
from paligemma_ft.data import localization as loc
from paligemma_ft.data import masks as masks_lib
from paligemma_ft.data.sources import _record_bad, read_image_bytes, resolve_image_path
from paligemma_ft.data.transforms import BadExample


def image_size_of(data: bytes) -> tuple[int, int]:
    """(height, width) of encoded image bytes as `decode_image` will return it (EXIF rotations swap the sides)."""
    with images.open_header(data) as im:  # Allow-listed formats only; the pixel count is checked here.
        width, height = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block: decode_image ignores it too.
            orientation = 1
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


@dataclasses.dataclass(slots=True)
class _Record:
    """One image: where it is, and its objects (normalised), or its raw boxes until the image size is known."""

    id: Any
    image: str
    file: str
    line: int | None
    prefix: str | None = None
    objects: list[loc.Obj] | None = None
    raw: list[dict] | None = None  # Pixel boxes of a JSONL row, normalised when the image is read.
    size: tuple[int, int] | None = None  # (height, width) when the annotations give it.


class LocalizationSource:
    """Shared reading and text building of the annotation sources (subclasses fill `self.records`)."""

    def __init__(self, data: Mapping[str, Any], mode: str, bad_input: str):
        self.task = loc.check_choice(data.get("task", "detect"), loc.TASKS, "task")
        self.order = loc.check_choice(data.get("order", "listed"), loc.ORDERS, "order")
        self.seed = int(data.get("seed", 0))
        self.mode, self.bad_input = mode, bad_input
        self.allow_outside = bool(data.get("allow_outside", False))
        self.skipped: list[BadExample] = []
        self.records: list[_Record] = []
        self.codec = None
        if self.task == "segment":
            from paligemma_ft.model import vqvae  # noqa: PLC0415 - JAX-heavy; only segmentation needs it.

            self.codec = vqvae.load_codec(data.get("codec"))
        self._codes: dict[int, list[str]] = {}  # Example -> each object's <seg> tokens (masks never change).
        self._lock = threading.Lock()

    def _bad(self, error: BadExample) -> None:
        _record_bad(error, self.bad_input, self.skipped)

    def _keep(self, record: _Record) -> None:
        """Adds a parsed image, unless it has no objects in training mode (nothing to learn from it)."""
        if self.mode == "eval" or record.objects or record.raw:
            self.records.append(record)

    def __len__(self) -> int:
        return len(self.records)

    def location(self, i: int) -> tuple[str, int | None]:
        return self.records[i].file, self.records[i].line

    def _image_dir(self, record: _Record) -> pathlib.Path:
        raise NotImplementedError

    def _objects(self, record: _Record, height: int, width: int) -> list[loc.Obj]:
        return list(record.objects or [])

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.records[i]
        try:
            path = resolve_image_path(self._image_dir(record), record.image, allow_outside=self.allow_outside)
            image = read_image_bytes(path)
            height, width = record.size if record.size else image_size_of(image)
            objects = self._objects(record, height, width)
            parts = [(loc.loc_tokens(o.box), o.label) for o in objects]
            if self.task == "segment":
                parts = [(t + s, label) for (t, label), s in zip(parts, self._seg(i, objects, height, width))]
        except BadExample as e:
            raise e.located(record.file, record.line) from None
        base = {
            "id": str(record.id),
            "image": image,
            "image_path": str(path),
            "prefix": record.prefix,
            "suffix": None,
            "file": record.file,
            "line": record.line,
            "objects": objects,
            "image_size": (height, width),
        }
        return loc.localized_example(
            base,
            parts,
            [o.area for o in objects],
            task=self.task,
            order=self.order,
            seed=self.seed,
            index=i,
            row_prefix=record.prefix,
        )

    def _seg(self, i: int, objects: list[loc.Obj], height: int, width: int) -> list[str]:
        """Each object's `<seg>` x 16: its mask cropped to its box, through the codec (computed once per example)."""
        with self._lock:
            cached = self._codes.get(i)
        if cached is not None:
            return cached
        crops = []
        for k, obj in enumerate(objects):
            if obj.mask is None:
                raise BadExample("bad_mask", f"object #{k} has no mask, and input.data.task is 'segment'")
            crops.append(masks_lib.codec_input(masks_lib.read_mask(obj.mask, height, width), obj.box))
        assert self.codec is not None  # Loaded in __init__ for task "segment".
        codes = [loc.seg_tokens(c) for c in self.codec.encode(np.stack(crops))] if crops else []
        with self._lock:
            self._codes[i] = codes
        return codes


def _label(value: Any, what: str, required: bool) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip() or any(c in value for c in ";<>"):
        raise BadExample(
            "bad_label",
            f"{what} must be a non-empty string without ';', '<' or '>' (they delimit objects), got {value!r:.60}",
        )
    return " ".join(value.split())


class CocoInstancesSource(LocalizationSource):
    """COCO instances annotations (see the module docstring); `prompt_labels` "present" (default: the labels of
    the image's objects) or "all" (every category, for open evaluation)."""

    def __init__(self, data: Mapping[str, Any], *, mode: str = "train", bad_input: str = "skip"):
        super().__init__(data, mode, bad_input)
        self.path = pathlib.Path(data["annotations"]).expanduser()
        self.image_dir = pathlib.Path(data["image_dir"]).expanduser()
        prompt_labels = loc.check_choice(data.get("prompt_labels", "present"), ("present", "all"), "prompt_labels")
        try:
            raw = json.loads(self.path.read_bytes())
            images = {im["id"]: im for im in raw["images"]}
            categories = {c["id"]: " ".join(str(c["name"]).split()) for c in raw["categories"]}
            anns = raw["annotations"]
        except FileNotFoundError:
            raise FileNotFoundError(f"input.data.annotations: {self.path} does not exist.") from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(
                f"{self.path}: not a COCO instances file (needs 'images' with id, file_name, width, height; "
                f"'categories' with id, name; 'annotations'): {type(e).__name__}: {e}"
            ) from None
        file = str(self.path)
        by_image: dict[Any, list] = collections.defaultdict(list)
        bad_images: set = set()
        for k, ann in enumerate(anns):
            where = f"annotation #{k} (id {ann.get('id') if isinstance(ann, dict) else None})"
            try:
                obj = self._object(ann, where, images, categories)
            except BadExample as e:
                image_id = ann.get("image_id") if isinstance(ann, dict) else None
                bad_images.add(image_id)
                self._bad(BadExample(e.reason, f"{where}: {e.detail}", file=file))
                continue
            if obj is not None:
                by_image[ann["image_id"]].append(obj)
        all_labels = " ; ".join(dict.fromkeys(categories.values()))
        for image_id, im in images.items():
            if image_id in bad_images:
                continue
            try:
                size = (int(im["height"]), int(im["width"]))
                name = str(im["file_name"])
            except (KeyError, TypeError, ValueError):
                self._bad(
                    BadExample("bad_annotation", f"image id {image_id} has no file_name, width or height", file=file)
                )
                continue
            prefix = f"{self.task} {all_labels}" if prompt_labels == "all" else None
            self._keep(_Record(image_id, name, file, None, prefix, by_image.get(image_id, []), size=size))

    def _object(self, ann: Any, where: str, images: dict, categories: dict) -> loc.Obj | None:
        if not isinstance(ann, dict):
            raise BadExample("bad_annotation", "is not a JSON object")
        im = images.get(ann.get("image_id"))
        if im is None:
            raise BadExample("bad_annotation", f"names image_id {ann.get('image_id')!r}, which is not in 'images'")
        if ann.get("category_id") not in categories:
            raise BadExample("unknown_category", f"category_id {ann.get('category_id')!r} is not in 'categories'")
        if ann.get("iscrowd"):
            return None  # Crowd regions: neither targets nor errors.
        box = loc.normalise_box(ann.get("bbox"), "xywh", "pixel", im.get("width"), im.get("height"), "bbox")
        mask: dict[str, Any] | None = None
        seg = ann.get("segmentation")
        if isinstance(seg, list) and seg:
            mask = {"polygons": masks_lib.check_polygons(seg)}
        elif isinstance(seg, dict):
            mask = {"rle": masks_lib.check_rle(seg, int(im["height"]), int(im["width"]))}
        elif self.task == "segment":
            raise BadExample("bad_mask", "has no 'segmentation' (polygons or RLE), and input.data.task is 'segment'")
        return loc.Obj(categories[ann["category_id"]], box, mask)

    def _image_dir(self, record: _Record) -> pathlib.Path:
        return self.image_dir


class JsonlBoxesSource(LocalizationSource):
    """JSONL rows with `boxes` (see the module docstring)."""

    def __init__(self, data: Mapping[str, Any], *, mode: str = "train", bad_input: str = "skip"):
        super().__init__(data, mode, bad_input)
        if "coords" not in data:
            raise ValueError(
                "input.data.coords is required for source 'jsonl_boxes': 'pixel' (boxes in pixels of the image "
                "file) or 'normalized' (fractions of the image side, in [0, 1])."
            )
        self.coords = loc.check_choice(data["coords"], loc.COORDS, "coords")
        self.path = pathlib.Path(data["path"]).expanduser()
        self.image_dir = pathlib.Path(data.get("image_dir") or self.path.parent).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"input.data.path: JSONL file {self.path} does not exist.")
        for line_no, raw in enumerate(self.path.read_bytes().split(b"\n"), start=1):
            if not raw.strip():
                continue
            try:
                self._keep(self._parse(raw, line_no))
            except BadExample as e:
                self._bad(e.located(str(self.path), line_no))

    def _parse(self, raw: bytes, line_no: int) -> _Record:
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise BadExample("non_utf8", "line is not valid UTF-8") from None
        except json.JSONDecodeError as e:
            raise BadExample("malformed_json", f"line is not valid JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(obj, dict):
            raise BadExample("malformed_json", f"line must be a JSON object, got {type(obj).__name__}")
        if not isinstance(obj.get("image"), str) or not obj["image"]:
            raise BadExample("missing_image_field", "line has no 'image' string (path relative to the folder)")
        prefix = obj.get("prefix")
        if prefix is not None and not isinstance(prefix, str):
            raise BadExample("bad_field", f"'prefix' must be a string, got {type(prefix).__name__}")
        boxes = obj.get("boxes")
        if not isinstance(boxes, list):
            raise BadExample("bad_box_format", "line has no 'boxes' list ([] for an image without objects)")
        for k, box in enumerate(boxes):
            self._check_box(box, k, prefix)
        record = _Record(obj.get("id", f"{self.path.name}:{line_no}"), obj["image"], str(self.path), line_no, prefix)
        if self.coords == "normalized":  # Checked now; pixel boxes wait for the image size (read with the image).
            record.objects = [self._to_obj(box, k, None, None) for k, box in enumerate(boxes)]
        else:
            record.raw = boxes
            record.objects = []
        return record

    def _check_box(self, box: Any, k: int, prefix: str | None) -> None:
        if not isinstance(box, dict):
            raise BadExample("bad_box_format", f"boxes[{k}] must be an object with 'xyxy' or 'xywh'")
        formats = [f for f in ("xyxy", "xywh") if f in box]
        if len(formats) != 1:
            raise BadExample(
                "bad_box_format", f"boxes[{k}] must have exactly one of 'xyxy' and 'xywh', got keys {sorted(box)}"
            )
        unknown = sorted(set(box) - {"label", "xyxy", "xywh", "mask"})
        if unknown:
            raise BadExample(
                "bad_box_format", f"boxes[{k}] has unknown keys {unknown} (known: label, xyxy, xywh, mask)"
            )
        loc._numbers(box[formats[0]], f"boxes[{k}].{formats[0]}")
        _label(box.get("label"), f"boxes[{k}].label", required=prefix is None)
        if "mask" in box and (not isinstance(box["mask"], str) or not box["mask"]):
            raise BadExample("bad_mask", f"boxes[{k}].mask must be a PNG path relative to the folder")
        if self.task == "segment" and "mask" not in box:
            raise BadExample("bad_mask", f"boxes[{k}] has no 'mask', and input.data.task is 'segment'")

    def _to_obj(self, box: dict, k: int, width: int | None, height: int | None) -> loc.Obj:
        fmt = "xyxy" if "xyxy" in box else "xywh"
        coords = loc.normalise_box(box[fmt], fmt, self.coords, width, height, f"boxes[{k}].{fmt}")
        mask = None
        if box.get("mask"):
            mask = {"png": str(resolve_image_path(self.image_dir, box["mask"], allow_outside=self.allow_outside))}
        return loc.Obj(_label(box.get("label"), f"boxes[{k}].label", required=False), coords, mask)

    def _objects(self, record: _Record, height: int, width: int) -> list[loc.Obj]:
        if record.raw is None:
            return list(record.objects or [])
        return [self._to_obj(box, k, width, height) for k, box in enumerate(record.raw)]

    def _image_dir(self, record: _Record) -> pathlib.Path:
        return self.image_dir


class VocSource(LocalizationSource):
    """Pascal VOC XML files in the folder `annotations` (detection only: VOC masks are class PNGs, not read)."""

    def __init__(self, data: Mapping[str, Any], *, mode: str = "train", bad_input: str = "skip"):
        super().__init__(data, mode, bad_input)
        if self.task != "detect":
            raise ValueError("input.data.task must be 'detect' for source 'voc' (its masks are not read).")
        folder = pathlib.Path(data["annotations"]).expanduser()
        self.image_dir = pathlib.Path(data["image_dir"]).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"input.data.annotations: {folder} is not a folder of VOC .xml files.")
        for path in sorted(folder.glob("*.xml")):
            try:
                self._keep(self._parse(path))
            except BadExample as e:
                self._bad(e.located(str(path), None))

    def _parse(self, path: pathlib.Path) -> _Record:
        try:
            root = ET.parse(path).getroot()
            name = root.findtext("filename") or ""
            width, height = int(root.findtext("size/width") or 0), int(root.findtext("size/height") or 0)
        except (ET.ParseError, ValueError) as e:
            raise BadExample("bad_annotation", f"not a readable VOC annotation: {e}") from None
        if not name or width < 1 or height < 1:
            raise BadExample("bad_annotation", "has no <filename> or no <size> with <width> and <height>")
        objects = []
        for k, node in enumerate(root.findall("object")):
            label = _label(node.findtext("name"), f"object #{k} <name>", required=True)
            try:
                values = [float(node.findtext(f"bndbox/{t}") or "") for t in ("xmin", "ymin", "xmax", "ymax")]
            except (TypeError, ValueError):
                raise BadExample("bad_box_format", f"object #{k} has no numeric <bndbox> xmin ymin xmax ymax") from None
            # VOC pixels are 1-based and inclusive: pixel i spans [i - 1, i).
            box = [values[0] - 1, values[1] - 1, values[2], values[3]]
            objects.append(loc.Obj(label, loc.normalise_box(box, "xyxy", "pixel", width, height, f"object #{k}"), None))
        return _Record(path.stem, name, str(path), None, None, objects, size=(height, width))

    def _image_dir(self, record: _Record) -> pathlib.Path:
        return self.image_dir


def make_annotation_source(data: Mapping[str, Any], *, mode: str, bad_input: str) -> LocalizationSource:
    """The source `input.data.source` names (one of `SOURCE_KEYS`); its required keys are checked here."""
    source = data["source"]
    required = {
        "coco_instances": ("annotations", "image_dir"),
        "jsonl_boxes": ("path",),
        "voc": ("annotations", "image_dir"),
    }
    for key in required[source]:
        if not data.get(key):
            raise ValueError(f"input.data.{key} is required for source {source!r}.")
    cls = {"coco_instances": CocoInstancesSource, "jsonl_boxes": JsonlBoxesSource, "voc": VocSource}[source]
    return cls(data, mode=mode, bad_input=bad_input)
