"""`paligemma-ft predict` on the bundled demo model: one line per image, `--draw`, and one-line errors."""

import numpy as np
import pytest
from PIL import Image

from paligemma_ft import predictor as predictor_lib
from paligemma_ft.checkpoints import loading
from paligemma_ft.checkpoints import npz as ckpt_lib
from paligemma_ft.commands import cli, predict
from paligemma_ft.data.shapes import encode_image, make_example
from paligemma_ft.evaluate.detection import Box, parse_detections
from paligemma_ft.evaluate.draw import PALETTE

SIZE = (80, 64)  # (width, height): not square and not the model's 64 x 64, so drawings must keep the file's size.


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three generated shapes scenes as PNG files, with their ground-truth detection strings."""
    folder = tmp_path_factory.mktemp("images")
    paths, truths = [], []
    for i in range(3):
        ex = make_example(0, i, task="detect", image_size=SIZE)
        path = folder / f"scene{i}.png"
        path.write_bytes(encode_image(ex["image"]))
        paths.append(str(path))
        truths.append((ex["prefix"], ex["suffix"]))
    return paths, truths


def _lines(text):
    return [line for line in text.splitlines() if line]


def test_prints_one_nonempty_line_per_image_in_order(images, capsys):
    paths, _ = images
    argv = ["predict", "--prompt", "caption en", "--max-decode-len", "12", "--batch-size", "2"]
    for p in paths:
        argv += ["--image", p]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    lines = _lines(out)
    assert len(lines) == len(paths)  # Three images in batches of 2: the padded last batch adds no line.
    for path, line in zip(paths, lines):
        name, sep, prediction = line.partition("\t")
        assert name == path and sep == "\t" and prediction.strip()
        assert "\n" not in prediction and "\t" not in prediction


def test_draw_writes_a_png_of_the_image_size(images, tmp_path, capsys):
    paths, truths = images
    out = tmp_path / "drawn" / "boxes.png"
    # Several images: OUT_<i>.png, 0-based, in --image order (one image: OUT itself, see the next test).
    assert predict.draw_paths(str(out), 1) == [str(out)]
    assert (
        cli.main(
            [
                "predict",
                "--image",
                paths[0],
                "--image",
                paths[1],
                "--prompt",
                truths[0][0],
                "--draw",
                str(out),
                "--max-decode-len",
                "12",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    for i in range(2):
        drawn = tmp_path / "drawn" / f"boxes_{i}.png"
        assert f"wrote {drawn}" in err
        with Image.open(drawn) as im:
            assert im.format == "PNG" and im.size == SIZE
    assert not out.exists()


def test_draw_puts_the_parsed_boxes_on_the_image(images, tmp_path, monkeypatch, capsys):
    """The output → parse → draw path with a known output (the scene's ground truth); the model is not asked."""
    paths, truths = images
    prompt, truth = truths[0]
    expected, ok = parse_detections(truth)
    assert ok and expected
    monkeypatch.setattr(predictor_lib.Predictor, "generate", lambda self, batch, **kw: [truth] * len(batch["text"]))
    out = tmp_path / "truth.png"
    assert cli.main(["predict", "--image", paths[0], "--prompt", prompt, "--draw", str(out)]) == 0
    assert f"{len(expected)} box(es)" in capsys.readouterr().err
    drawn = np.asarray(Image.open(out).convert("RGB")).astype(int)
    original = np.asarray(Image.open(paths[0]).convert("RGB")).astype(int)
    changed = np.abs(drawn - original).sum(-1) > 0
    for box in expected:  # Each box's left edge, halfway down, is painted in its label colour.
        y, x = int((box.y0 + box.y1) / 2 * SIZE[1]), int(round(box.x0 * SIZE[0]))
        assert tuple(drawn[y, x]) == PALETTE[0]
    inside = np.zeros_like(changed)
    for box in expected:
        y0, x0 = int(box.y0 * SIZE[1]) - 12, int(box.x0 * SIZE[0]) - 2  # Labels sit just above a box.
        inside[max(y0, 0) : int(box.y1 * SIZE[1]) + 3, max(x0, 0) : int(box.x1 * SIZE[0]) + 40] = True  # + label.
    assert changed.any() and not (changed & ~inside).any()  # Nothing is drawn away from the boxes.


def test_draw_boxes_colours_labels_apart():
    image = np.full((50, 100, 3), 128, np.uint8)
    boxes = [Box("cat", 0.2, 0.1, 0.8, 0.4), Box("dog", 0.2, 0.6, 0.8, 0.9), Box("cat", 0.5, 0.45, 0.6, 0.55)]
    im = np.asarray(predict.draw_boxes(image, boxes))
    assert im.shape == image.shape
    assert tuple(im[35, 10]) == PALETTE[0] and tuple(im[35, 60]) == PALETTE[1]
    assert tuple(im[27, 45]) == PALETTE[0]  # Same label, same colour.
    assert tuple(im[25, 25]) == (128, 128, 128)  # Inside a box: untouched.


@pytest.fixture(scope="module")
def small_vocab_npz(tmp_path_factory):
    """The demo model with its embedding table cut to 1000 rows: the 1664-piece tiny tokenizer does not fit."""
    params = ckpt_lib.load_params(loading.checkpoint_path("builtin:demo"))
    params["llm"]["embedder"]["input_embedding"] = params["llm"]["embedder"]["input_embedding"][:1000]
    path = tmp_path_factory.mktemp("ckpt") / "small_vocab.npz"
    ckpt_lib.save_params(path, params)
    return str(path)


def test_bad_inputs_give_one_error_line_and_exit_2(images, tmp_path, capsys, small_vocab_npz):
    paths, _ = images
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    cases = [  # (argv, words the message must contain)
        (["--image", str(tmp_path / "missing.jpg")], [str(tmp_path / "missing.jpg"), "no such file"]),
        (["--image", paths[0], "--image", str(garbage)], [str(garbage)]),
        (["--image", str(empty)], [str(empty), "empty"]),
        (["--image", str(tmp_path)], [str(tmp_path), "folder"]),
        (["--image", paths[0], "--draw", str(tmp_path / "x.png")], ["--draw", "detect"]),
        (["--image", paths[0], "--sampler", "sideways"], ["sideways"]),
        (
            ["--image", paths[0], "--prompt", "detect circle", "--draw", str(garbage / "x.png")],
            ["--draw", str(garbage / "x.png")],
        ),
        (["--image", paths[0], "--checkpoint", str(tmp_path / "nope.npz")], [str(tmp_path / "nope.npz")]),
        (["--image", paths[0], "--checkpoint", small_vocab_npz], ["tokenizer"]),
        (
            ["--image", paths[0], "--checkpoint", small_vocab_npz, "--tokenizer", "builtin:tiny"],
            ["1664", "1000", small_vocab_npz],
        ),
    ]
    for extra, words in cases:
        argv = ["predict", "--prompt", "caption en", *extra]
        assert cli.main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
        for word in words:
            assert word in err, (argv, word, err)
    assert not (tmp_path / "x.png").exists()


def test_draw_fills_segment_masks_through_the_codec(images, tmp_path, monkeypatch, capsys):
    """`segment` outputs: the <seg> codes go through the codec (`--codec`) and each mask is filled in its box."""
    from paligemma_ft.model import vqvae

    codec_path = tmp_path / "codec.npz"
    np.savez(codec_path, **vqvae.random_codec_arrays(0))
    codec = vqvae.load_codec(str(codec_path))
    paths, _ = images
    box = "<loc0100><loc0100><loc0900><loc0900>"
    text = box + "".join(f"<seg{c:03d}>" for c in range(16)) + " circle"
    monkeypatch.setattr(predictor_lib.Predictor, "generate", lambda self, batch, **kw: [text] * len(batch["text"]))
    out = tmp_path / "seg.png"
    argv = [
        "predict",
        "--image",
        paths[0],
        "--prompt",
        "segment circle",
        "--draw",
        str(out),
        "--codec",
        str(codec_path),
    ]
    assert cli.main(argv) == 0
    drawn = np.asarray(Image.open(out).convert("RGB")).astype(int)
    original = np.asarray(Image.open(paths[0]).convert("RGB")).astype(int)
    (parsed,), _ = parse_detections(text)
    from paligemma_ft.evaluate.segmentation import predicted_masks

    (mask,) = predicted_masks([parsed], SIZE[1], SIZE[0], codec)
    assert mask.any() and not mask.all()
    tinted = np.abs(drawn - original).sum(-1) > 0
    inner = np.zeros_like(mask)
    inner[21:54, 10:69] = True  # Away from the outline and the label (inside the box top: no room above it).
    np.testing.assert_array_equal(tinted[inner], mask[inner])  # Exactly the mask's pixels are filled.
    # Without the codec file: one error line naming what to download, before the model loads.
    monkeypatch.setenv("PALIGEMMA_FT_CODEC", str(tmp_path / "none" / "vae-oid.npz"))
    assert cli.main(["predict", "--image", paths[0], "--prompt", "segment circle", "--draw", str(out)]) == 2
    assert "vae-oid.npz" in capsys.readouterr().err


def test_constrain_flag_gives_parsable_outputs(images, capsys):
    paths, _ = images
    argv = ["predict", "--image", paths[0], "--prompt", "detect circle", "--max-decode-len", "12"]
    assert cli.main([*argv, "--constrain", "detect"]) == 0
    prediction = capsys.readouterr().out.split("\t", 1)[1].strip()
    boxes, ok = parse_detections(prediction)
    assert ok  # The demo model was never taught <loc> tokens: only the grammar makes this parse.
