"""What an evaluator leaves on disk: a predictions JSONL and a self-contained HTML gallery.

A row is a dict with `id`, `image` (path or None), `prompt`, `prediction`, `references` (list of str) and `score`
(a dict of per-example metrics, or a number); detection rows may add `boxes`
(`{"prediction": [Box], "references": [Box]}`), drawn on the thumbnails (references green, predictions red).
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
        return dataclasses.asdict(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r}")


def write_predictions_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Writes one JSON object per row (UTF-8, non-ASCII kept as is)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(dict(row), ensure_ascii=False, default=_jsonable) + "\n")


def _coords(box: Any) -> tuple[float, float, float, float]:
    """(y0, x0, y1, x1) of a Box or of its dict form (as read back from JSON)."""
    if isinstance(box, Mapping):
        return box["y0"], box["x0"], box["y1"], box["x1"]
    return box.y0, box.x0, box.y1, box.x1


def _thumbnail(image_path: str | None, boxes: Mapping[str, Sequence[Any]] | None) -> str | None:
    """A base64 JPEG data URI of the image shrunk to fit 128 px, boxes drawn; None if it cannot be read."""
    if not image_path:
        return None
    from PIL import Image, ImageDraw

    from paligemma_ft.data.errors import BadExample
    from paligemma_ft.data.images import load_image

    try:
        # The dataset's image through the same checks as training (format allow-list, size and pixel limits).
        im = Image.fromarray(load_image(image_path))
        im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        if boxes:
            draw = ImageDraw.Draw(im)
            for key, color in (("references", (0, 200, 0)), ("prediction", (230, 0, 0))):
                for box in boxes.get(key, ()):
                    y0, x0, y1, x1 = _coords(box)
                    draw.rectangle(
                        [x0 * im.width, y0 * im.height, x1 * im.width, y1 * im.height], outline=color, width=2
                    )
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    except (BadExample, OSError, ValueError):  # Missing, refused or unreadable file: a placeholder.
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


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
        uri = _thumbnail(row.get("image"), row.get("boxes"))
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
