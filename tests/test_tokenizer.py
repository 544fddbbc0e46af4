"""Tests for the tokenizer wrapper, the shipped tiny tokenizer and the train/prompt sequence builders."""

import importlib.util
import pathlib
import pickle

import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from paligemma_ft.model import presets
from paligemma_ft.tokenizer import Tokenizer, check_vocab, make_prompt, make_train_example, stack

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE = 512  # The tiny tokenizer's base vocabulary (scripts/make_tiny_tokenizer.py, BASE_VOCAB).


def _load_script():
    spec = importlib.util.spec_from_file_location("make_tiny_tokenizer", ROOT / "scripts" / "make_tiny_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_spec("builtin:tiny")


def test_special_ids_and_size(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab_size == BASE + 1024 + 128 == presets.TINY_VOCAB
    assert tok.pieces([0, 1, 2, 3]) == ["<pad>", "</s>", "<s>", "<unk>"]


def test_newline_is_one_piece(tok):
    assert len(tok.sep_ids) == 1
    assert tok.pieces(tok.sep_ids) == ["\n"]
    assert tok.sep_ids[0] < BASE


def test_loc_and_seg_pieces_at_the_end_in_order(tok):
    assert tok.loc_base == BASE
    assert [tok.loc_id(n) for n in (0, 42, 1023)] == [BASE, BASE + 42, BASE + 1023]
    assert [tok.seg_id(n) for n in (0, 5, 127)] == [BASE + 1024, BASE + 1029, BASE + 1151]
    assert tok.pieces([BASE + 42, BASE + 1024 + 127]) == ["<loc0042>", "<seg127>"]
    # They encode as single tokens inside text, as in PaliGemma's detection targets.
    ids = tok.encode("<loc0010><loc1023><seg005> star")
    assert ids[:3] == [BASE + 10, BASE + 1023, BASE + 1029]
    with pytest.raises(ValueError, match="outside"):
        tok.loc_id(1024)
    with pytest.raises(ValueError, match="outside"):
        tok.seg_id(-1)


def test_shapes_vocabulary_has_word_pieces(tok):
    # The corpus should make dataset words single pieces, not characters.
    for word in ["red", "circle", "triangle", "left", "background", "picture"]:
        assert tok.pieces(tok.encode(f"a {word}"))[-1] == "▁" + word
    assert tok.pieces(tok.encode("caption en")) == ["caption", "▁en"]


def test_byte_fallback_and_round_trip(tok):
    text = "Zürich 🚀 café, 12 ¥"
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert "<0xF0>" in tok.pieces(ids)  # The rocket's first UTF-8 byte.
    assert tok.decode(ids) == text
    for text in ["a red circle in the top left", "answer en how many stars are there?\n7", "  two  spaces\n\n"]:
        assert tok.decode(tok.encode(text)) == text


def test_encode_adds_bos_eos(tok):
    ids = tok.encode("a red circle")
    assert tok.encode("a red circle", add_bos=True, add_eos=True) == [2] + ids + [1]
    assert tok.encode("") == []


def test_decode_stops_at_eos_and_drops_pad(tok):
    ids = tok.encode("a red circle")
    more = tok.encode(" and a star")
    row = np.array([2] + ids + [1] + more + [0, 0], np.int32)
    assert tok.decode(row) == "a red circle"
    assert tok.decode(row, stop_at_eos=False) == "a red circle and a star"
    assert tok.decode([0] + ids + [0]) == "a red circle"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5, tok.vocab_size])


def test_train_example_fits(tok):
    p, s, a = tok.encode("caption en"), tok.sep_ids, tok.encode("a red circle")
    assert (len(p), len(s), len(a)) == (2, 1, 3)  # So the literal masks below line up.
    ex, truncated = make_train_example(tok, "caption en", "a red circle", 16)
    assert not truncated
    np.testing.assert_array_equal(ex["text"], [2] + p + s + a + [1] + [0] * 8)
    np.testing.assert_array_equal(ex["mask_ar"], [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(ex["mask_loss"], [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    assert sorted(ex) == ["mask_ar", "mask_loss", "text"]
    assert all(v.dtype == np.int32 and v.shape == (16,) for v in ex.values())


def test_train_example_exact_fit_keeps_eos(tok):
    p, s, a = tok.encode("caption en"), tok.sep_ids, tok.encode("a red circle")
    ex, truncated = make_train_example(tok, "caption en", "a red circle", 8)
    assert not truncated
    np.testing.assert_array_equal(ex["text"], [2] + p + s + a + [1])
    np.testing.assert_array_equal(ex["mask_ar"], [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(ex["mask_loss"], [0, 0, 0, 0, 1, 1, 1, 1])


def test_train_example_truncation_cuts_eos(tok):
    p, s, a = tok.encode("caption en"), tok.sep_ids, tok.encode("a red circle")
    ex, truncated = make_train_example(tok, "caption en", "a red circle", 6)
    assert truncated
    np.testing.assert_array_equal(ex["text"], [2] + p + s + a[:2])
    assert tok.eos_id not in ex["text"].tolist()
    np.testing.assert_array_equal(ex["mask_ar"], [0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(ex["mask_loss"], [0, 0, 0, 0, 1, 1])


def test_train_example_cut_inside_prefix(tok):
    ex, truncated = make_train_example(tok, "caption en", "a red circle", 2)
    assert truncated
    np.testing.assert_array_equal(ex["text"], [2, tok.encode("caption en")[0]])
    np.testing.assert_array_equal(ex["mask_ar"], [0, 0])
    np.testing.assert_array_equal(ex["mask_loss"], [0, 0])
    with pytest.raises(ValueError, match="length"):
        make_train_example(tok, "caption en", "a red circle", 0)


def test_prompt_without_suffix(tok):
    p, s = tok.encode("caption en"), tok.sep_ids
    ex, truncated = make_prompt(tok, "caption en", 8)
    assert not truncated
    np.testing.assert_array_equal(ex["text"], [2] + p + s + [0, 0, 0, 0])
    np.testing.assert_array_equal(ex["mask_ar"], [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(ex["mask_input"], [1, 1, 1, 1, 0, 0, 0, 0])
    assert sorted(ex) == ["mask_ar", "mask_input", "text"]
    assert all(v.dtype == np.int32 for v in ex.values())


def test_prompt_with_suffix_has_no_eos(tok):
    p, s, a = tok.encode("caption en"), tok.sep_ids, tok.encode("a red")
    assert len(a) == 2
    ex, truncated = make_prompt(tok, "caption en", 8, suffix="a red")
    assert not truncated
    np.testing.assert_array_equal(ex["text"], [2] + p + s + a + [0, 0])
    np.testing.assert_array_equal(ex["mask_ar"], [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(ex["mask_input"], [1, 1, 1, 1, 1, 1, 0, 0])


def test_prompt_truncation(tok):
    ex, truncated = make_prompt(tok, "answer en how many stars are there?", 4)
    assert truncated
    np.testing.assert_array_equal(ex["text"], [2] + tok.encode("answer en how many stars are there?")[:3])
    np.testing.assert_array_equal(ex["mask_ar"], [0, 0, 0, 0])
    np.testing.assert_array_equal(ex["mask_input"], [1, 1, 1, 1])
    _, exact = make_prompt(tok, "caption en", 4)
    assert not exact


def test_stack(tok):
    a, _ = make_train_example(tok, "caption en", "a red circle", 10)
    b, _ = make_train_example(tok, "caption en", "two blue stars", 10)
    batch = stack([a, b])
    assert {k: v.shape for k, v in batch.items()} == {"text": (2, 10), "mask_ar": (2, 10), "mask_loss": (2, 10)}
    np.testing.assert_array_equal(batch["text"][1], b["text"])
    c, _ = make_train_example(tok, "caption en", "a red circle", 9)
    with pytest.raises(ValueError, match="Example 1 key 'mask_ar'"):
        stack([a, c])
    p, _ = make_prompt(tok, "caption en", 10)
    with pytest.raises(ValueError, match="Example 1 has keys"):
        stack([a, p])
    with pytest.raises(ValueError, match="at least one"):
        stack([])


def _piece_table(model: bytes) -> list[tuple[str, float, int]]:
    proto = model_pb2.ModelProto()
    proto.ParseFromString(model)
    return [(p.piece, p.score, p.type) for p in proto.pieces]


def test_model_is_deterministic_and_matches_the_asset():
    script = _load_script()
    first = script.build()
    assert script.build() == first  # Byte-identical on every build.
    shipped = (ROOT / "paligemma_ft" / "assets" / "tiny_tokenizer.model").read_bytes()
    assert len(shipped) < 100_000
    # Compare pieces, scores and types rather than bytes: another protobuf version may serialize differently.
    assert _piece_table(first) == _piece_table(shipped), "Stale asset: run scripts/make_tiny_tokenizer.py."


def test_script_writes_the_file(tmp_path):
    out = tmp_path / "sub" / "tok.model"
    _load_script().main(["--out", str(out)])
    assert Tokenizer(out).vocab_size == presets.TINY_VOCAB


def test_from_spec(tmp_path, tok):
    assert Tokenizer.from_spec("builtin:demo").model_bytes == tok.model_bytes
    path = tmp_path / "t.model"
    path.write_bytes(tok.model_bytes)
    loaded = Tokenizer.from_spec(str(path))
    assert loaded.encode("a red circle") == tok.encode("a red circle")
    assert loaded.name == str(path)
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match=r"nope\.model.*builtin:tiny"):
        Tokenizer.from_spec(str(missing))
    with pytest.raises(ValueError, match="builtin:tiny"):
        Tokenizer.from_spec("builtin:huge")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model"):
        Tokenizer(bad)
    with pytest.raises(ValueError, match="no pieces"):
        Tokenizer(b"")


def test_missing_pieces_are_reported(tok):
    # A model without the <loc>/<seg> pieces: the tiny base vocabulary alone.
    proto = model_pb2.ModelProto()
    proto.ParseFromString(tok.model_bytes)
    del proto.pieces[BASE:]
    plain = Tokenizer(proto.SerializeToString(), name="plain")
    assert plain.loc_base is None
    with pytest.raises(ValueError, match="plain has no piece <loc0003>"):
        plain.loc_id(3)
    with pytest.raises(ValueError, match="<seg010>"):
        plain.seg_id(10)


def test_pickle_round_trip(tok):
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.encode("a red circle") == tok.encode("a red circle")
    assert copy.name == "builtin:tiny"


def test_check_vocab(tok):
    check_vocab(tok, presets.TINY_VOCAB, source="tiny_pg1")  # Equal: silent.
    with pytest.raises(ValueError, match=r"1664 pieces.*ckpt\.npz embeds only 1000"):
        check_vocab(tok, 1000, source="ckpt.npz")
    with pytest.warns(UserWarning, match="fewer than the 2000"):
        check_vocab(tok, 2000, source="ckpt.npz")
