"""The demo app: its logic as plain functions, the page driven by Streamlit's AppTest, the `paligemma-ft app`
command, and a screenshot of the served page through headless Chromium (`.ci/run` installs Debian's `chromium`;
the test fails, it does not skip, where it is missing).

AppTest runs the page in this process: uploads go through `at.file_uploader[0].upload(...)` (supported by the
installed Streamlit), the sample picker through the radio and select box.
"""

import base64
import contextlib
import html
import io
import json
import os
import pathlib
import re
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
import zlib

import numpy as np
import pytest
import websockets.sync.client
from PIL import Image
from streamlit.testing import v1 as st_testing  # The test extra installs Streamlit: no skip without it.

from paligemma_ft.checkpoints import npz as ckpt_lib
from paligemma_ft.commands import app, app_logic, cli
from paligemma_ft.data import shapes

PAGE = app.__file__
TIMEOUT = 240  # Seconds for one AppTest run: the first one loads the demo model and compiles its decoder.


def png_bytes(image: np.ndarray) -> bytes:
    return shapes.encode_image(image, "png")


def huge_png_header(width: int = 20_000, height: int = 20_000) -> bytes:
    """A tiny file whose PNG header claims `width x height` pixels (a decompression bomb in miniature)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


class FixedPredictor:
    """Answers every prompt with one string (to drive the detection path without a trained detector)."""

    def __init__(self, text: str):
        self.text, self.calls = text, []

    def predict_images(self, images, prompt, **kw):
        self.calls.append((len(images), prompt, kw))
        return [self.text for _ in images]


@pytest.fixture(scope="module")
def demo():
    from paligemma_ft.predictor import load_predictor

    return load_predictor("builtin:demo")


def run_page(monkeypatch, checkpoint=None, tokenizer=None):
    for name, value in ((app_logic.ENV_CHECKPOINT, checkpoint), (app_logic.ENV_TOKENIZER, tokenizer)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    return st_testing.AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()


def labelled(widgets, label):
    (widget,) = [w for w in widgets if w.label == label]
    return widget


def assert_no_traceback(at):
    assert not at.exception, [e.message for e in at.exception]


# ----------------------------------------------------------------------------------------------- pure logic


def test_read_upload_accepts_images_and_explains_refusals():
    image = shapes.make_example(3, 0, "caption", 40)["image"]
    assert np.array_equal(app_logic.read_upload(png_bytes(image), "a.png"), image)
    with pytest.raises(app_logic.UploadError, match=r"notes.txt is not an image the app can read"):
        app_logic.read_upload(b"just some text\n", "notes.txt")
    with pytest.raises(app_logic.UploadError, match="empty"):
        app_logic.read_upload(b"", "empty.png")
    # Over the app's limit (checked from the header), and over PIL's own bomb limit (refused while opening).
    with pytest.raises(app_logic.UploadError, match=r"big.png is too large \(image of 8000x8000 .*40,000,000 pix"):
        app_logic.read_upload(huge_png_header(8000, 8000), "big.png")
    with pytest.raises(app_logic.UploadError, match=r"bigger.png is too large \(.*400000000 pixels.*downscale"):
        app_logic.read_upload(huge_png_header(), "bigger.png")
    with pytest.raises(app_logic.UploadError, match=r"up to 0 MB"):  # The byte limit is checked before decoding.
        app_logic.read_upload(png_bytes(image), "a.png", max_bytes=100)
    truncated = png_bytes(image)[:-30]
    with pytest.raises(app_logic.UploadError, match="cut.png is not an image"):
        app_logic.read_upload(truncated, "cut.png")


def test_build_prompt():
    assert app_logic.build_prompt("caption", "ignored") == "caption en"
    assert app_logic.build_prompt("question", " how many  circles? ") == "answer en how many circles?"
    assert app_logic.build_prompt("detect", "circle ; square") == "detect circle ; square"
    assert app_logic.build_prompt("free prompt", "ocr") == "ocr"
    for task in ("question", "detect", "free prompt"):
        with pytest.raises(app_logic.UploadError, match="Type"):
            app_logic.build_prompt(task, "  ")
    with pytest.raises(ValueError, match="unknown task"):
        app_logic.build_prompt("translate", "x")


def test_detection_boxes_are_parsed_and_drawn():
    image = np.full((100, 200, 3), 255, np.uint8)
    fake = FixedPredictor("<loc0102><loc0205><loc0511><loc0614> circle ; junk")
    result = app_logic.run_prediction(fake, image, "detect circle", sampler="top_k(40)", max_decode_len=20)
    assert fake.calls == [(1, "detect circle", {"sampler": "top_k(40)", "max_decode_len": 20})]
    (box,) = result.boxes
    assert box.label == "circle" and result.malformed and result.seconds >= 0
    assert (box.y0, box.x0) == pytest.approx((102 / 1023, 205 / 1023))
    drawn = np.asarray(app_logic.draw_prediction(image, result))
    assert drawn.shape == image.shape
    # The outline sits on the box's edges: the left edge column is drawn, the box's centre stays white.
    x0, y0, y1 = round(box.x0 * 200), round(box.y0 * 100), round(box.y1 * 100)
    assert (drawn[y0 + 5 : y1 - 5, x0] != 255).any(axis=-1).all()
    assert (drawn[(y0 + y1) // 2, round((box.x0 + box.x1) * 100)] == 255).all()
    plain = app_logic.run_prediction(FixedPredictor("a red circle"), image, "caption en")
    assert plain.boxes == () and not plain.malformed


def test_load_model_reports_missing_files_and_mismatches(tmp_path, demo):
    with pytest.raises(app_logic.ModelLoadError, match=r"nowhere.npz"):
        app_logic.load_model(str(tmp_path / "nowhere.npz"), None)
    small = small_vocab_checkpoint(tmp_path)
    with pytest.raises(app_logic.ModelLoadError, match=r"pieces but the model .* embeds only 1000"):
        app_logic.load_model(str(small), "builtin:tiny")
    with pytest.raises(app_logic.ModelLoadError, match="needs a tokenizer"):
        app_logic.load_model(str(small), None)


def small_vocab_checkpoint(tmp_path):
    """The demo checkpoint with its vocabulary cut to 1000 rows: too small for the tiny tokenizer."""
    from paligemma_ft.checkpoints.loading import checkpoint_path

    params = ckpt_lib.load_params(checkpoint_path("builtin:demo"))
    emb = params["llm"]["embedder"]["input_embedding"]
    params["llm"]["embedder"]["input_embedding"] = emb[:1000]
    ckpt_lib.save_params(tmp_path / "small_vocab.npz", params)
    return tmp_path / "small_vocab.npz"


# ----------------------------------------------------------------------------------------------- the page


def test_page_captions_a_sample_and_an_upload(monkeypatch, demo):
    at = run_page(monkeypatch)
    assert_no_traceback(at)
    assert not at.error
    sample_name, sample, reference = app_logic.sample_images()[0]
    assert labelled(at.selectbox, "Sample").value == sample_name
    expected = demo.predict_images([sample], "caption en")[0]
    assert [c.value for c in at.code] == [expected or "(empty)"]
    assert at.metric[0].label == "Latency" and at.metric[0].value.endswith(" ms")
    assert at.image[0].captions == ["input"]
    assert any(reference in m.value for m in at.markdown)

    labelled(at.radio, "Image").set_value("upload").run()
    assert [i.value for i in at.info] == ["Upload an image to run the model on it."] and not at.code
    image = shapes.make_example(11, 4, "caption", 96)["image"]
    at.file_uploader[0].upload("scene.png", png_bytes(image), "image/png").run()
    assert_no_traceback(at)
    assert [c.value for c in at.code] == [demo.predict_images([image], "caption en")[0] or "(empty)"]


def test_page_shows_messages_for_bad_uploads(monkeypatch, demo):
    at = run_page(monkeypatch)
    labelled(at.radio, "Image").set_value("upload").run()
    cases = [
        ("notes.txt", b"not an image at all", "text/plain", "is not an image the app can read"),
        ("photo.png", b"\x89PNG\r\n\x1a\n garbage", "image/png", "is not an image the app can read"),
        ("bomb.png", huge_png_header(), "image/png", "is too large"),
        ("empty.jpg", b"", "image/jpeg", "is empty"),
        ("drawing.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n", "image/jpeg", "looks like EPS"),
    ]
    for name, data, mime, phrase in cases:
        at.file_uploader[0].set_value((name, data, mime)).run()
        assert_no_traceback(at)
        assert len(at.error) == 1 and name in at.error[0].value and phrase in at.error[0].value, name
        assert not at.code  # Nothing was run on a refused upload.


def test_page_shows_model_errors(monkeypatch, tmp_path):
    small = small_vocab_checkpoint(tmp_path)
    at = run_page(monkeypatch, checkpoint=str(small), tokenizer="builtin:tiny")
    assert_no_traceback(at)
    assert len(at.error) == 1 and "embeds only 1000" in at.error[0].value and not at.code
    at = run_page(monkeypatch, checkpoint=str(tmp_path / "missing.npz"))
    assert_no_traceback(at)
    assert "missing.npz" in at.error[0].value and "does not exist" in at.error[0].value
    # Damaged files: garbage, cut in half, pickled arrays.
    demo_bytes = small.read_bytes()
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04" + b"garbage" * 50)
    (tmp_path / "truncated.npz").write_bytes(demo_bytes[: len(demo_bytes) // 2])
    np.savez(tmp_path / "pickled.npz", **{"img/x": np.array([{"a": 1}], dtype=object)})
    for name, phrase in (
        ("garbage", "not a readable .npz"),
        ("truncated", "not a readable .npz"),
        ("pickled", "pickled Python objects"),
    ):
        at = run_page(monkeypatch, checkpoint=str(tmp_path / f"{name}.npz"), tokenizer="builtin:tiny")
        assert_no_traceback(at)
        assert len(at.error) == 1 and f"{name}.npz" in at.error[0].value and phrase in at.error[0].value, name
        assert not at.code
    monkeypatch.setenv("PALIGEMMA_FT_DEBUG", "1")  # Then the page shows the traceback instead.
    at = run_page(monkeypatch, checkpoint=str(tmp_path / "garbage.npz"), tokenizer="builtin:tiny")
    assert len(at.exception) == 1 and "garbage.npz" in at.exception[0].message and not at.error


def test_page_tasks_options_and_detections(monkeypatch):
    """Tasks and decoding options reach the model; detections are listed and drawn (a fixed-answer model)."""
    fake = FixedPredictor("<loc0100><loc0100><loc0600><loc0500> circle")
    monkeypatch.setattr(app_logic, "load_model", lambda *specs: (fake, ["a load warning"]))
    at = run_page(monkeypatch, checkpoint="fake:detector")  # A checkpoint name of its own: not cached before.
    assert fake.calls[-1] == (1, "caption en", {"sampler": "greedy", "max_decode_len": 32})
    labelled(at.radio, "Task").set_value("question").run()
    at.text_input[0].set_value("how many squares are there?").run()
    labelled(at.sidebar.selectbox, "Sampler").set_value("nucleus(0.9)").run()
    at.sidebar.slider[0].set_value(5).run()
    assert fake.calls[-1] == (
        1,
        "answer en how many squares are there?",
        {"sampler": "nucleus(0.9)", "max_decode_len": 5},
    )
    assert any("`answer en how many squares are there?`" in m.value for m in at.markdown)
    at.text_input[0].set_value("  ").run()
    assert [w.value for w in at.warning][-1] == "Type a question first."
    labelled(at.radio, "Task").set_value("detect").run()
    assert_no_traceback(at)
    assert fake.calls[-1][1] == "detect circle"
    assert [w.value for w in at.warning] == ["a load warning"]
    assert any("circle: y 0.098-0.587" in m.value for m in at.markdown)
    assert at.image[0].captions == ["input with the detected boxes"]


# ----------------------------------------------------------------------------------------------- the command


def test_app_command_launches_streamlit_with_the_model(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 0)
    assert cli.main(["app", "--checkpoint", "runs/x", "--tokenizer", "tok.model", "--port", "8600"]) == 0
    ((cmd, env),) = calls
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4] == PAGE
    flags = dict(zip(cmd[5::2], cmd[6::2]))
    assert flags["--server.port"] == "8600" and flags["--server.maxUploadSize"] == str(app_logic.MAX_UPLOAD_MB)
    assert flags["--server.address"] == "127.0.0.1" and flags["--browser.gatherUsageStats"] == "false"
    assert env[app_logic.ENV_CHECKPOINT] == "runs/x" and env[app_logic.ENV_TOKENIZER] == "tok.model"
    assert cli.main(["app"]) == 0
    assert calls[-1][1][app_logic.ENV_CHECKPOINT] == "builtin:demo" and app_logic.ENV_TOKENIZER not in calls[-1][1]
    assert cli.main(["app", "--config.seed=1"]) == 2
    assert "app takes no --config overrides" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- screenshot


def _chromium() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log_path: pathlib.Path, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"streamlit exited with {proc.returncode}: {log_path.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"streamlit did not answer {url} within {seconds} s")


class _Chromium:
    """Headless Chromium driven over the DevTools protocol (`websockets`, which Streamlit brings): the page is
    polled in real time. (`--dump-dom` with a virtual-time budget ends a visit within about a second whatever the
    server is doing, so whether the answer was drawn was luck.)"""

    def __init__(self, chromium: str, profile: pathlib.Path):
        port = _free_port()
        self.proc = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "--window-size=1280,900",
                f"--remote-debugging-port={port}",
                "--remote-allow-origins=*",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline, self.ws, self.calls, self.exits = time.monotonic() + 60, None, 0, contextlib.ExitStack()
        while self.ws is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    pages = [t for t in json.load(r) if t.get("type") == "page"]
                url = pages[0]["webSocketDebuggerUrl"]
                self.ws = self.exits.enter_context(websockets.sync.client.connect(url, max_size=None))
            except (OSError, IndexError, ValueError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise AssertionError(f"Chromium's DevTools did not answer on port {port}") from None
                time.sleep(0.5)
        self.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params) -> dict:
        self.calls += 1
        self.ws.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:  # Events arrive in between; the answer carries our id.
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.calls:
                assert "error" not in msg, (method, msg["error"])
                return msg["result"]

    def dom(self) -> str:
        page = "document.documentElement ? document.documentElement.outerHTML : ''"  # '' while navigating.
        return self.call("Runtime.evaluate", expression=page, returnByValue=True)["result"].get("value", "")

    def screenshot(self) -> np.ndarray:
        png = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

    def close(self) -> None:
        self.exits.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _shows_image(pixels: np.ndarray, image: np.ndarray) -> bool:
    """True when every colour covering >= 2 % of `image` (background and shapes) appears in the screenshot."""
    colours, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
    shot = pixels.reshape(-1, 3).astype(int)
    main = colours[counts >= 0.02 * counts.sum()].astype(int)
    return len(main) >= 3 and all((np.abs(shot - c).max(axis=1) <= 3).any() for c in main)


@pytest.mark.slow
def test_screenshot_of_the_served_page(tmp_path, demo):
    chromium = _chromium()
    if chromium is None:
        pytest.fail("Chromium is not installed: apt-get install -y chromium (.ci/run installs it)")
    _, sample, reference = app_logic.sample_images()[0]
    expected = demo.predict_images([sample], "caption en")[0]
    port = _free_port()
    env = {**os.environ, app_logic.ENV_CHECKPOINT: "builtin:demo", "HOME": str(tmp_path)}
    # The server writes to a file: a pipe nobody reads during the visits fills up and blocks the server.
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            app_logic.streamlit_command(PAGE, port),
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp_path,
        )
    wanted = [
        "PaliGemma fine-tune demo",
        "checkpoint builtin:demo",
        "Prompt: caption en",
        "Output",
        expected,
        "Latency",
        f"Reference caption of this sample: {reference}",
    ]
    text, pixels, polls, browser = "", None, 0, None
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(f"{base}/_stcore/health", proc, log_path)
        browser = _Chromium(chromium, tmp_path / "profile")
        browser.call("Page.navigate", url=base)
        # The first run loads the model and compiles the decoder, and the browser draws the page's parts in no fixed
        # order (the latency can be drawn before the answer). Poll until every part is there and the screenshot
        # shows the sample image; after 300 s the checks below say what is missing.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            polls += 1
            text = " ".join(re.sub(r"<[^>]+>", " ", browser.dom()).split())  # What the page says, no markup.
            if all(html.escape(words, quote=False) in text for words in wanted):
                pixels = browser.screenshot()
                if _shows_image(pixels, sample):
                    break
            time.sleep(1)
    finally:
        if browser is not None:
            browser.close()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    page = text[text.find("PaliGemma fine-tune demo") :]
    server_log = log_path.read_text(errors="replace")[-3000:]
    for words in wanted:
        assert html.escape(words, quote=False) in text, (
            f"{words!r} not on the page after {polls} polls: {page}\n{server_log}"
        )
    assert pixels is not None
    Image.fromarray(pixels).save(tmp_path / "page.png")  # To look at after a run (pytest keeps tmp_path).
    assert pixels.shape == (900, 1280, 3)
    assert _shows_image(pixels, sample)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)  # Text, widgets and the image: many colours.
    assert len(colours) > 200, len(colours)
