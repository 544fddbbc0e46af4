"""What an evaluator leaves on disk: a predictions JSONL and a self-contained HTML gallery.

A row is a dict with `id`, `image` (path or None), `prompt`, `prediction`, `references` (list of str) and `score`
(a dict of per-example metrics, or a number); localization rows may add `boxes`
(`{"prediction": [Box], "references": [Box]}`) and `masks` (the same keys, COCO RLE per box), drawn on the
thumbnails (references green, predictions red; `draw.py`). Generated examples (`shapes(...)[i]` paths) are drawn
from their generator. `write_gallery_png` writes the first examples of a localization split as one picture.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

THUMBNAIL_PX = 128


def _jsonable(value: Any) -> Any:
    """`json.dumps` fallback for numpy scalars/arrays, dataclasses (boxes) and paths."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # Optional fields left at their None default (a detection Box's `seg`) are not written.
        return {
            f.name: getattr(value, f.name)
            for f in dataclasses.fields(value)
            if not (f.default is None and getattr(value, f.name) is None)
        }
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r}")


def write_predictions_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Writes one JSON object per row (UTF-8, non-ASCII kept as is)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(dict(row), ensure_ascii=False, default=_jsonable) + "\n")


def _load_image(image_path: str | None) -> Any:
    """The RGB PIL image at `image_path`, or a generated example's image; None if it cannot be read."""
    from PIL import Image  # noqa: PLC0415

    from paligemma_ft.data.shapes import image_from_path  # noqa: PLC0415

    if not image_path:
        return None
    generated = image_from_path(image_path)
    if generated is not None:
        return Image.fromarray(generated)
    from paligemma_ft.data.errors import BadExample  # noqa: PLC0415
    from paligemma_ft.data.images import load_image  # noqa: PLC0415

    try:  # The dataset's image through the same checks as training (format allow-list, size and pixel limits).
        return Image.fromarray(load_image(image_path))
    except (BadExample, OSError, ValueError):  # Missing, refused or unreadable file: a placeholder.
        return None


def _thumbnail(
    image_path: str | None, boxes: Mapping[str, Sequence[Any]] | None, masks: Mapping[str, Sequence[Any]] | None = None
) -> str | None:
    """A base64 JPEG data URI of the image shrunk to fit 128 px (small ones enlarged), boxes and masks drawn; None
    if it cannot be read."""
    from paligemma_ft.evaluate.draw import draw_comparison  # noqa: PLC0415

    im = _load_image(image_path)
    if im is None:
        return None
    try:
        if boxes:
            im = draw_comparison(im, boxes, masks, min_side=THUMBNAIL_PX, labels=False)
        im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def write_gallery_png(
    path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], *, max_items: int = 16, cell: int = 192
) -> bool:
    """A contact sheet of the first `max_items` localization rows: each image under its prompt, with its references
    (green, thick, labels above) and predictions (red, thin, labels below): boxes, masks and labels. Returns False
    (and writes nothing) when no image can be read."""
    from PIL import Image, ImageDraw  # noqa: PLC0415

    from paligemma_ft.evaluate.draw import draw_comparison  # noqa: PLC0415

    band, gap = 14, 6  # Prompt line above each image; white space between cells.
    cells = []
    for row in rows[:max_items]:
        im = _load_image(row.get("image"))
        if im is not None:
            im = draw_comparison(im, row.get("boxes"), row.get("masks"), min_side=cell)
            im.thumbnail((cell, cell))
            cells.append((str(row.get("prompt", ""))[:40], im))
    if not cells:
        return False
    cols = min(4, len(cells))
    rows_n = -(-len(cells) // cols)
    sheet = Image.new("RGB", (cols * (cell + gap) + gap, rows_n * (cell + band + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (prompt, im) in enumerate(cells):
        x, y = gap + (k % cols) * (cell + gap), gap + (k // cols) * (cell + band + gap)
        draw.text((x, y), prompt, fill=(0, 0, 0))
        sheet.paste(im, (x, y + band))
    sheet.save(path, format="PNG")
    return True


def _format_score(score: Any) -> str:
    if isinstance(score, Mapping):
        return ", ".join(f"{k}={_format_number(v)}" for k, v in score.items())
    return _format_number(score)


def _format_number(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (float, np.floating)):
        return "nan" if math.isnan(v) else f"{float(v):.4g}"
    return str(v)


_STYLE = """body{font-family:sans-serif;margin:16px}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}
.ph{width:128px;height:96px;background:#ddd;color:#666;display:flex;align-items:center;justify-content:center}
.warn{color:#a60}.pred{font-weight:bold}.refs{color:#444}"""


def write_gallery_html(
    path: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    *,
    title: str,
    max_items: int = 200,
    metrics: Mapping[str, Any] | None = None,
    warnings: Sequence[str] = (),
) -> None:
    """Writes a self-contained HTML page: optional metrics and warnings, then one table row per example.

    Args:
      path: output .html file.
      rows: prediction rows (see the module docstring); the first `max_items` are shown.
      title: page title and heading.
      max_items: maximum number of examples embedded (thumbnails make the page grow ~5 kB each).
      metrics: optional flat metrics shown above the examples.
      warnings: optional warnings shown above the examples.
    """
    e = lambda v: html.escape(str(v))  # noqa: E731
    out = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    if metrics:
        out.append(
            "<table>"
            + "".join(f"<tr><th>{e(k)}</th><td>{e(_format_number(v))}</td></tr>" for k, v in metrics.items())
            + "</table>"
        )
    out += [f'<p class="warn">{e(w)}</p>' for w in warnings]
    shown = list(rows[:max_items])
    out.append(f"<p>{len(shown)} of {len(rows)} examples.</p>")
    out.append("<table><tr><th>image</th><th>id / prompt</th><th>prediction / references</th><th>score</th></tr>")
    for row in shown:
        uri = _thumbnail(row.get("image"), row.get("boxes"), row.get("masks"))
        img = f'<img src="{uri}" alt="{e(row.get("image"))}">' if uri else '<div class="ph">no image</div>'
        refs = "".join(f"<li>{e(r)}</li>" for r in row.get("references") or [])
        out.append(
            f"<tr><td>{img}</td><td>{e(row.get('id'))}<br><i>{e(row.get('prompt', ''))}</i></td>"
            f'<td><div class="pred">{e(row.get("prediction", ""))}</div><ul class="refs">{refs}</ul></td>'
            f"<td>{e(_format_score(row.get('score', '')))}</td></tr>"
        )
    out.append("</table></body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(out))
