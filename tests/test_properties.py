"""Property tests (hypothesis): token sequences, `<loc>` boxes, and the JSONL reader on arbitrary bytes.

Each property states what must hold for every input, and hypothesis searches for a counterexample:
- training and prompt sequences: the masks agree with the lengths of the parts, for any prefix, suffix, length;
- a box encoded as `<loc>` tokens and parsed back lands within half a bin of where it was;
- the JSONL source never fails with anything but `BadExample` (located at its file and line), whatever the bytes.
"""

import json
import string

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings

from paligemma_ft import tokenizer as tokenizer_lib
from paligemma_ft.data import sources, transforms
from paligemma_ft.data.transforms import BadExample
from paligemma_ft.evaluate.detection import Box, encode_box, encode_detections, parse_detections

TOK = tokenizer_lib.Tokenizer.from_spec("builtin:tiny")
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # The same examples in every CI run.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
# Any text, including newlines, emoji, control characters and characters outside the tiny vocabulary.
TEXT = st.text(max_size=40)


def _parts(prefix: str, suffix_ids: list[int]) -> tuple[list[int], int]:
    """The uncut sequence and the length of its bidirectional part ([bos] + prefix + sep)."""
    head = TOK.encode(prefix, add_bos=True) + TOK.sep_ids
    return head + suffix_ids, len(head)


# --------------------------------------------------------------------------------------------- token sequences


@SETTINGS
@given(prefix=TEXT, suffix=TEXT, length=st.integers(1, 48))
def test_train_example_masks_match_the_parts(prefix, suffix, length):
    out, truncated = tokenizer_lib.make_train_example(TOK, prefix, suffix, length)
    full, head = _parts(prefix, TOK.encode(suffix, add_eos=True))
    n = min(len(full), length)  # Real tokens kept.
    assert truncated == (len(full) > length)
    for key in ("text", "mask_ar", "mask_loss"):
        assert out[key].shape == (length,) and out[key].dtype == np.int32
    np.testing.assert_array_equal(out["text"][:n], full[:n])
    positions = np.arange(length)
    # Prefix and separator: bidirectional, no loss. Suffix and padding: causal. Loss on the kept suffix only.
    np.testing.assert_array_equal(out["mask_ar"], (positions >= head).astype(np.int32))
    np.testing.assert_array_equal(out["mask_loss"], ((positions >= head) & (positions < n)).astype(np.int32))
    assert (out["text"][n:] == TOK.pad_id).all()
    assert out["text"][0] == TOK.bos_id
    assert (out["mask_loss"] <= out["mask_ar"]).all()  # Never a loss on a token the prefix attends to.
    # The EOS survives exactly when nothing was cut, and it is the last token with a loss.
    has_eos = out["text"][n - 1] == TOK.eos_id and out["mask_loss"][n - 1] == 1
    assert has_eos == (not truncated)


@SETTINGS
@given(prefix=TEXT, suffix=TEXT, length=st.integers(1, 48))
def test_prompt_masks_match_the_parts(prefix, suffix, length):
    out, truncated = tokenizer_lib.make_prompt(TOK, prefix, length, suffix=suffix)
    full, head = _parts(prefix, TOK.encode(suffix))
    n = min(len(full), length)
    assert truncated == (len(full) > length)
    for key in ("text", "mask_ar", "mask_input"):
        assert out[key].shape == (length,) and out[key].dtype == np.int32
    np.testing.assert_array_equal(out["text"][:n], full[:n])
    positions = np.arange(length)
    np.testing.assert_array_equal(out["mask_ar"], (positions >= head).astype(np.int32))
    np.testing.assert_array_equal(out["mask_input"], (positions < n).astype(np.int32))
    assert TOK.eos_id not in out["text"][:n].tolist()  # Decoding continues after the prompt.
    # Decoding starts at the first padding position, which is the number of input tokens.
    assert int(out["mask_input"].sum()) == n


@SETTINGS
@given(prefix=TEXT, suffix=TEXT, length=st.integers(2, 48), lowercase=st.booleans())
def test_tokenize_transforms_agree_with_the_builders(prefix, suffix, length, lowercase):
    example = {"prefix": prefix, "suffix": suffix, "references": [suffix]}
    if not suffix.strip():
        with pytest.raises(BadExample, match="empty"):
            transforms.tokenize_train(example, TOK, "caption en", length, lowercase=lowercase)
        return
    out = transforms.tokenize_train(example, TOK, "caption en", length, lowercase=lowercase)
    want, cut = tokenizer_lib.make_train_example(TOK, prefix, suffix.lower() if lowercase else suffix, length + 1)
    assert out["_truncated"] == cut
    for key in want:
        np.testing.assert_array_equal(out[key], want[key])


# ------------------------------------------------------------------------------------------------- <loc> boxes

LABEL = st.text(alphabet=string.ascii_letters + string.digits + " -", min_size=1, max_size=20).filter(str.strip)
HALF_BIN = 0.5 / 1023 + 1e-12


@st.composite
def boxes(draw):
    # A box thinner than a bin can round to an empty box, which the parser refuses by design: each side is drawn
    # at least 1.01 bins long, so that (almost) nothing is filtered out below.
    low = st.floats(0.0, 1.0 - 1.01 / 1023, allow_nan=False)
    y0, x0 = draw(low), draw(low)
    y1, x1 = draw(st.floats(y0 + 1.01 / 1023, 1.0)), draw(st.floats(x0 + 1.01 / 1023, 1.0))
    box = Box(draw(LABEL), y0, x0, y1, x1)
    assume(round(y1 * 1023) > round(y0 * 1023) and round(x1 * 1023) > round(x0 * 1023))
    return box


@SETTINGS
@given(box=boxes())
def test_box_round_trip_within_half_a_bin(box):
    parsed, ok = parse_detections(encode_box(box))
    assert ok and len(parsed) == 1
    got = parsed[0]
    assert got.label == " ".join(box.label.split())
    for a, b in ((got.y0, box.y0), (got.x0, box.x0), (got.y1, box.y1), (got.x1, box.x1)):
        assert abs(a - b) <= HALF_BIN
    # Encoding the parsed box again gives the same tokens: bins are fixed points.
    assert encode_box(got) == encode_box(Box(got.label, *(c for c in (got.y0, got.x0, got.y1, got.x1))))
    assert parse_detections(encode_box(got))[0] == [got]


@SETTINGS
@given(many=st.lists(boxes(), max_size=6))
def test_several_boxes_round_trip_in_order(many):
    parsed, ok = parse_detections(encode_detections(many))
    assert ok and [b.label for b in parsed] == [" ".join(b.label.split()) for b in many]
    for got, box in zip(parsed, many):
        assert max(abs(got.y0 - box.y0), abs(got.x0 - box.x0), abs(got.y1 - box.y1), abs(got.x1 - box.x1)) <= HALF_BIN


@st.composite
def box_bins(draw):
    """(y0, x0, y1, x1) location bins of a box with y1 > y0 and x1 > x0, built so that nothing is filtered out."""
    y0, x0 = draw(st.integers(0, 1022)), draw(st.integers(0, 1022))
    return y0, x0, draw(st.integers(y0 + 1, 1023)), draw(st.integers(x0 + 1, 1023))


@SETTINGS
@given(bins=box_bins())
def test_bins_decode_and_encode_exactly(bins):
    text = "".join(f"<loc{b:04d}>" for b in bins) + " thing"
    parsed, ok = parse_detections(text)
    assert ok and encode_box(parsed[0]) == text


# ---------------------------------------------------------------------------------------------- JSONL on bytes

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "image": st.one_of(
            st.sampled_from(
                ["a.png", "missing.png", "../a.png", "/etc/passwd", "", ".", "sub/", "a\x00.png", "x" * 300]
            ),
            JSON_VALUES,
        ),
        "prefix": st.one_of(TEXT, JSON_VALUES),
        "suffix": st.one_of(TEXT, st.lists(TEXT, max_size=3), JSON_VALUES),
        "id": JSON_VALUES,
    },
)
# A line: random bytes, a JSON object with plausible and implausible fields, or that object cut or corrupted.
LINE = st.one_of(
    st.binary(max_size=60),
    FIELDS.map(lambda d: json.dumps(d).encode()),
    st.tuples(FIELDS, st.integers(0, 80), st.binary(max_size=3)).map(
        lambda t: json.dumps(t[0]).encode()[: t[1]] + t[2]
    ),
)
BAD_REASONS = {
    "malformed_json",
    "non_utf8",
    "missing_image_field",
    "bad_field",
    "missing_image",
    "path_escape",
    "unreadable_image",
    "not_a_file",  # A folder (e.g. "image": "."), pipe or device: refused before it is read.
    "image_too_large",
    "empty_image",
    "missing_suffix",
    "empty_suffix",
    "decompression_bomb",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("jsonl")
    (root / "sub").mkdir()
    (root / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"cut")  # A broken PNG.
    return root


def _check_located(error: BadExample, path, lines: int) -> None:
    assert error.reason in BAD_REASONS, error.reason
    assert error.file == str(path) and 1 <= error.line <= lines
    assert str(error).startswith(f"{path}:{error.line}: ")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINE, max_size=6), separator=st.sampled_from([b"\n", b"\r\n"]))
def test_jsonl_reader_on_arbitrary_bytes_raises_only_located_bad_examples(folder, lines, separator):
    path = folder / "data.jsonl"
    data = separator.join(lines)
    path.write_bytes(data)
    n_lines = data.count(b"\n") + 1
    src = sources.JsonlSource(path)  # Policy "skip": building never fails.
    assert len(src) + len(src.skipped) == sum(1 for raw in data.split(b"\n") if raw.strip())
    for error in src.skipped:
        _check_located(error, path, n_lines)
    ctx = transforms.Context(tok=TOK, res=8, text_len=8, prefix="caption en")
    for i in range(len(src)):  # Reading and transforming an example: a value or a located BadExample.
        try:
            transforms.apply_transforms(src[i], transforms.DEFAULT_TRANSFORMS, ctx)
        except BadExample as e:
            _check_located(e.located(*src.location(i)), path, n_lines)
    try:
        strict = sources.JsonlSource(path, bad_input="error")
    except BadExample as e:
        _check_located(e, path, n_lines)
        assert src.skipped and e.line == src.skipped[0].line  # The first bad line.
    else:
        assert not src.skipped and len(strict) == len(src)


def test_jsonl_reader_deeply_nested_and_nul_lines(folder):
    path = folder / "deep.jsonl"
    path.write_bytes(b"[" * 100_000 + b"\n" + json.dumps({"image": "a\x00.png", "suffix": "x"}).encode() + b"\n")
    src = sources.JsonlSource(path)
    assert [(e.line, e.reason) for e in src.skipped] == [(1, "malformed_json")]
    with pytest.raises(BadExample, match="NUL") as info:
        src[0]
    assert (info.value.line, info.value.reason) == (2, "bad_field")
