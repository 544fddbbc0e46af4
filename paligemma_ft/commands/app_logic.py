"""What the demo app does, without Streamlit: read an upload, build a prompt, run the model, draw boxes.

The page (`paligemma_ft/commands/app.py`) only lays out widgets and calls these functions, so each behaviour, including
every refusal the page shows as a message, is testable as a plain function:

    image = read_upload(uploaded_bytes, "cat.jpg")          # uint8[H, W, 3]; UploadError with a message
    prompt = build_prompt("detect", "circle")                # "detect circle"
    result = run_prediction(predictor, image, prompt)        # text, seconds, boxes
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from paligemma_ft.data import shapes
from paligemma_ft.data.errors import BadExample
from paligemma_ft.data.images import decode_image
from paligemma_ft.errors import DEBUG_ENV, is_user_error
from paligemma_ft.safety import redact_text

# Limits for uploads. Streamlit refuses files above `server.maxUploadSize` (MB) before they reach the page (the
# launcher sets it to MAX_UPLOAD_MB); the page checks again, for `streamlit run` started by hand.
MAX_UPLOAD_MB = 20
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 1024 * 1024
MAX_PIXELS = 40_000_000  # ~ 6300 x 6300; the header is checked before any pixel is decoded.
IMAGE_TYPES = ("png", "jpg", "jpeg", "webp", "gif", "bmp", "tiff")  # `data.images.ALLOWED_FORMATS`, by content.

TASKS = ("caption", "question", "detect", "segment", "free prompt")
SAMPLERS = ("greedy", "temperature(0.7)", "top_k(40)", "nucleus(0.9)", "beam(3)")
SAMPLE_SEED, SAMPLE_SIZE, NUM_SAMPLES = 2, 256, 6  # Shapes scenes the demo model never trained on (seeds 0, 1).
DEFAULT_CHECKPOINT = "builtin:demo"

# The page reads its model from these environment variables (set by `paligemma-ft app`).
ENV_CHECKPOINT = "PALIGEMMA_FT_APP_CHECKPOINT"
ENV_TOKENIZER = "PALIGEMMA_FT_APP_TOKENIZER"
ENV_ADAPTERS = "PALIGEMMA_FT_APP_ADAPTERS"  # A LoRA run's adapters.npz, merged into the checkpoint.


class UploadError(ValueError):
    """An upload the app refuses; the message is shown in the page as it is."""


class ModelLoadError(ValueError):
    """The checkpoint or tokenizer cannot be loaded (missing, corrupt, truncated or pickled file, mismatch, missing
    Kaggle credentials); the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One model answer.

    Attributes:
      text: the decoded output (up to the first EOS).
      seconds: wall time of the call, including compilation on the first call of a shape / sampler.
      boxes: the `<loc>` boxes parsed from `text` (`paligemma_ft.evaluate.detection.Box`), for detection prompts.
      malformed: some `;`-separated part of a detection output could not be parsed.
    """

    text: str
    seconds: float
    boxes: tuple = ()
    malformed: bool = False


def read_upload(
    data: bytes, name: str = "upload", *, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """Decodes an uploaded file into `uint8[H, W, 3]`.

    Raises:
      UploadError: an empty or too large file, too many pixels, or something that is not a decodable image; the
        message names the file and what to do.
    """
    if len(data) > max_bytes:
        raise UploadError(
            f"{name} is {len(data) / 2**20:.1f} MB; the app accepts images up to "
            f"{max_bytes / 2**20:.0f} MB. Resize or re-encode it (e.g. as JPEG) and try again."
        )
    try:
        return decode_image(bytes(data), max_pixels=max_pixels)
    except BadExample as e:
        if e.reason == "decompression_bomb":
            detail = e.detail.split(";")[0].rstrip(". ")
            raise UploadError(
                f"{name} is too large ({detail}). The app accepts up to {max_pixels:,} pixels; downscale it first."
            ) from None
        if e.reason == "empty_image":
            raise UploadError(f"{name} is empty (0 bytes).") from None
        raise UploadError(
            f"{name} is not an image the app can read ({e.detail}). Upload a "
            f"{', '.join(t.upper() for t in IMAGE_TYPES)} file."
        ) from None


def sample_images(
    n: int = NUM_SAMPLES, *, seed: int = SAMPLE_SEED, size: int = SAMPLE_SIZE
) -> list[tuple[str, np.ndarray, str]]:
    """`n` generated shapes scenes as `(name, uint8[size, size, 3], reference caption)`."""
    out = []
    for i in range(n):
        example = shapes.make_example(seed, i, "caption", size)
        out.append((f"sample {i + 1}", example["image"], example["suffix"]))
    return out


def build_prompt(task: str, text: str = "", *, lang: str = "en") -> str:
    """The PaliGemma prompt for a task.

    `caption` -> "caption en"; `question` -> "answer en <text>"; `detect` -> "detect <text>" (several objects
    joined with " ; "); `free prompt` -> `text` as it is.

    Raises:
      UploadError: a task that needs text (question, detect, free prompt) got none.
    """
    text = " ".join(text.split())
    if task == "caption":
        return f"caption {lang}"
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if not text:
        what = {
            "question": "a question",
            "detect": "what to detect (e.g. circle ; square)",
            "segment": "what to segment (e.g. circle)",
            "free prompt": "a prompt",
        }[task]
        raise UploadError(f"Type {what} first.")
    if task == "question":
        return f"answer {lang} {text}"
    if task in ("detect", "segment"):
        return f"{task} {text}"
    return text


def is_detection(prompt: str) -> bool:
    """True for prompts whose answers are `<loc>` boxes (`detect ...`, `segment ...`)."""
    return prompt.split(" ", 1)[0] in ("detect", "segment")


def run_prediction(
    predictor: Any, image: np.ndarray, prompt: str, *, sampler: str = "greedy", max_decode_len: int = 32
) -> Prediction:
    """Runs `predictor` (a `paligemma_ft.predictor.Predictor`) on one `uint8[H, W, 3]` image.

    Raises:
      ValueError: a bad sampler spec (the message says which forms exist).
    """
    from paligemma_ft.evaluate.detection import parse_detections  # noqa: PLC0415

    start = time.perf_counter()
    text = predictor.predict_images([image], prompt, sampler=sampler, max_decode_len=int(max_decode_len))[0]
    seconds = time.perf_counter() - start
    if not is_detection(prompt):
        return Prediction(text, seconds)
    boxes, ok = parse_detections(text)
    return Prediction(text, seconds, tuple(boxes), malformed=not ok)


def draw_prediction(image: np.ndarray, prediction: Prediction, codec: Any = None) -> Any:
    """A PIL image of `image` with the prediction's boxes drawn and labelled, and with a mask codec (`mask_codec`)
    the masks of `<seg>` outputs filled."""
    from paligemma_ft.commands.predict import draw_boxes  # noqa: PLC0415 - the same drawing as `paligemma-ft predict`.

    masks = None
    if codec is not None and any(b.seg for b in prediction.boxes):
        from paligemma_ft.evaluate.segmentation import predicted_masks  # noqa: PLC0415

        masks = predicted_masks(prediction.boxes, image.shape[0], image.shape[1], codec)
    return draw_boxes(image, prediction.boxes, masks)


def mask_codec(spec: str = "oi") -> tuple[Any, str | None]:
    """`(codec, None)`, or `(None, why)` when the VQ-VAE mask codec cannot be loaded (masks are then not drawn)."""
    from paligemma_ft.model.vqvae import load_codec  # noqa: PLC0415

    try:
        return load_codec(spec), None
    except (FileNotFoundError, ValueError) as e:
        return None, f"Masks are not drawn: {e}"


def load_model(checkpoint: str, tokenizer: str | None, adapters: str | None = None) -> tuple[Any, list[str]]:
    """`(Predictor, warnings)` for a checkpoint spec and tokenizer spec (None: the one found with the checkpoint),
    with a LoRA run's `adapters` merged in when given.

    Raises:
      ModelLoadError: a missing checkpoint or tokenizer, an unreadable, corrupt, truncated or pickled file, a
        checkpoint or tokenizer that does not fit the model, missing Kaggle credentials; the message names them.
        Other exceptions are bugs and propagate (Streamlit shows their traceback), as does every error when
        `PALIGEMMA_FT_DEBUG=1`.
    """
    from paligemma_ft.predictor import load_predictor  # noqa: PLC0415 - JAX loads only when a model is needed.

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            predictor = load_predictor(checkpoint, tokenizer or None, adapters=adapters or None)
        except Exception as e:  # noqa: BLE001 - user errors become a message in the page; bugs are re-raised.
            if not is_user_error(e) or os.environ.get(DEBUG_ENV):
                raise
            text = redact_text(str(e))
            tok = tokenizer or "(found with the checkpoint)"
            with_adapters = f" and adapters {adapters!r}" if adapters else ""
            raise ModelLoadError(
                f"Cannot load checkpoint {checkpoint!r} with tokenizer {tok}{with_adapters}: {text}"
            ) from None
    return predictor, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def model_specs(environ: dict[str, str] | Any) -> tuple[str, str | None]:
    """`(checkpoint, tokenizer)` the page should load, from its environment (the launcher's flags)."""
    return environ.get(ENV_CHECKPOINT) or DEFAULT_CHECKPOINT, environ.get(ENV_TOKENIZER) or None


def adapters_spec(environ: dict[str, str] | Any) -> str | None:
    """The LoRA `adapters.npz` the page should merge into its checkpoint (`--adapters`), or None."""
    return environ.get(ENV_ADAPTERS) or None


def streamlit_command(
    page: str, port: int | None = None, *, address: str = "127.0.0.1", headless: bool = True
) -> list[str]:
    """The `streamlit run` argument list for the page (upload limit, no usage statistics, local address)."""
    import sys  # noqa: PLC0415

    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        page,
        "--server.maxUploadSize",
        str(MAX_UPLOAD_MB),
        "--server.address",
        address,
        "--browser.gatherUsageStats",
        "false",
        "--server.headless",
        "true" if headless else "false",
        "--client.toolbarMode",
        "viewer",
    ]
    if port is not None:
        cmd += ["--server.port", str(int(port))]
    return cmd


def describe_boxes(boxes: Sequence[Any]) -> list[str]:
    """One line per box: `label: y0 x0 y1 x1` as fractions of the image size."""
    return [f"{b.label}: y {b.y0:.3f}-{b.y1:.3f}, x {b.x0:.3f}-{b.x1:.3f}" for b in boxes]
