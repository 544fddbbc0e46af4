"""Random-access sources of raw examples: JSONL + image folder, COCO captions, TFDS, generated shapes.

Every source has `len(source)`, `source[i]` and `source.location(i) -> (file, line)`, and returns raw examples

    {"id": str, "image": bytes | uint8[H, W, 3], "image_path": str, "prefix": str | None,
     "suffix": str | None, "references": list[str], "file": str, "line": int | None}

`source[i]` raises `BadExample` for an example it cannot produce (missing image file, path outside the
folder); rows that cannot even be parsed are found when the source is built: with `bad_input="error"` the
first one raises, with `"skip"` they are left out and listed in `source.skipped` for the bad-input report.

Modes: `"train"` gives one example per training target, `"eval"` one per image with all its references.

    source   train                                  eval
    jsonl    one per line, suffix = first reference  one per line, references = the `references_key` list
    coco     one per annotation                      one per image, references = all its captions
    tfds     one per record (suffix = first ref.)    one per record
    shapes   one per generated image                 same
"""

from __future__ import annotations

import collections
import collections.abc
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from paligemma_ft.data import images, localization
from paligemma_ft.data import shapes as shapes_lib
from paligemma_ft.data.errors import BadExample
from paligemma_ft.data.shapes import ShapesSource

SOURCE_KEYS = {
    "jsonl": {"source", "path", "image_dir", "allow_outside", "references_key"},
    "coco": {"source", "annotations", "image_dir", "allow_outside"},
    "tfds": {"source", "name", "split", "data_dir", "fields"},
    "shapes": {"source", "n", "seed", "task", "image_size", "offset", "max_shapes", "snap", "codec"},
}
SOURCE_KEYS.update(localization.SOURCE_KEYS)  # coco_instances, jsonl_boxes, voc: boxes and masks (annotations.py).
BAD_INPUT_POLICIES = ("skip", "error")


def _record_bad(error: BadExample, bad_input: str, skipped: list[BadExample]) -> None:
    if bad_input == "error":
        raise error
    skipped.append(error)


def _text_list(value: Any, key: str) -> list[str]:
    """A string or a list of strings (bytes are decoded as UTF-8) as a list; anything else is a bad field."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        value = [value]
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise BadExample("bad_field", f"{key!r} must be a string or a list of strings, got {type(value).__name__}")
    out = []
    for item in value:
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                raise BadExample("non_utf8", f"{key!r} holds bytes that are not UTF-8") from None
        if not isinstance(item, str):
            raise BadExample("bad_field", f"{key!r} must hold strings, got {type(item).__name__}")
        out.append(item)
    return out


def _hashable(value: Any) -> bool:
    return isinstance(value, collections.abc.Hashable)


def resolve_image_path(image_dir: pathlib.Path, name: str, *, allow_outside: bool) -> pathlib.Path:
    """`image_dir / name`, refusing paths that leave `image_dir` (`..`, absolute paths, symlinks) unless allowed.

    Raises:
      BadExample: "path_escape" when the resolved path is outside `image_dir` and `allow_outside` is False;
        "bad_field" for a name with a NUL character.
    """
    if "\x00" in name:  # The OS cannot open such a name; pathlib would raise a bare ValueError.
        raise BadExample("bad_field", f"image path {name!r} contains a NUL character")
    path = pathlib.Path(name)
    full = path if path.is_absolute() else image_dir / path
    if allow_outside:
        return full
    resolved, root = full.resolve(), image_dir.resolve()
    if not resolved.is_relative_to(root):
        raise BadExample(
            "path_escape",
            f"image path {name!r} resolves to {resolved}, outside the image folder "
            f"{root}; set input.data.allow_outside=True to allow it",
        )
    return resolved


def read_image_bytes(path: pathlib.Path, max_bytes: int = images.DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of an image file (`images.read_image_file`: regular files of at most `max_bytes` only).

    Raises:
      BadExample: "missing_image", "not_a_file" (a folder, named pipe, device), "image_too_large",
        "unreadable_image".
    """
    return images.read_image_file(path, max_bytes=max_bytes)


class JsonlSource:
    """big_vision's JSONL layout: one object per line with `image` (path relative to the folder), optional
    `prefix`, `suffix` (a string, or a list of references), optional `id`.

    A list `suffix` gives several references (for evaluation); training uses the first one.

    Args:
      path: the JSONL file.
      image_dir: folder the `image` paths are relative to (default: the JSONL's folder).
      allow_outside: accept image paths that resolve outside `image_dir`.
      references_key: the field holding the evaluation references (default "suffix").
      bad_input: "skip" (list bad lines in `skipped`) or "error" (raise on the first).
      max_image_bytes: larger image files are refused before they are read (`input.max_image_bytes`).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        image_dir: str | os.PathLike | None = None,
        allow_outside: bool = False,
        references_key: str = "suffix",
        bad_input: str = "skip",
        max_image_bytes: int = images.DEFAULT_MAX_BYTES,
    ):
        self.path = pathlib.Path(path).expanduser()
        self.max_image_bytes = max_image_bytes
        self.image_dir = pathlib.Path(image_dir).expanduser() if image_dir else self.path.parent
        self.allow_outside, self.references_key = allow_outside, references_key
        self.skipped: list[BadExample] = []
        if not self.path.is_file():
            raise FileNotFoundError(f"input.data.path: JSONL file {self.path} does not exist.")
        self.records: list[tuple[int, dict]] = []
        for line_no, raw in enumerate(self.path.read_bytes().split(b"\n"), start=1):
            if not raw.strip():
                continue  # Blank lines (e.g. a trailing newline) hold no example.
            try:
                self.records.append((line_no, self._parse(raw)))
            except BadExample as e:
                _record_bad(e.located(str(self.path), line_no), bad_input, self.skipped)

    def _parse(self, raw: bytes) -> dict:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadExample("non_utf8", f"line is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadExample("malformed_json", f"line is not valid JSON: {e.msg} at column {e.colno}") from None
        except RecursionError:  # e.g. 100 000 `[`: json's decoder recurses once per level.
            raise BadExample("malformed_json", "line is JSON nested too deeply to read") from None
        if not isinstance(obj, dict):
            raise BadExample("malformed_json", f"line must be a JSON object, got {type(obj).__name__}")
        if not isinstance(obj.get("image"), str) or not obj["image"]:
            raise BadExample("missing_image_field", "line has no 'image' string (path relative to the folder)")
        if obj.get("prefix") is not None and not isinstance(obj["prefix"], str):
            raise BadExample("bad_field", f"'prefix' must be a string, got {type(obj['prefix']).__name__}")
        _text_list(obj.get("suffix"), "suffix")  # Type check now; emptiness is checked by the tokenizer step.
        _text_list(obj.get(self.references_key), self.references_key)
        return obj

    def __len__(self) -> int:
        return len(self.records)

    def location(self, i: int) -> tuple[str, int | None]:
        return str(self.path), self.records[i][0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        line_no, obj = self.records[i]
        try:
            path = resolve_image_path(self.image_dir, obj["image"], allow_outside=self.allow_outside)
            image = read_image_bytes(path, self.max_image_bytes)
        except BadExample as e:
            raise e.located(str(self.path), line_no) from None
        suffixes = _text_list(obj.get("suffix"), "suffix")
        return {
            "id": str(obj.get("id", f"{self.path.name}:{line_no}")),
            "image": image,
            "image_path": str(path),
            "prefix": obj.get("prefix"),
            "suffix": suffixes[0] if suffixes else None,
            "references": _text_list(obj.get(self.references_key), self.references_key),
            "file": str(self.path),
            "line": line_no,
        }


class CocoSource:
    """COCO captions annotation files (`images`: id, file_name; `annotations`: image_id, caption).

    Image ids must be unique: an id listed twice ("duplicate_image_id"), or two ids that name the same example
    (`1` and `"1"`: "colliding_image_id"), would pair captions with the wrong image, so every image with such an
    id, and its captions, is bad input (listed with the ids under `bad_input="skip"`, raised under "error").

    Args:
      annotations: the annotation JSON file, e.g. `captions_val2017.json`.
      image_dir: folder holding the `file_name`s.
      mode: "train" (one example per annotation) or "eval" (one per image, all its captions as references).
      allow_outside: accept file names that resolve outside `image_dir`.
      bad_input: "skip" or "error" for bad image ids and annotations that name an unknown image or have no
        caption string.
      max_image_bytes: larger image files are refused before they are read (`input.max_image_bytes`).
    """

    def __init__(
        self,
        annotations: str | os.PathLike,
        image_dir: str | os.PathLike,
        *,
        mode: str = "train",
        allow_outside: bool = False,
        bad_input: str = "skip",
        max_image_bytes: int = images.DEFAULT_MAX_BYTES,
    ):
        self.path = pathlib.Path(annotations).expanduser()
        self.image_dir, self.allow_outside = pathlib.Path(image_dir).expanduser(), allow_outside
        self.max_image_bytes = max_image_bytes
        self.skipped: list[BadExample] = []
        try:
            data = json.loads(self.path.read_bytes())
            listed = [(im["id"], str(im["file_name"])) for im in data["images"]]
            anns = data["annotations"]
        except FileNotFoundError:
            raise FileNotFoundError(f"input.data.annotations: {self.path} does not exist.") from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{self.path}: not a COCO captions file (needs 'images' with 'id' and 'file_name' "
                f"and 'annotations' with 'image_id' and 'caption'): {type(e).__name__}: {e}"
            ) from None
        files, bad_ids = self._unique_images(listed, anns, bad_input)
        refs: dict[Any, list[str]] = collections.defaultdict(list)
        train: list[tuple[Any, str, int]] = []  # (image id, caption, annotation index)
        for k, ann in enumerate(anns):
            ann = ann if isinstance(ann, dict) else {}
            image_id, caption = ann.get("image_id"), ann.get("caption")
            if _hashable(image_id) and image_id in bad_ids:
                continue  # Listed with its image's duplicate id.
            if not _hashable(image_id) or image_id not in files or not isinstance(caption, str):
                _record_bad(
                    BadExample(
                        "bad_annotation",
                        f"annotation #{k} (id {ann.get('id')}) has an unknown image_id or no caption string",
                        file=str(self.path),
                    ),
                    bad_input,
                    self.skipped,
                )
                continue
            refs[image_id].append(caption)
            train.append((image_id, caption, k))
        self.files, self.refs, self.mode = files, refs, mode
        # Eval keeps every listed image (one prediction each), in the file's order.
        self.items = train if mode == "train" else [(image_id, None, None) for image_id in files]

    def _unique_images(self, listed: list[tuple[Any, str]], anns: list, bad_input: str) -> tuple[dict, set]:
        """`({image id: file name}, ids left out)`: an id that is not an int or a string, or that is not unique as
        an example id (`str(id)`), is bad input, named with its `images` entries and its number of captions."""
        by_example: dict[str, list[tuple[int, Any, str]]] = collections.defaultdict(list)
        for k, (image_id, name) in enumerate(listed):
            # `1.0 == 1` in Python: a whole float shares its int's bucket (and is refused with it).
            integral = isinstance(image_id, float) and image_id.is_integer()
            by_example[str(int(image_id)) if integral else str(image_id)].append((k, image_id, name))
        files, bad_ids, errors = {}, set(), []
        for example_id, entries in by_example.items():
            ids = list(dict.fromkeys(image_id for _, image_id, _ in entries if _hashable(image_id)))
            listing = ", ".join(f"#{k} id {image_id!r} {name!r}" for k, image_id, name in entries)
            if any(isinstance(i, bool) or not isinstance(i, (int, str)) for _, i, _ in entries):
                errors.append(("bad_image_id", f"images entries {listing}: COCO image ids are integers", ids))
            elif len(ids) > 1:
                what = f"image ids {' and '.join(map(repr, ids))} are the same example id {example_id!r}"
                errors.append(("colliding_image_id", f"{what} ({listing})", ids))
            elif len(entries) > 1:
                what = f"image id {ids[0]!r} is used by {len(entries)} images"
                errors.append(("duplicate_image_id", f"{what} ({listing})", ids))
            else:
                files[entries[0][1]] = entries[0][2]
        counts = collections.Counter(
            a["image_id"] for a in anns if isinstance(a, dict) and _hashable(a.get("image_id"))
        )
        for reason, detail, ids in errors:
            bad_ids.update(ids)
            lost = sum(counts[i] for i in ids)
            detail += f"; captions cannot be matched to one image, so it and its {lost} caption(s) are left out"
            _record_bad(BadExample(reason, detail, file=str(self.path)), bad_input, self.skipped)
        return files, bad_ids

    def __len__(self) -> int:
        return len(self.items)

    def location(self, i: int) -> tuple[str, int | None]:
        return str(self.path), None

    def __getitem__(self, i: int) -> dict[str, Any]:
        image_id, caption, _ = self.items[i]
        references = list(self.refs.get(image_id, []))
        try:
            path = resolve_image_path(self.image_dir, self.files[image_id], allow_outside=self.allow_outside)
            image = read_image_bytes(path, self.max_image_bytes)
        except BadExample as e:
            raise BadExample(e.reason, f"image id {image_id}: {e.detail}", file=str(self.path)) from None
        return {
            "id": str(image_id),
            "image": image,
            "image_path": str(path),
            "prefix": None,
            "suffix": caption if caption is not None else (references[0] if references else None),
            "references": references,
            "file": str(self.path),
            "line": None,
        }


class TfdsSource:
    """A TFDS dataset read through `tfds.data_source` (array_record files, no TensorFlow needed).

    Args:
      name: registered dataset name (with optional `:version` / config), e.g. "coco_captions".
      split: split string, e.g. "train" or "validation[:10%]".
      data_dir: TFDS data folder (default: TFDS's, `~/tensorflow_datasets`).
      fields: maps `image`, `suffix` and `prefix` to feature names (`/` descends into nested features);
        `prefix=None` uses the config's default prefix. The suffix feature may hold a list of references.

    Raises:
      ImportError: tensorflow-datasets is not installed.
      ValueError / FileNotFoundError: unknown dataset, not prepared, or prepared in a format that needs TF.
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | None = None,
        fields: Mapping[str, str | None] | None = None,
    ):
        try:
            import tensorflow_datasets as tfds  # noqa: PLC0415 - optional dependency.
        except ImportError:
            raise ImportError(
                "input.data.source='tfds' needs tensorflow-datasets: pip install 'paligemma-ft[tfds]'."
            ) from None
        self.fields = {"image": "image", "suffix": "caption", "prefix": None, **dict(fields or {})}
        if not self.fields["image"]:
            raise ValueError("input.data.fields.image must name the image feature (e.g. 'image').")
        self.image_key: str = self.fields["image"]
        self.name, self.split = name, split
        self.skipped: list[BadExample] = []
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise ValueError(f"input.data.name: TFDS has no dataset {name!r}.") from None
        except ImportError as e:
            raise ImportError(
                f"TFDS dataset {name!r} needs TensorFlow to be built ({e}). Prepare it once "
                f"where TensorFlow is installed with `tfds build {name} --file_format=array_record`, "
                "then read it here without TensorFlow."
            ) from None
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir}. Prepare it once as array_record: "
                f"`tfds build {name} --file_format=array_record --data_dir=...` (catalog datasets usually need "
                "TensorFlow for that: pip install tensorflow-cpu), then point input.data.data_dir at it."
            )
        file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
        if "array_record" not in file_format:
            raise ValueError(
                f"TFDS dataset {name!r} in {builder.data_dir} is stored as {file_format}, which needs "
                "TensorFlow to read; re-prepare it with --file_format=array_record."
            )
        self.location_name = f"tfds:{name}/{split}"
        self.data = builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self.data)

    def location(self, i: int) -> tuple[str, int | None]:
        return self.location_name, i

    def _field(self, record: Mapping[str, Any], key: str) -> Any:
        value: Any = record
        for part in key.split("/"):
            if not isinstance(value, Mapping) or part not in value:
                raise BadExample("bad_field", f"record has no feature {key!r} (input.data.fields)")
            value = value[part]
        return value

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.data[i]
        suffix_key, prefix_key = self.fields.get("suffix"), self.fields.get("prefix")
        try:
            image = self._field(record, self.image_key)
            references = _text_list(self._field(record, suffix_key), suffix_key) if suffix_key else []
            prefix = None
            if prefix_key:
                prefix = _text_list(self._field(record, prefix_key), prefix_key)[0]
        except BadExample as e:
            raise e.located(self.location_name, i) from None
        return {
            "id": f"{self.name}/{self.split}/{i}",
            "image": image,
            "image_path": f"{self.location_name}[{i}]",
            "prefix": prefix,
            "suffix": references[0] if references else None,
            "references": references,
            "file": self.location_name,
            "line": i,
        }


Source = JsonlSource | CocoSource | TfdsSource | ShapesSource


def check_data_config(data: Mapping[str, Any]) -> str:
    """Validates `input.data` keys; returns the source name.

    Raises:
      ValueError: unknown source or an unknown key (a typo), naming it.
    """
    source = data.get("source", "jsonl")
    if source not in SOURCE_KEYS:
        raise ValueError(f"input.data.source={source!r} is unknown; known: {sorted(SOURCE_KEYS)}.")
    unknown = sorted(set(data) - SOURCE_KEYS[source])
    if unknown:
        raise ValueError(
            f"input.data has unknown keys {unknown} for source {source!r}; known: {sorted(SOURCE_KEYS[source])}."
        )
    return source


def make_source(
    data: Mapping[str, Any],
    *,
    mode: str = "train",
    bad_input: str = "skip",
    max_image_bytes: int = images.DEFAULT_MAX_BYTES,
) -> Source:
    """Builds the source that `input.data` describes (see the module docstring for the keys).

    Args:
      data: the data config (dict or ConfigDict).
      mode: "train" or "eval".
      bad_input: "skip" or "error" for rows that cannot be parsed.
      max_image_bytes: image files larger than this are refused before reading (`input.max_image_bytes`).
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}.")
    if bad_input not in BAD_INPUT_POLICIES:
        raise ValueError(f"input.bad_input={bad_input!r} must be one of {BAD_INPUT_POLICIES}.")
    data = as_dict(data)
    source = check_data_config(data)
    if source == "jsonl":
        if not data.get("path"):
            raise ValueError("input.data.path (the JSONL file) is required for source 'jsonl'.")
        return JsonlSource(
            data["path"],
            image_dir=data.get("image_dir"),
            allow_outside=bool(data.get("allow_outside", False)),
            references_key=data.get("references_key", "suffix"),
            bad_input=bad_input,
            max_image_bytes=max_image_bytes,
        )
    if source == "coco":
        for key in ("annotations", "image_dir"):
            if not data.get(key):
                raise ValueError(f"input.data.{key} is required for source 'coco'.")
        return CocoSource(
            data["annotations"],
            data["image_dir"],
            mode=mode,
            allow_outside=bool(data.get("allow_outside", False)),
            bad_input=bad_input,
            max_image_bytes=max_image_bytes,
        )
    if source in localization.SOURCE_KEYS:
        from paligemma_ft.data import annotations  # noqa: PLC0415 - it imports this module's helpers.

        return annotations.make_annotation_source(data, mode=mode, bad_input=bad_input)  # type: ignore[return-value]
    if source == "tfds":
        if not data.get("name"):
            raise ValueError("input.data.name (the TFDS dataset) is required for source 'tfds'.")
        return TfdsSource(data["name"], data.get("split", "train"), data.get("data_dir"), data.get("fields"))
    image_size = data.get("image_size", 64)
    return ShapesSource(
        int(data.get("n", 512)),
        int(data.get("seed", 0)),
        data.get("task", "caption"),
        tuple(image_size) if isinstance(image_size, Sequence) else int(image_size),
        int(data.get("offset", 0)),
        max_shapes=int(data.get("max_shapes", shapes_lib.MAX_SHAPES)),
        snap=int(data.get("snap", 0)),
        codec=data.get("codec"),
    )


def as_dict(cfg: Any) -> dict:
    """A ConfigDict or mapping as a plain dict (nested ConfigDicts too)."""
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return dict(cfg)
