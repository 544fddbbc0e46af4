"""Hostile image files: an allow-list of formats (EPS never reaches Ghostscript), pixel counts checked from the
header for every allowed format, only regular files read (pipes, devices, folders refused without hanging), and a
size cap checked before reading. Every entry point goes through `paligemma_ft.data.images`: training and
evaluation data, `paligemma-ft predict`, app uploads and gallery thumbnails."""

import io
import json
import os
import struct
import subprocess
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, ImageFile

from paligemma_ft.commands import app_logic, cli
from paligemma_ft.data import images, pipeline
from paligemma_ft.data.errors import BadExample
from paligemma_ft.evaluate import report as eval_report
from paligemma_ft.tokenizer import Tokenizer

EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 16 16
%%EndComments
newpath 0 0 moveto 16 16 lineto stroke
showpage
%%EOF
"""


def encode(fmt: str, size=(8, 8), **kw) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(out, fmt, **kw)
    return out.getvalue()


def finishes(fn, seconds: float = 10.0):
    """Runs `fn` in a daemon thread; returns (finished in time, its result or exception). A hang fails the test
    instead of hanging the suite."""
    result: list = []

    def target():
        try:
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the test.
            result.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    return (not thread.is_alive()), (result[0] if result else None)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_spec("builtin:tiny")


def one_image_dataset(tmp_path, image_name: str) -> dict:
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": image_name, "suffix": "a caption"}) + "\n")
    return {"source": "jsonl", "path": str(tmp_path / "d.jsonl")}


def first_bad(tmp_path, tok, image_name: str, **input_kw) -> tuple[bool, list]:
    """(whether the row is scored, the bad-input entries) after one evaluation pass over a one-image dataset."""
    data = one_image_dataset(tmp_path, image_name)
    cfg = {"data": data, "res": 16, "text_len": 16, "batch_size": 1, "num_workers": 0, **input_kw}
    report = pipeline.BadInputReport()
    batches = pipeline.make_eval_batches(data, cfg, tok, 1, process_index=0, process_count=1, report=report)
    (batch,) = list(batches)
    return bool(batch["_mask"][0]), report.entries


# ------------------------------------------------------------------------------------------------ allow-list


@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch):
    """A stand-in `gs` first on PATH that records every call (and fails the render). Returns the record file."""
    bin_dir, record = tmp_path / "bin", tmp_path / "gs_calls.txt"
    bin_dir.mkdir()
    gs = bin_dir / "gs"
    gs.write_text(f'#!/bin/sh\necho "$@" >> {record}\n[ "$1" = "--version" ] && exit 0\nexit 1\n')
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # PIL looks for gs again.
    return record


def test_eps_named_jpg_never_reaches_ghostscript(tmp_path, tok, fake_ghostscript, monkeypatch, capsys):
    eps = tmp_path / "photo.jpg"
    eps.write_bytes(EPS)
    # The stand-in is real: PIL without an allow-list hands this file to it.
    with pytest.raises(subprocess.CalledProcessError), Image.open(eps) as im:
        im.load()  # The stand-in's render "fails".
    assert "--version" in fake_ghostscript.read_text() and "-sDEVICE" in fake_ghostscript.read_text()
    fake_ghostscript.unlink()
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)

    # Training / evaluation data, predict input, an app upload, a gallery thumbnail: all refused, gs never run.
    assert first_bad(tmp_path, tok, "photo.jpg") == (False, [(str(tmp_path / "d.jsonl"), 1, "unreadable_image")])
    with pytest.raises(BadExample, match=r"looks like EPS, which is not read") as info:
        images.load_image(eps)
    assert info.value.reason == "unreadable_image" and str(eps) in str(info.value)
    assert cli.main(["predict", "--image", str(eps), "--prompt", "caption en"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --image {eps}: not an image in an allowed format") and "EPS" in err
    with pytest.raises(app_logic.UploadError, match=r"photo.jpg is not an image the app can read .*EPS"):
        app_logic.read_upload(EPS, "photo.jpg")
    assert eval_report._thumbnail(str(eps), None) is None
    assert not fake_ghostscript.exists()


@pytest.mark.parametrize("fmt", ["PPM", "PCX", "TGA", "ICO", "SGI"])
def test_formats_outside_the_allow_list_are_refused_by_content(fmt):
    with pytest.raises(BadExample, match=r"allowed format \(JPEG, PNG, WebP, GIF, BMP, TIFF\)") as info:
        images.decode_image(encode(fmt))
    assert info.value.reason == "unreadable_image"


@pytest.mark.parametrize("fmt", images.ALLOWED_FORMATS)
def test_every_allowed_format_decodes(fmt):
    image = images.decode_image(encode(fmt, (10, 6), **({"lossless": True} if fmt == "WEBP" else {})))
    assert image.shape == (6, 10, 3) and image.dtype == np.uint8


# --------------------------------------------------------------------------------------- pixels from the header


def _patch_jpeg(data: bytearray, w: int, h: int) -> None:
    i = 2
    while data[i + 1] not in (0xC0, 0xC1, 0xC2):  # Walk the markers to the frame header (SOF).
        i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    data[i + 5 : i + 9] = struct.pack(">HH", h, w)


def _patch_png(data: bytearray, w: int, h: int) -> None:
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))


def _patch_gif(data: bytearray, w: int, h: int) -> None:
    data[6:10] = struct.pack("<HH", w, h)  # Logical screen.
    i = data.index(b"\x2c", 13)  # Image descriptor.
    data[i + 5 : i + 9] = struct.pack("<HH", w, h)


def _patch_bmp(data: bytearray, w: int, h: int) -> None:
    data[18:26] = struct.pack("<ii", w, h)


def _patch_tiff(data: bytearray, w: int, h: int) -> None:
    ifd = struct.unpack("<I", data[4:8])[0]
    for k in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * k
        tag, kind = struct.unpack("<HH", data[entry : entry + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength.
            value = w if tag == 256 else h
            data[entry + 8 : entry + 12] = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)


def _patch_webp(data: bytearray, w: int, h: int) -> None:
    assert data[12:16] == b"VP8L"  # Lossless: 14-bit width - 1 and height - 1 after the signature byte.
    bits = struct.unpack("<I", data[21:25])[0] & ~((1 << 28) - 1)
    data[21:25] = struct.pack("<I", bits | (w - 1) | ((h - 1) << 14))


BOMBS = {
    "JPEG": ({}, _patch_jpeg),
    "PNG": ({}, _patch_png),
    "GIF": ({}, _patch_gif),
    "BMP": ({}, _patch_bmp),
    "TIFF": ({}, _patch_tiff),
    "WEBP": ({"lossless": True}, _patch_webp),
}


@pytest.mark.parametrize("fmt", images.ALLOWED_FORMATS)
@pytest.mark.parametrize("side", [5000, 16000])  # Over our limit only; over PIL's own limit too (2.7 GB of RGB).
def test_decompression_bomb_refused_from_the_header_in_every_format(fmt, side, monkeypatch):
    kw, patch = BOMBS[fmt]
    data = bytearray(encode(fmt, (8, 8), **kw))
    patch(data, side, side)
    with monkeypatch.context() as m:  # PIL reads the claimed size from the header (its own limit off here).
        m.setattr(Image, "MAX_IMAGE_PIXELS", None)
        with Image.open(io.BytesIO(bytes(data))) as im:
            assert im.size == (side, side)
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.format))
    start = time.perf_counter()
    with pytest.raises(BadExample) as info:
        images.decode_image(bytes(data), max_pixels=1_000_000)
    assert info.value.reason == "decompression_bomb" and len(data) < 2000
    assert loads == [] and time.perf_counter() - start < 1.0  # Refused before any pixel was decoded.


# ------------------------------------------------------------------------------------ regular files, size cap


def test_named_pipe_dev_zero_and_folders_are_refused_without_hanging(tmp_path, tok, capsys):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # Nobody ever writes to it: reading would wait forever.
    (tmp_path / "folder.png").mkdir()
    for path, kind in ((fifo, "named pipe"), ("/dev/zero", "character device"), (tmp_path / "folder.png", "folder")):
        done, result = finishes(lambda p=path: images.read_image_file(p))
        assert done, f"reading {path} hung"
        assert isinstance(result, BadExample) and result.reason == "not_a_file" and kind in str(result), result
    # Through the data pipeline (a training or evaluation image) and the predict command.
    done, entries = finishes(lambda: first_bad(tmp_path, tok, "pipe.jpg"))
    assert done and entries == (False, [(str(tmp_path / "d.jsonl"), 1, "not_a_file")])
    for path in (fifo, "/dev/zero"):
        done, code = finishes(lambda p=path: cli.main(["predict", "--image", str(p), "--prompt", "caption en"]))
        assert done and code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --image {path}: image file {path} is a ") and "[not_a_file]" in err


def test_oversize_file_refused_from_its_size_before_reading(tmp_path, tok, capsys):
    big = tmp_path / "huge.png"
    with open(big, "wb") as f:
        f.write(encode("PNG"))
        f.truncate(8 * 2**30)  # A sparse 8 GiB file: reading it would take most of a minute and 8 GiB.
    start = time.perf_counter()
    with pytest.raises(BadExample, match=r"is 8,589,934,592 bytes, over input.max_image_bytes=67,108,864") as info:
        images.read_image_file(big)
    assert info.value.reason == "image_too_large" and time.perf_counter() - start < 1.0
    # The cap is the config key input.max_image_bytes.
    small = tmp_path / "small.png"
    small.write_bytes(encode("PNG", (64, 64)))
    refused = (False, [(str(tmp_path / "d.jsonl"), 1, "image_too_large")])
    assert first_bad(tmp_path, tok, "small.png", max_image_bytes=100) == refused
    assert first_bad(tmp_path, tok, "small.png") == (True, [])
    assert cli.main(["predict", "--image", str(big), "--prompt", "caption en"]) == 2
    assert "[image_too_large]" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"input.max_image_bytes must be >= 1"):
        pipeline.InputConfig.from_config({"data": one_image_dataset(tmp_path, "small.png"), "max_image_bytes": 0})
