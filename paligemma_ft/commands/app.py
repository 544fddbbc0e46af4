"""The demo app: a Streamlit page that runs a PaliGemma checkpoint on an uploaded or generated image.

    paligemma-ft app                                   # the bundled demo model (builtin:demo)
    paligemma-ft app --checkpoint runs/demo --tokenizer builtin:tiny
    paligemma-ft app --checkpoint ft.npz --tokenizer paligemma_tokenizer.model --port 8502

Pick a generated sample or upload an image, choose a task (caption, question, detect: boxes drawn on the image,
segment: boxes and their masks filled, decoded by the VQ-VAE codec vae-oid.npz when it is present, or a free
prompt) and the decoding options, and see the answer with its latency. Bad uploads (not an image, too
large, too many pixels, a format outside the allow-list) and a checkpoint that cannot be loaded (missing, corrupt,
truncated, pickled, or a tokenizer that does not fit it) are shown as messages in the page, with secrets masked;
`PALIGEMMA_FT_DEBUG=1` shows the traceback of a failed answer instead. The logic lives in
`paligemma_ft.commands.app_logic`; this file only lays out the page.

`streamlit run paligemma_ft/commands/app.py` works too: the model then comes from the environment variables
`PALIGEMMA_FT_APP_CHECKPOINT` and `PALIGEMMA_FT_APP_TOKENIZER` (what `paligemma-ft app` sets), default the
demo model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from paligemma_ft.commands import app_logic as logic
from paligemma_ft.errors import DEBUG_ENV
from paligemma_ft.safety import redact_text

_DEFAULT_TEXT = {
    "question": "how many circles are there?",
    "detect": "circle",
    "segment": "circle",
    "free prompt": "caption en",
}


def _cached_model(checkpoint: str, tokenizer: str | None, adapters: str | None) -> tuple[Any, list[str]]:
    import streamlit as st  # noqa: PLC0415

    @st.cache_resource(show_spinner="Loading the model (the first answer also compiles it)...")
    def load(checkpoint: str, tokenizer: str | None, adapters: str | None) -> tuple[Any, list[str]]:
        return logic.load_model(checkpoint, tokenizer, adapters)  # A ModelLoadError is raised, not cached.

    return load(checkpoint, tokenizer, adapters)


def _choose_image(st: Any) -> tuple[Any, str | None] | None:
    """The image to run on and its reference caption (samples only); None after showing why there is none."""
    source = st.radio("Image", ["generated sample", "upload"], horizontal=True)
    if source == "generated sample":
        samples = st.cache_data(logic.sample_images)()
        name = st.selectbox("Sample", [s[0] for s in samples])
        _, image, reference = next(s for s in samples if s[0] == name)
        return image, reference
    # No `type=` filter: Streamlit would raise on another extension; the content decides, with a message.
    upload = st.file_uploader(f"Image ({', '.join(logic.IMAGE_TYPES).upper()}; up to {logic.MAX_UPLOAD_MB} MB)")
    if upload is None:
        st.info("Upload an image to run the model on it.")
        return None
    try:
        return logic.read_upload(upload.getvalue(), upload.name), None
    except logic.UploadError as e:
        st.error(str(e))
        return None


def render_page() -> None:
    """Draws the page (Streamlit runs this file top to bottom on every interaction)."""
    import streamlit as st  # noqa: PLC0415

    st.set_page_config(page_title="PaliGemma demo", layout="wide")
    st.title("PaliGemma fine-tune demo")
    checkpoint, tokenizer = logic.model_specs(os.environ)
    adapters = logic.adapters_spec(os.environ)
    with_adapters = f" · adapters `{adapters}`" if adapters else ""
    st.caption(f"checkpoint `{checkpoint}` · tokenizer `{tokenizer or '(found with the checkpoint)'}`{with_adapters}")

    with st.sidebar:
        st.header("Decoding")
        sampler = st.selectbox(
            "Sampler", logic.SAMPLERS, help="greedy is deterministic; the others sample (beam keeps the best of n)"
        )
        max_len = st.slider("Max output tokens", 1, 128, 32)

    try:
        predictor, load_warnings = _cached_model(checkpoint, tokenizer, adapters)
    except logic.ModelLoadError as e:
        st.error(str(e))
        st.stop()
        return
    for message in load_warnings:
        st.warning(message)

    left, right = st.columns(2)
    with left:
        chosen = _choose_image(st)
    with right:
        task = st.radio("Task", logic.TASKS, horizontal=True)
        text = (
            st.text_input("Question / objects / prompt", _DEFAULT_TEXT[task], key=f"text_{task}")
            if task != "caption"
            else ""
        )
    if chosen is None:
        return
    image, reference = chosen
    try:
        prompt = logic.build_prompt(task, text)
        result = logic.run_prediction(predictor, image, prompt, sampler=sampler, max_decode_len=max_len)
    except logic.UploadError as e:
        st.warning(str(e))
        return
    except Exception as e:  # noqa: BLE001 - the page shows every failure as a message, never a traceback.
        if os.environ.get(DEBUG_ENV):
            raise
        st.error(f"The model failed on this input: {type(e).__name__}: {redact_text(str(e))}")
        return

    codec, codec_note = logic.mask_codec() if any(b.seg for b in result.boxes) else (None, None)
    with left:
        shown = logic.draw_prediction(image, result, codec) if result.boxes else image
        st.image(shown, caption="input" if not result.boxes else "input with the detected boxes", width=384)
    with right:
        st.markdown(f"**Prompt:** `{prompt}`")
        st.subheader("Output")
        st.code(result.text or "(empty)", language=None, wrap_lines=True)
        st.metric(
            "Latency",
            f"{result.seconds * 1000:.0f} ms",
            help="Wall time of this call. The first call for a new image size, length or sampler also "
            "compiles the decoder (seconds); later calls reuse it.",
        )
        if reference is not None:
            st.markdown(f"**Reference caption of this sample:** {reference}")
        if logic.is_detection(prompt):
            if result.boxes:
                st.markdown("\n".join(f"- {line}" for line in logic.describe_boxes(result.boxes)))
            else:
                st.info("No boxes in the output.")
            if result.malformed:
                st.warning("Part of the output is not in PaliGemma's `<loc>` box format and was skipped.")
            if codec_note:
                st.info(codec_note)


def launch(
    checkpoint: str = logic.DEFAULT_CHECKPOINT,
    tokenizer: str | None = None,
    *,
    port: int | None = None,
    adapters: str | None = None,
) -> int:
    """`paligemma-ft app`: runs `streamlit run` on this page with the model given; returns its exit code.

    Args:
      checkpoint: a checkpoint spec (`builtin:demo`, a `.npz`, a run's workdir, `kaggle:<handle>`).
      tokenizer: a tokenizer spec; None for the builtin model's own.
      port: the local port (default: Streamlit's, 8501).
      adapters: a LoRA run's `adapters.npz`, merged into `checkpoint` (its base).
    """
    try:
        import streamlit  # noqa: F401, PLC0415
    except ImportError:
        print("error: the app needs Streamlit: pip install 'paligemma-ft[app]'", file=sys.stderr)
        return 2
    env = {**os.environ, logic.ENV_CHECKPOINT: checkpoint}
    if tokenizer:
        env[logic.ENV_TOKENIZER] = tokenizer
    else:
        env.pop(logic.ENV_TOKENIZER, None)
    if adapters:
        env[logic.ENV_ADAPTERS] = adapters
    else:
        env.pop(logic.ENV_ADAPTERS, None)
    cmd = logic.streamlit_command(os.path.abspath(__file__), port)
    print(f"Starting the app on {checkpoint} (Ctrl+C stops it): {' '.join(cmd[1:])}", file=sys.stderr)
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":  # `streamlit run` executes this file as __main__.
    render_page()
