"""Builds `tests/data/bad/`: a small corpus of broken and unusual inputs for the data pipeline's bad-input tests.

Layout (about 110 KB, most of it the 100 000-character caption):

    bad/dataset/images/   good.jpg and one file per broken or unusual image (see IMAGES)
    bad/dataset/<case>.jsonl
                          one file per case (see CASES): four good lines around the case's line, which is line 3
    bad/outside/secret.png
                          a real image outside the dataset folder, the target of the path-escape case

Every file is generated from code and fixed seeds, so running the script again writes the same bytes (with the
same Pillow). The expected outcome of each case is asserted in `tests/test_bad_inputs.py`, not recorded here.

Usage: `python scripts/make_bad_corpus.py [--out DIR]` (default: tests/data/bad next to this script).
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import shutil
import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "bad"
CASE_LINE = 3  # The case's line in its JSONL file (1-based); lines 1-2 and 4-5 are good examples.
LONG_CAPTION_CHARS = 100_000


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    return out.getvalue()


def _noise(size: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk: length, type, data, CRC-32 of type + data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming `width x height` RGB pixels, an empty IDAT, IEND: ~60 bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")


def png_with_wrong_crc() -> bytes:
    """An 8x8 PNG whose IDAT chunk CRC is wrong (pixel data intact), as a bit flip in transit leaves it."""
    data = bytearray(_encode(Image.new("RGB", (8, 8), (200, 30, 40)), "PNG"))
    pos = 8  # After the signature: walk the chunks to IDAT.
    while True:
        length = struct.unpack(">I", data[pos : pos + 4])[0]
        if data[pos + 4 : pos + 8] == b"IDAT":
            data[pos + 8 + length] ^= 0xFF  # First byte of the CRC.
            return bytes(data)
        pos += 12 + length


def _animated_gif() -> bytes:
    frames = [
        Image.new("RGB", (8, 8), c).convert("P", palette=Image.Palette.ADAPTIVE)
        for c in ((200, 30, 40), (20, 40, 220), (30, 200, 40))
    ]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


def _gray16() -> bytes:
    values = np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369  # 0 .. 65535.
    return _encode(Image.fromarray(values), "PNG")


IMAGES: dict[str, Callable[[], bytes]] = {
    "good.jpg": lambda: _encode(_noise(16, 0), "JPEG", quality=90),
    "truncated.jpg": lambda: _encode(_noise(16, 1), "JPEG", quality=90)[:300],
    "wrong_crc.png": png_with_wrong_crc,
    "zero.jpg": lambda: b"",
    "text.jpg": lambda: b"This is a text file with a .jpg name, not a JPEG.\n",
    "one_pixel.png": lambda: _encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"),
    "bomb_30000x30000.png": lambda: png_header_only(30000, 30000),
    "cmyk.jpg": lambda: _encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95),
    "gray16.png": _gray16,
    "animated.gif": _animated_gif,
}


def _line(obj: dict) -> bytes:
    return json.dumps(obj).encode()


def _image_line(name: str) -> bytes:
    return _line({"image": f"images/{name}", "suffix": f"a picture from {name}"})


# Case name -> the JSONL line (bytes) that is line CASE_LINE of `<case>.jsonl`.
CASES: dict[str, bytes] = {
    "truncated_jpeg": _image_line("truncated.jpg"),
    "png_wrong_crc": _image_line("wrong_crc.png"),
    "zero_byte": _image_line("zero.jpg"),
    "text_named_jpg": _image_line("text.jpg"),
    "one_pixel": _image_line("one_pixel.png"),
    "bomb_header_only": _image_line("bomb_30000x30000.png"),
    "cmyk_jpeg": _image_line("cmyk.jpg"),
    "png_16bit": _image_line("gray16.png"),
    "animated_gif": _image_line("animated.gif"),
    "invalid_json": b'{"image": "images/good.jpg", "suffix": "an unterminated line',
    "non_utf8": b'{"image": "images/good.jpg", "suffix": "caf\xe9 au lait"}',  # Latin-1, not UTF-8.
    "missing_image_field": _line({"suffix": "a caption without an image"}),
    "missing_suffix": _line({"image": "images/good.jpg"}),
    "wrong_type_suffix": _line({"image": "images/good.jpg", "suffix": 42}),
    "wrong_type_prefix": _line({"image": "images/good.jpg", "prefix": ["caption", "en"], "suffix": "x"}),
    "wrong_type_image": _line({"image": 7, "suffix": "an image that is a number"}),
    "long_caption": _line(
        {
            "image": "images/good.jpg",
            "suffix": ("a very long caption " * (LONG_CAPTION_CHARS // 20))[:LONG_CAPTION_CHARS],
        }
    ),
    "path_escape": _line({"image": "../outside/secret.png", "suffix": "a file outside the dataset folder"}),
}


def good_lines() -> list[bytes]:
    """The good lines around each case (distinct suffixes, so the examples can be told apart)."""
    return [_line({"image": "images/good.jpg", "suffix": f"a good example number {k}"}) for k in range(4)]


def write_corpus(out: pathlib.Path) -> list[pathlib.Path]:
    """Writes the corpus into `out` (replacing what is there); returns the files written."""
    if out.exists():
        shutil.rmtree(out)
    images = out / "dataset" / "images"
    images.mkdir(parents=True)
    (out / "outside").mkdir()
    written = []
    for name, make in IMAGES.items():
        (images / name).write_bytes(make())
        written.append(images / name)
    secret = out / "outside" / "secret.png"
    secret.write_bytes(_encode(Image.new("RGB", (4, 4), (0, 0, 0)), "PNG"))
    written.append(secret)
    good = good_lines()
    for case, line in CASES.items():
        lines = good[: CASE_LINE - 1] + [line] + good[CASE_LINE - 1 :]
        path = out / "dataset" / f"{case}.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="corpus folder (replaced)")
    args = parser.parse_args(argv)
    files = write_corpus(args.out)
    total = sum(f.stat().st_size for f in files)
    print(f"Wrote {len(files)} files ({total / 1024:.1f} KiB) to {args.out}")


if __name__ == "__main__":
    main()
