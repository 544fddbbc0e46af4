"""A generated dataset of simple shapes, deterministic from a seed, for tests, the demo and benchmarks.

Each image has 1-4 shapes (circle, square, triangle) in distinct colours, one per cell of a 3x3 grid, on a
plain pale background. Example `index` of seed `seed` depends only on `(seed, index)`, so any subset can be
drawn in any order. Tasks (prefix -> suffix):

    caption       "caption en"                            -> "a red circle and a blue square"
    long_caption  "caption en"                            -> "a large red circle in the top left and a small ..."
    count         "answer en how many circles are there?" -> "2"
    detect        "detect circle"                         -> "<loc0012><loc0040><loc0300><loc0330> circle ; ..."
    segment       "segment circle"                        -> "<loc0012><loc0040><loc0300><loc0330><seg012>...x16 circle"

`segment` needs a mask codec (`input.data.codec`, see `paligemma_ft.model.vqvae`): the exact mask of each shape
(`shape_masks`: the pixels drawn for it) is cropped to its box and encoded into 16 `<seg>` tokens.

Captions list the shapes column by column from left to right (top to bottom within a column), so every image
has exactly one caption and a tiny model can learn the mapping. Detection boxes follow PaliGemma's format
(big_vision reference 9): y_min x_min y_max x_max, each `round(v * 1023)` of the coordinate normalised by the
image size, clipped to [0, 1023]; boxes are listed in the same left-to-right order, joined by " ; ".

Two knobs make easier localization data (the detection demo uses both; the defaults leave every other task's
images unchanged): `max_shapes` (1-4 shapes per image) and `snap` (pixels: positions and sides are moved onto a
grid of that step inside their cell, e.g. 8 = the demo model's patch size, so a coordinate takes a few values).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220), "yellow": (230, 190, 20)}
KINDS = ("circle", "square", "triangle")
BACKGROUNDS = ((250, 250, 250), (225, 225, 225), (240, 232, 215))  # white, light gray, beige.
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
TASKS = ("caption", "long_caption", "count", "detect", "segment")
MAX_SHAPES = 4
SIZES = {"small": (0.45, 0.55), "large": (0.8, 0.9)}  # Shape side as a fraction of the cell's shorter side.


@dataclasses.dataclass(frozen=True)
class Shape:
    """One drawn shape. `box` is (x0, y0, x1, y1) in pixels, x1/y1 exclusive."""

    kind: str
    colour: str
    size: str
    row: int
    col: int
    box: tuple[float, float, float, float]

    @property
    def position(self) -> str:
        """ "top left", "top center", "middle left", "center", ...: the grid cell in words."""
        if (self.row, self.col) == (1, 1):
            return "center"
        return f"{ROWS[self.row]} {COLS[self.col]}"


@dataclasses.dataclass(frozen=True)
class Scene:
    """A generated image: its size, background colour and shapes in caption order (left to right)."""

    width: int
    height: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]


def _size_of(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    width, height = image_size
    return int(width), int(height)


def _snap(lo: float, hi: float, start: float, side: float, step: int) -> tuple[float, float]:
    """(start, side) moved onto multiples of `step` inside [lo, hi): the side shrinks by steps until it fits."""
    side = max(step, int(side // step) * step)
    first = math.ceil(lo / step) * step
    while side > step and math.floor((hi - side) / step) * step < first:
        side -= step
    last = max(first, math.floor((hi - side) / step) * step)
    return float(min(max(round(start / step) * step, first), last)), float(side)


def make_scene(
    seed: int, index: int, image_size: int | Sequence[int] = 64, *, max_shapes: int = MAX_SHAPES, snap: int = 0
) -> Scene:
    """The scene of example `index` for `seed`; `image_size` is a side or (width, height).

    `max_shapes` (1-4) caps the shapes per image; `snap` > 0 moves positions and sides onto multiples of `snap`
    pixels inside their cell. Both keep the random draws of the defaults, so the default scenes never change.
    """
    if not 1 <= max_shapes <= MAX_SHAPES:
        raise ValueError(f"input.data.max_shapes must be in [1, {MAX_SHAPES}], got {max_shapes}.")
    width, height = _size_of(image_size)
    rng = np.random.default_rng([seed, index])
    count = int(rng.integers(1, max_shapes + 1))
    cells = rng.choice(9, size=count, replace=False)
    colours = rng.choice(list(COLOURS), size=count, replace=False)
    cell_w, cell_h = width / 3, height / 3
    shapes = []
    for cell, colour in zip(cells, colours):
        row, col = divmod(int(cell), 3)
        size = "large" if rng.random() < 0.5 else "small"
        side = rng.uniform(*SIZES[size]) * min(cell_w, cell_h)
        # Jitter the shape inside its cell; it never leaves the cell, so shapes never overlap.
        x0 = col * cell_w + rng.uniform(0, cell_w - side)
        y0 = row * cell_h + rng.uniform(0, cell_h - side)
        kind = KINDS[int(rng.integers(len(KINDS)))]
        box = (x0, y0, x0 + side, y0 + side)
        if snap:
            x0, w = _snap(col * cell_w, (col + 1) * cell_w, x0, side, snap)
            y0, h = _snap(row * cell_h, (row + 1) * cell_h, y0, side, snap)
            box = (x0, y0, x0 + min(w, h), y0 + min(w, h))
        shapes.append(Shape(kind, str(colour), size, row, col, box))
    shapes.sort(key=lambda s: (s.col, s.row))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return Scene(width, height, background, tuple(shapes))


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, fill: Any) -> None:
    x0, y0, x1, y1 = shape.box
    # PIL's boxes are inclusive: shrink by one pixel so the shape covers [x0, x1) x [y0, y1).
    if shape.kind == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)


def render(scene: Scene) -> np.ndarray:
    """Draws `scene` as uint8[height, width, 3]."""
    im = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(im)
    for shape in scene.shapes:
        _draw(draw, shape, COLOURS[shape.colour])
    return np.asarray(im)


def shape_masks(scene: Scene) -> list[np.ndarray]:
    """bool[height, width] per shape (caption order): exactly the pixels `render` paints for it."""
    out = []
    for shape in scene.shapes:
        im = Image.new("L", (scene.width, scene.height), 0)
        _draw(ImageDraw.Draw(im), shape, 255)
        out.append(np.asarray(im) > 0)
    return out


def normalised_box(shape: Shape, width: int, height: int) -> tuple[float, float, float, float]:
    """(y0, x0, y1, x1) of a shape's box as fractions of the image size."""
    x0, y0, x1, y1 = shape.box
    return (y0 / height, x0 / width, y1 / height, x1 / width)


def _plural(kind: str) -> str:
    return kind + "s"


def loc_tokens(box: tuple[float, float, float, float], width: int, height: int) -> str:
    """`<locYYYY><locXXXX><locYYYY><locXXXX>` for a pixel box (x0, y0, x1, y1): round(v * 1023), clipped."""
    x0, y0, x1, y1 = box
    values = (y0 / height, x0 / width, y1 / height, x1 / width)
    return "".join(f"<loc{int(np.clip(round(v * 1023), 0, 1023)):04d}>" for v in values)


def _seg_codes(scene: Scene, chosen: Sequence[int], codec: Any) -> dict[int, str]:
    """`<seg>` x 16 of each chosen shape's exact mask, cropped to its box and encoded by `codec`."""
    if codec is None:
        raise ValueError("the shapes task 'segment' needs a mask codec (input.data.codec).")
    from paligemma_ft.data.localization import seg_tokens  # noqa: PLC0415 - avoids an import cycle.
    from paligemma_ft.data.masks import codec_input  # noqa: PLC0415

    masks = shape_masks(scene)
    crops = np.stack(
        [codec_input(masks[i], normalised_box(scene.shapes[i], scene.width, scene.height)) for i in chosen]
    )
    return {i: seg_tokens(c) for i, c in zip(chosen, codec.encode(crops))}


def _texts(scene: Scene, task: str, rng: np.random.Generator, codec: Any = None) -> tuple[str, str]:
    """(prefix, suffix) of `scene` for `task`."""
    if task == "caption":
        return "caption en", " and ".join(f"a {s.colour} {s.kind}" for s in scene.shapes)
    if task == "long_caption":
        return "caption en", " and ".join(f"a {s.size} {s.colour} {s.kind} in the {s.position}" for s in scene.shapes)
    if task == "count":
        kind = KINDS[int(rng.integers(len(KINDS)))]  # May be absent: "0" is a valid answer.
        count = sum(s.kind == kind for s in scene.shapes)
        return f"answer en how many {_plural(kind)} are there?", str(count)
    if task in ("detect", "segment"):
        present = sorted({s.kind for s in scene.shapes})
        kind = present[int(rng.integers(len(present)))]
        chosen = [i for i, s in enumerate(scene.shapes) if s.kind == kind]
        codes = _seg_codes(scene, chosen, codec) if task == "segment" else {}
        boxes = [
            f"{loc_tokens(scene.shapes[i].box, scene.width, scene.height)}{codes.get(i, '')} {kind}" for i in chosen
        ]
        return f"{task} {kind}", " ; ".join(boxes)
    raise ValueError(f"Unknown shapes task {task!r}; known: {', '.join(TASKS)}.")


def make_example(
    seed: int,
    index: int,
    task: str = "caption",
    image_size: int | Sequence[int] = 64,
    *,
    max_shapes: int = MAX_SHAPES,
    snap: int = 0,
    codec: Any = None,
) -> dict[str, Any]:
    """Example `index` of `seed`: `{"image": uint8[H, W, 3], "prefix", "suffix", "scene"}`.

    Args:
      max_shapes, snap: see `make_scene`.
      codec: a `paligemma_ft.model.vqvae.MaskCodec`, needed by the `segment` task.

    Raises:
      ValueError: an unknown task, or `segment` without a codec.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown shapes task {task!r}; known: {', '.join(TASKS)}.")
    scene = make_scene(seed, index, image_size, max_shapes=max_shapes, snap=snap)
    # The task's own draws come from a separate stream, so every task sees the same images.
    stream = TASKS.index("detect" if task == "segment" else task)  # segment asks for the kind detect asks for.
    prefix, suffix = _texts(scene, task, np.random.default_rng([seed, index, 1 + stream]), codec)
    return {"image": render(scene), "prefix": prefix, "suffix": suffix, "scene": scene}


def encode_image(image: np.ndarray, image_format: str = "png", quality: int = 90) -> bytes:
    """Encodes uint8[H, W, 3] as PNG or JPEG bytes."""
    out = io.BytesIO()
    fmt = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}[image_format.lower()]
    Image.fromarray(image).save(out, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return out.getvalue()


class ShapesSource:
    """Random-access raw examples of the generated dataset (see `sources.py` for the raw-example format).

    Args:
      n: number of examples.
      seed: dataset seed; example i is the same for every `n`.
      task: one of `TASKS`.
      image_size: side (or (width, height)) of the generated images.
      offset: index of the first example (lets a validation split follow the training split).
      max_shapes, snap: see `make_scene`.
      codec: the mask codec spec of the `segment` task (`paligemma_ft.model.vqvae.load_codec`); loaded here, so a
        missing file fails before training.

    detect/segment examples also carry `objects` (the target shapes as `localization.Obj`, exact masks included)
    and `image_size` (height, width), which segmentation evaluation and drawing read.
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        task: str = "caption",
        image_size: int | Sequence[int] = 64,
        offset: int = 0,
        *,
        max_shapes: int = MAX_SHAPES,
        snap: int = 0,
        codec: str | None = None,
    ):
        if task not in TASKS:
            raise ValueError(f"input.data.task={task!r} is not a shapes task; known: {', '.join(TASKS)}.")
        if n < 0:
            raise ValueError(f"input.data.n must be >= 0, got {n}.")
        if snap < 0:
            raise ValueError(f"input.data.snap must be >= 0 pixels, got {snap}.")
        make_scene(seed, offset, image_size, max_shapes=max_shapes)  # Checks max_shapes.
        self.n, self.seed, self.task, self.image_size, self.offset = n, seed, task, image_size, offset
        self.max_shapes, self.snap = max_shapes, snap
        self.codec = None
        if task == "segment":
            from paligemma_ft.model import vqvae  # noqa: PLC0415 - JAX-heavy; only segmentation needs it.

            self.codec = vqvae.load_codec(codec)
        self.skipped: list = []  # Generated examples are never bad.

    def __len__(self) -> int:
        return self.n

    def location(self, i: int) -> tuple[str, int | None]:
        extra = "".join(
            f", {k}={v}"
            for k, v, default in (
                ("image_size", _size_text(self.image_size), "64"),
                ("max_shapes", self.max_shapes, MAX_SHAPES),
                ("snap", self.snap, 0),
            )
            if v != default
        )
        return f"shapes(seed={self.seed}, task={self.task}{extra})", self.offset + i

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.n:
            raise IndexError(f"shapes example {i} out of range [0, {self.n})")
        index = self.offset + i
        ex = make_example(
            self.seed, index, self.task, self.image_size, max_shapes=self.max_shapes, snap=self.snap, codec=self.codec
        )
        file, _ = self.location(i)
        out = {
            "id": f"shapes-{self.seed}-{index}",
            "image": ex["image"],
            "image_path": f"{file}[{index}]",
            "prefix": ex["prefix"],
            "suffix": ex["suffix"],
            "references": [ex["suffix"]],
            "file": file,
            "line": index,
        }
        if self.task in ("detect", "segment"):
            out.update(scene_objects(ex["scene"], ex["prefix"].split(" ", 1)[1]))
        return out


def _size_text(image_size: int | Sequence[int]) -> str:
    """ "64" for a side, "64x48" for (width, height)."""
    return str(image_size) if isinstance(image_size, int) else "x".join(str(int(v)) for v in image_size)


def scene_objects(scene: Scene, kind: str) -> dict[str, Any]:
    """`{"objects": [Obj], "image_size": (height, width)}` of the shapes of `kind`, with their exact masks."""
    from paligemma_ft.data.localization import Obj  # noqa: PLC0415 - avoids an import cycle.

    masks = shape_masks(scene)
    objects = [
        Obj(s.kind, normalised_box(s, scene.width, scene.height), {"array": m})
        for s, m in zip(scene.shapes, masks)
        if s.kind == kind
    ]
    return {"objects": objects, "image_size": (scene.height, scene.width)}


_PATH = re.compile(r"shapes\((.*)\)\[(\d+)\]")


def image_from_path(path: str) -> np.ndarray | None:
    """The image a generated example's `image_path` names (`shapes(seed=0, task=detect, snap=8)[12]`), else None.

    Lets galleries and the app show generated examples, which exist only in memory.
    """
    m = _PATH.fullmatch(path or "")
    if m is None:
        return None
    try:
        args = dict(part.split("=", 1) for part in m.group(1).split(", "))
        size = args.get("image_size", "64")
        image_size = tuple(int(v) for v in size.split("x")) if "x" in size else int(size)
        scene = make_scene(
            int(args["seed"]),
            int(m.group(2)),
            image_size,
            max_shapes=int(args.get("max_shapes", MAX_SHAPES)),
            snap=int(args.get("snap", 0)),
        )
    except (KeyError, ValueError):
        return None
    return render(scene)


def write_shapes_folder(
    directory: str | os.PathLike,
    n: int,
    seed: int = 0,
    task: str = "caption",
    *,
    n_val: int | None = None,
    image_size: int | Sequence[int] = 64,
    image_format: str = "png",
) -> dict[str, pathlib.Path]:
    """Writes a big_vision-style folder: `images/*.png|jpg`, `train.jsonl` and `val.jsonl`.

    Lines look like `{"image": "images/train_00000.png", "prefix": "caption en", "suffix": "a red circle"}`.
    The validation examples continue the training indices, so the two splits never share an image.

    Args:
      directory: output folder (created).
      n: number of training examples.
      seed: dataset seed.
      task: one of `TASKS`.
      n_val: number of validation examples (default `n // 10`).
      image_size: side or (width, height) of the images.
      image_format: "png" or "jpeg".

    Returns:
      `{"dir", "train", "val"}` paths.
    """
    root = pathlib.Path(directory)
    (root / "images").mkdir(parents=True, exist_ok=True)
    n_val = n // 10 if n_val is None else n_val
    ext = "jpg" if image_format.lower() in ("jpg", "jpeg") else "png"
    paths = {"dir": root, "train": root / "train.jsonl", "val": root / "val.jsonl"}
    for split, start, count in (("train", 0, n), ("val", n, n_val)):
        lines = []
        for index in range(start, start + count):
            ex = make_example(seed, index, task, image_size)
            name = f"images/{split}_{index:05d}.{ext}"
            (root / name).write_bytes(encode_image(ex["image"], ext))
            lines.append(json.dumps({"image": name, "prefix": ex["prefix"], "suffix": ex["suffix"]}))
        paths[split].write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return paths
