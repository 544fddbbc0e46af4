"""Transforms: decoding every format and colour mode, EXIF, bad images, resize, value range, tokenization."""

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, features

from paligemma_ft.data import images
from paligemma_ft.data import transforms as T
from paligemma_ft.data.transforms import BadExample
from paligemma_ft.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_spec("builtin:tiny")


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels but holds no pixel data (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


RED = (200, 30, 40)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "WEBP"])
def test_decode_formats_give_rgb_uint8(fmt):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.fail("Pillow was built without WebP support")
    data = encode(Image.new("RGB", (10, 6), RED), fmt, **({"quality": 100} if fmt in ("JPEG", "WEBP") else {}))
    image = T.decode_image(data)
    assert image.shape == (6, 10, 3) and image.dtype == np.uint8
    np.testing.assert_allclose(image.reshape(-1, 3).mean(0), RED, atol=4)


@pytest.mark.parametrize(
    "mode, colour, expected",
    [
        ("L", 90, (90, 90, 90)),
        ("LA", (90, 10), (90, 90, 90)),
        ("RGBA", (*RED, 0), RED),  # Alpha is dropped, as big_vision's 3-channel decode.
        ("P", None, RED),
        ("P+transparency", None, RED),
    ],
)
def test_decode_colour_modes(mode, colour, expected):
    if mode.startswith("P"):
        im = Image.new("RGB", (4, 4), RED).convert("P", palette=Image.Palette.ADAPTIVE)
        data = encode(im, "PNG", **({"transparency": 0} if "transparency" in mode else {}))
    else:
        data = encode(Image.new(mode, (4, 4), colour), "PNG")
    image = T.decode_image(data)
    assert image.shape == (4, 4, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[0, 0], expected)


def test_palette_with_alpha_mode_to_rgb():
    # PNG cannot store mode PA; PIL produces it in memory (e.g. from some GIF/WebP files).
    im = Image.new("RGB", (4, 4), RED).convert("P", palette=Image.Palette.ADAPTIVE).convert("PA")
    assert im.mode == "PA"
    np.testing.assert_array_equal(images._pil_to_rgb(im)[1, 1], RED)


def test_decode_cmyk_jpeg():
    image = T.decode_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100))
    assert image.shape == (8, 8, 3)
    np.testing.assert_allclose(image[4, 4], (255, 0, 0), atol=3)


def test_decode_16_bit_png_keeps_the_range():
    values = np.array([[0, 257 * 128, 65535]], np.uint16)  # -> 0, 128, 255 after scaling.
    image = T.decode_image(encode(Image.fromarray(values), "PNG"))
    assert image.dtype == np.uint8 and image.shape == (1, 3, 3)
    np.testing.assert_array_equal(image[0, :, 0], [0, 128, 255])
    np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_decode_32_bit_integer_tiff():
    values = np.array([[0, 1000, 65535]], np.int32)
    image = T.decode_image(encode(Image.fromarray(values, mode="I"), "TIFF"))
    np.testing.assert_array_equal(image[0, :, 1], [0, round(1000 / 257), 255])


def test_decode_gif_takes_the_first_frame():
    frames = [Image.new("RGB", (5, 5), c).convert("P", palette=Image.Palette.ADAPTIVE) for c in (RED, (0, 0, 255))]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100)
    image = T.decode_image(out.getvalue())
    np.testing.assert_allclose(image[2, 2], RED, atol=8)


def test_decode_applies_exif_orientation():
    im = Image.new("RGB", (16, 8), (255, 0, 0))
    im.paste((0, 0, 255), (8, 0, 16, 8))  # Left half red, right half blue.
    exif = Image.Exif()
    exif[0x0112] = 6  # "Rotate 90 CW to display".
    image = T.decode_image(encode(im, "JPEG", quality=100, exif=exif.tobytes()))
    assert image.shape == (16, 8, 3)  # Rotated: now portrait, the left (red) half on top.
    assert image[2, 4, 0] > 200 and image[2, 4, 2] < 60
    assert image[13, 4, 2] > 200 and image[13, 4, 0] < 60


@pytest.mark.parametrize(
    "array, shape",
    [
        (np.zeros((3, 5), np.uint8), (3, 5, 3)),
        (np.zeros((3, 5, 1), np.uint8), (3, 5, 3)),
        (np.zeros((3, 5, 4), np.uint8), (3, 5, 3)),
    ],
)
def test_decode_arrays(array, shape):
    assert T.decode_image(array).shape == shape


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty_image"),
        (b"definitely not an image", "unreadable_image"),
        (np.zeros((3, 5), np.float32), "unreadable_image"),
        (np.zeros((3, 5, 2), np.uint8), "unreadable_image"),
    ],
)
def test_decode_refuses_bad_data(data, reason):
    with pytest.raises(BadExample) as info:
        T.decode_image(data)
    assert info.value.reason == reason


def test_decode_refuses_truncated_jpeg():
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(BadExample) as info:
        T.decode_image(data[: len(data) // 2])
    assert info.value.reason == "unreadable_image" and "truncated" in str(info.value)


def _flip_crc(data: bytes, kind: bytes) -> bytes:
    """`data` (a PNG) with the first CRC byte of its first `kind` chunk inverted."""
    pos, out = 8, bytearray(data)
    while out[pos + 4 : pos + 8] != kind:
        pos += 12 + struct.unpack(">I", out[pos : pos + 4])[0]
    out[pos + 8 + struct.unpack(">I", out[pos : pos + 4])[0]] ^= 0xFF
    return bytes(out)


def test_png_crc_of_image_data_is_checked():
    data = encode(Image.new("RGB", (4, 4), RED), "PNG")
    assert T.decode_image(data)[0, 0].tolist() == list(RED)
    for kind in (b"IDAT", b"IEND"):  # PIL checks only the chunks before IDAT: it would decode these silently.
        with pytest.raises(BadExample, match=f"chunk '{kind.decode()}' at byte .* fails its CRC") as info:
            T.decode_image(_flip_crc(data, kind))
        assert info.value.reason == "unreadable_image"


def test_unreadable_image_messages_are_the_same_on_every_read():
    # The bad-input report merges identical entries: a message with an object address would count a file twice.
    messages = {str(_refusal(b"GIF89a not really")) for _ in range(3)} | {str(_refusal(b"text")) for _ in range(2)}
    assert len(messages) == 2 and not any("0x" in m for m in messages)
    assert "b'text'" in str(_refusal(b"text"))  # The first bytes tell what the file really is.


def _refusal(data: bytes) -> BadExample:
    with pytest.raises(BadExample) as info:
        T.decode_image(data)
    return info.value


def test_decompression_bomb_refused_fast_from_the_header():
    start = time.perf_counter()
    with pytest.raises(BadExample) as info:
        T.decode_image(png_header_only(30000, 30000))  # 2.7 GB if decoded.
    assert info.value.reason == "decompression_bomb"
    assert time.perf_counter() - start < 1.0
    # Our own (configurable) limit is checked before any pixel is read.
    with pytest.raises(BadExample, match="max_image_pixels=1000000") as info:
        T.decode_image(png_header_only(2000, 2000), max_pixels=1_000_000)
    assert info.value.reason == "decompression_bomb"


def test_resize_shape_dtype_and_antialias():
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, ::2] = 255  # One-pixel stripes: antialiasing averages them to grey.
    out = T.resize(image, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    assert 100 < out.mean() < 155 and out.std() < 30
    flat = np.full((7, 9, 3), 77, np.uint8)
    np.testing.assert_allclose(T.resize(flat, 5), 77.0, atol=1e-3)  # Not re-quantized, constant stays exact.
    np.testing.assert_array_equal(T.resize(np.full((5, 5, 3), 3, np.uint8), 5), 3.0)


def test_resize_keeps_float_precision():
    ramp = np.tile(np.arange(0, 256, 1, np.uint8)[None, :, None], (4, 1, 3))
    out = T.resize(ramp, 3)
    assert not np.allclose(out, np.round(out))  # Bilinear averages are not rounded to uint8.


def test_value_range():
    out = T.value_range(np.array([0, 127.5, 255], np.float32))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [-1.0, 0.0, 1.0])
    assert T.value_range(np.array([0, 255], np.uint8)).tolist() == [-1.0, 1.0]


def test_tokenize_train_keeps_meta_and_lowercases(tok):
    ex = {"id": "x", "suffix": "A Red Circle", "references": ["A Red Circle"], "prefix": None, "image": None}
    out = T.tokenize_train(ex, tok, "caption en", 16, lowercase=True)
    assert out["text"].shape == (17,) and out["text"].dtype == np.int32
    expected = tok.encode("caption en", add_bos=True) + tok.sep_ids + tok.encode("a red circle", add_eos=True)
    assert out["text"][: len(expected)].tolist() == expected
    assert out["mask_loss"].sum() == len(tok.encode("a red circle")) + 1
    assert out["id"] == "x" and out["references"] == ["a red circle"] and out["_truncated"] is False
    own = T.tokenize_train({**ex, "prefix": "describe en"}, tok, "caption en", 16)
    assert own["prefix"] == "describe en"


@pytest.mark.parametrize(
    "suffix, reason", [(None, "missing_suffix"), ("", "empty_suffix"), ("  ", "empty_suffix"), (3, "bad_field")]
)
def test_tokenize_train_refuses_missing_or_empty_suffix(tok, suffix, reason):
    with pytest.raises(BadExample) as info:
        T.tokenize_train({"suffix": suffix}, tok, "caption en", 16)
    assert info.value.reason == reason


def test_tokenize_prompt(tok):
    out = T.tokenize_prompt({"suffix": "a red circle", "references": ["a red circle"]}, tok, "caption en", 12)
    n = len(tok.encode("caption en")) + 1 + len(tok.sep_ids)
    assert out["text"].shape == (12,)
    assert out["mask_input"].tolist() == [1] * n + [0] * (12 - n)
    assert out["references"] == ["a red circle"]


def test_apply_transforms_by_name(tok):
    ctx = T.Context(tok=tok, res=8, text_len=10, prefix="caption en")
    raw = {"image": encode(Image.new("RGB", (20, 12), RED), "PNG"), "suffix": "a red square"}
    out = T.apply_transforms(raw, T.DEFAULT_TRANSFORMS, ctx)
    assert out["image"].shape == (8, 8, 3) and out["image"].dtype == np.float32
    assert -1 <= out["image"].min() and out["image"].max() <= 1
    assert out["text"].shape == (11,)
    with pytest.raises(ValueError, match="unknown entries"):
        T.check_transform_names(["decode", "crop"])
