"""`paligemma-ft predict`: run a checkpoint on image files with one prompt, print one line per image.

    paligemma-ft predict --image a.jpg --image b.jpg --prompt "caption en"            # builtin:demo
    paligemma-ft predict --checkpoint ft.npz --tokenizer paligemma_tokenizer.model \\
        --image street.jpg --prompt "detect car ; person" --draw boxes.png

Output: `<image path>\\t<prediction>` per image on stdout, in the order given (tabs and newlines inside a
prediction are written as spaces, so every image is exactly one line). With a `detect ...` (or `segment ...`)
prompt, `--draw OUT.png` writes the image at its own size with the parsed boxes and labels drawn; with several
images the files are `OUT_0.png`, `OUT_1.png`, ... (0-based, in `--image` order). Notes go to stderr.

Images are checked (readable, decodable) before the model is loaded, and decoded in fixed-size batches (the last
one padded), so the decode function compiles once however many images there are.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # The CLI imports this module to build its parser: numpy, JAX and PIL load only when used.
    import numpy as np

    from paligemma_ft.evaluate.detection import Box

DRAW_TASKS = ("detect", "segment")  # Prompts whose outputs hold <loc> boxes.
_COLOURS = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (128, 128, 0),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `predict` flags (shared by the CLI and anything that wants to parse them)."""
    p.add_argument(
        "--checkpoint",
        default="builtin:demo",
        metavar="SPEC",
        help="builtin:demo (default), a big_vision .npz[:subtree], a run's workdir or kaggle:HANDLE",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="SPEC",
        help="SentencePiece .model path or builtin:tiny (default builtin:tiny for builtin models)",
    )
    p.add_argument(
        "--image", action="append", required=True, metavar="PATH", help="an image file; repeat for several images"
    )
    p.add_argument("--prompt", required=True, help='the prefix, e.g. "caption en", "detect cat ; dog"')
    p.add_argument(
        "--draw",
        default=None,
        metavar="OUT.png",
        help="with a detect/segment prompt: write the image with the boxes drawn (OUT_<i>.png for several images)",
    )
    p.add_argument(
        "--sampler", default="greedy", help="greedy, temperature(t), top_k(k), nucleus(p), beam(n) (default greedy)"
    )
    p.add_argument("--max-decode-len", type=int, default=32, help="tokens to generate at most (default 32)")
    p.add_argument("--preset", default=None, help="model preset (default: inferred from the checkpoint)")
    p.add_argument("--res", type=int, default=None, help="image side (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=8, help="images decoded together (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stochastic samplers (default 0)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="cast the weights to this dtype and compute in it (default: weights as stored, compute bfloat16 on "
        "GPU/TPU, float32 on CPU)",
    )


def draw_paths(draw: str, n: int) -> list[str]:
    """The files `--draw` writes for `n` images: `draw` itself for one image, else `<stem>_<i><suffix>`."""
    if n == 1:
        return [draw]
    path = Path(draw)
    return [str(path.with_name(f"{path.stem}_{i}{path.suffix or '.png'}")) for i in range(n)]


def draw_boxes(image: np.ndarray, boxes: Sequence[Box]) -> Any:
    """A PIL image of `image` (uint8[H, W, 3]) with each box outlined and labelled, one colour per label."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image, ImageDraw  # noqa: PLC0415 - only when drawing.

    im = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(im)
    width = max(1, round(min(im.size) / 100))
    colours: dict[str, tuple[int, int, int]] = {}
    for box in boxes:
        colour = colours.setdefault(box.label, _COLOURS[len(colours) % len(_COLOURS)])
        x0, y0 = round(box.x0 * im.width), round(box.y0 * im.height)
        x1, y1 = round(box.x1 * im.width), round(box.y1 * im.height)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        left, top, right, bottom = draw.textbbox((x0, y0), box.label)
        top_y = y0 - (bottom - top) - 2 if y0 - (bottom - top) - 2 >= 0 else y0  # Above the box if it fits.
        draw.rectangle([x0, top_y, x0 + (right - left) + 4, top_y + (bottom - top) + 2], fill=colour)
        draw.text((x0 + 2, top_y), box.label, fill=(255, 255, 255))
    return im


def read_images(paths: Sequence[str]) -> list[np.ndarray]:
    """uint8[H, W, 3] per file, EXIF orientation applied.

    Raises:
      FileNotFoundError: a path that does not exist (named).
      ValueError: a folder, an empty or undecodable file (named, with the reason).
    """
    from paligemma_ft.data import transforms  # noqa: PLC0415

    images = []
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"image {path}: no such file")
        if os.path.isdir(path):
            raise ValueError(f"image {path}: is a folder, not an image file")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:  # Permissions, a broken link, ...
            raise ValueError(f"image {path}: cannot be read ({e.strerror or e})") from None
        try:
            images.append(transforms.decode_image(data))
        except transforms.BadExample as e:
            raise ValueError(f"image {path}: {e.detail or e.reason} [{e.reason}]") from None
    return images


def _one_line(text: str) -> str:
    return " ".join(text.replace("\t", " ").splitlines()) if text else ""


def predict_batched(predictor: Any, images: Sequence[np.ndarray], prompt: str, batch_size: int) -> list[str]:
    """One prediction per image, decoded `batch_size` at a time; the last batch is padded with copies of its
    first image (padding rows are masked with `_mask` and their outputs dropped), so one shape compiles once."""
    import numpy as np  # noqa: PLC0415

    out: list[str] = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start : start + batch_size])
        size = min(batch_size, len(images))
        real = len(chunk)
        batch = predictor.prompt_batch(chunk + [chunk[0]] * (size - real), prompt)
        batch["_mask"] = np.arange(size) < real
        out.extend(predictor.generate(batch)[:real])
    return out


def predict_command(
    checkpoint: str,
    tokenizer: str | None,
    image_paths: Sequence[str],
    prompt: str,
    *,
    draw: str | None = None,
    sampler: str = "greedy",
    max_decode_len: int = 32,
    preset: str | None = None,
    res: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    dtype: str | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Prints `<path>\\t<prediction>` per image; draws detections with `draw`. Returns the exit code (0).

    Raises:
      FileNotFoundError / ValueError: a missing or bad image, checkpoint or tokenizer, a tokenizer that does not
        fit the model, a bad sampler or flag (each message names the file or flag); the CLI turns them into one
        `error: ...` line and exit code 2.
    """
    from paligemma_ft.decode import parse_sampler  # noqa: PLC0415 - lazy: only when the command runs.
    from paligemma_ft.evaluate.detection import parse_detections  # noqa: PLC0415
    from paligemma_ft.predictor import load_predictor  # noqa: PLC0415

    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    if not image_paths:
        raise ValueError("predict needs at least one --image")
    if not prompt.strip():
        raise ValueError("--prompt is empty; e.g. --prompt 'caption en'")
    if draw is not None and prompt.split()[0] not in DRAW_TASKS:
        raise ValueError(
            f"--draw needs a prompt that starts with {' or '.join(DRAW_TASKS)} (got {prompt!r}); "
            "other outputs have no boxes to draw"
        )
    if draw is not None and any(p.exists() and not p.is_dir() for p in Path(draw).parents):
        raise ValueError(f"--draw {draw}: cannot be written, a parent of it is a file")
    if max_decode_len < 1 or batch_size < 1:
        raise ValueError(f"--max-decode-len and --batch-size must be >= 1 (got {max_decode_len}, {batch_size})")
    if res is not None and res < 1:
        raise ValueError(f"--res must be >= 1, got {res}")
    parse_sampler(sampler)  # A bad --sampler fails before the model loads.
    images = read_images(image_paths)
    predictor = load_predictor(
        checkpoint,
        tokenizer,
        preset=preset,
        res=res,
        max_decode_len=max_decode_len,
        sampler=sampler,
        seed=seed,
        dtype=dtype,
    )
    prompt_tokens = len(predictor.tok.encode(prompt, add_bos=True)) + len(predictor.tok.sep_ids)
    predictor.prompt_len = max(predictor.prompt_len, prompt_tokens)  # A long prompt is never cut.
    predictions = predict_batched(predictor, images, prompt, batch_size)
    for path, text in zip(image_paths, predictions):
        print(f"{path}\t{_one_line(text)}", file=stdout, flush=True)
    if draw is not None:
        for out, image, text in zip(draw_paths(draw, len(images)), images, predictions):
            boxes, ok = parse_detections(text)
            try:
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                draw_boxes(image, boxes).save(out, format="PNG")
            except OSError as e:
                raise ValueError(f"--draw {out}: cannot be written ({e.strerror or e})") from None
            note = "" if ok else " (some segments were malformed and skipped)"
            print(f"wrote {out}: {len(boxes)} box(es){note}", file=stderr)
    return 0


def main(args: argparse.Namespace) -> int:
    """The `predict` command from parsed flags (see `add_arguments`)."""
    return predict_command(
        args.checkpoint,
        args.tokenizer,
        args.image,
        args.prompt,
        draw=args.draw,
        sampler=args.sampler,
        max_decode_len=args.max_decode_len,
        preset=args.preset,
        res=args.res,
        batch_size=args.batch_size,
        seed=args.seed,
        dtype=getattr(args, "dtype", None),
    )
