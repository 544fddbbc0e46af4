"""`paligemma-ft predict`: run a checkpoint on image files with one prompt, print one line per image.

    paligemma-ft predict --image a.jpg --image b.jpg --prompt "caption en"            # builtin:demo
    paligemma-ft predict --checkpoint ft.npz --tokenizer paligemma_tokenizer.model \\
        --image street.jpg --prompt "detect car ; person" --draw boxes.png

Output: `<image path>\\t<prediction>` per image on stdout, in the order given (tabs and newlines inside a
prediction are written as spaces, so every image is exactly one line). With a `detect ...` (or `segment ...`)
prompt, `--draw OUT.png` writes the image at its own size with the parsed boxes and labels drawn (and, for
`segment`, the masks filled: their `<seg>` codes decoded by the VQ-VAE codec `--codec`, default `oi` =
vae-oid.npz); with several images the files are `OUT_0.png`, `OUT_1.png`, ... (0-based, in `--image` order).
`--constrain detect|segment|refexp|refseg` decodes with a grammar that makes every output a well-formed
localization string (paligemma_ft/constrain.py). Notes go to stderr.

Images are read and checked before the model is loaded (`paligemma_ft.data.images`: regular files only, JPEG,
PNG, WebP, GIF, BMP or TIFF by content, within the size and pixel limits), and decoded in fixed-size batches (the
last one padded), so the decode function compiles once however many images there are. Predictions are printed
with control characters made visible, so a model output cannot send escape codes to the terminal.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from paligemma_ft.safety import printable

if TYPE_CHECKING:  # The CLI imports this module to build its parser: numpy, JAX and PIL load only when used.
    import numpy as np

    from paligemma_ft.evaluate.detection import Box

DRAW_TASKS = ("detect", "segment")  # Prompts whose outputs hold <loc> boxes.
CONSTRAIN_MODES = ("detect", "segment", "refexp", "refseg")  # constrain.MODES, without importing JAX.


def add_adapters_and_tokenizer(p: argparse.ArgumentParser) -> None:
    """`--adapters` and `--tokenizer`, as `predict` and `app` take them (next to their `--checkpoint`)."""
    p.add_argument(
        "--adapters",
        default=None,
        metavar="ADAPTERS.npz",
        help="a LoRA run's adapters.npz, merged into --checkpoint (its base); or pass it as --checkpoint alone",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="SPEC",
        help="SentencePiece .model path or builtin:tiny (default: the one with the checkpoint: in its Kaggle "
        "bundle or HF folder, the run's, builtin:tiny for builtin models)",
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `predict` flags (shared by the CLI and anything that wants to parse them)."""
    p.add_argument(
        "--checkpoint",
        default="builtin:demo",
        metavar="SPEC",
        help="builtin:demo (default), a big_vision .npz[:subtree], a run's workdir, an HF folder, hf:REPO or "
        "kaggle:HANDLE",
    )
    add_adapters_and_tokenizer(p)
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
    p.add_argument(
        "--constrain",
        default="",
        choices=("", *CONSTRAIN_MODES),
        help="decode with a grammar so every output is a well-formed localization string (default: off)",
    )
    p.add_argument(
        "--codec",
        default="oi",
        metavar="SPEC",
        help="mask codec for drawing segment outputs: oi (vae-oid.npz, the default) or a .npz path",
    )
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


def draw_boxes(image: np.ndarray, boxes: Sequence[Box], masks: Sequence[Any] | None = None) -> Any:
    """A PIL image of `image` (uint8[H, W, 3]) with each box outlined and labelled, one colour per label, and
    its mask (bool[H, W] per box, or None) filled half transparent."""
    from paligemma_ft.evaluate.draw import draw_objects  # noqa: PLC0415 - only when drawing.

    return draw_objects(image, boxes, masks)


def read_images(paths: Sequence[str]) -> list[np.ndarray]:
    """uint8[H, W, 3] per file, EXIF orientation applied (`paligemma_ft.data.images.load_image`: regular files of
    an allowed format, within the size and pixel limits).

    Raises:
      FileNotFoundError: a path that does not exist (named).
      ValueError: a folder, pipe or device, a file too large, empty, undecodable or of another format (named,
        with the reason).
    """
    from paligemma_ft.data.errors import BadExample  # noqa: PLC0415 - lazy: the CLI imports this module.
    from paligemma_ft.data.images import load_image  # noqa: PLC0415

    out = []
    for path in paths:
        try:
            out.append(load_image(path))
        except BadExample as e:
            if e.reason == "missing_image":
                raise FileNotFoundError(f"--image {path}: no such file") from None
            raise ValueError(f"--image {path}: {e.detail or e.reason} [{e.reason}]") from None
    return out


def _one_line(text: str) -> str:
    """One printable line: tabs and line breaks as spaces, other control characters (ANSI escapes) as `\\x1b`."""
    return printable(" ".join(text.replace("\t", " ").splitlines())) if text else ""


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
    constrain: str = "",
    codec: str = "oi",
    dtype: str | None = None,
    adapters: str | None = None,
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
    try:
        parse_sampler(sampler)  # A bad --sampler fails before the model loads.
    except ValueError as e:
        raise type(e)(f"--sampler: {e}") from None
    if constrain and constrain not in CONSTRAIN_MODES:
        raise ValueError(f"--constrain {constrain!r}: use one of {', '.join(CONSTRAIN_MODES)}")
    mask_codec = None
    if draw is not None and prompt.split()[0] == "segment":
        from paligemma_ft.model.vqvae import load_codec  # noqa: PLC0415 - a missing file fails before the model loads.

        mask_codec = load_codec(codec)
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
        adapters=adapters,
    )
    prompt_tokens = len(predictor.tok.encode(prompt, add_bos=True)) + len(predictor.tok.sep_ids)
    predictor.prompt_len = max(predictor.prompt_len, prompt_tokens)  # A long prompt is never cut.
    predictor.constrain = constrain
    predictions = predict_batched(predictor, images, prompt, batch_size)
    for path, text in zip(image_paths, predictions):
        print(f"{printable(path)}\t{_one_line(text)}", file=stdout, flush=True)
    if draw is not None:
        for out, image, text in zip(draw_paths(draw, len(images)), images, predictions):
            boxes, ok = parse_detections(text, require_label=constrain not in ("refexp", "refseg"))
            masks = None
            if mask_codec is not None:
                from paligemma_ft.evaluate.segmentation import predicted_masks  # noqa: PLC0415

                masks = predicted_masks(boxes, image.shape[0], image.shape[1], mask_codec)
            try:
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                draw_boxes(image, boxes, masks).save(out, format="PNG")
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
        constrain=args.constrain,
        codec=args.codec,
        dtype=getattr(args, "dtype", None),
        adapters=args.adapters,
    )
