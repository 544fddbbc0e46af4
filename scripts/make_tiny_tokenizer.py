"""Builds `paligemma_ft/assets/tiny_tokenizer.model`: a small SentencePiece model with PaliGemma's layout.

The real PaliGemma tokenizer is Gemma's 256 000-piece SentencePiece model with `<loc0000>`..`<loc1023>` and
`<seg000>`..`<seg127>` appended at the end as USER_DEFINED pieces of score 0 (big_vision reference, section 4).
Tests, the demo and the tiny model presets need the same layout without the 4 MiB file or a network, so this
script trains, offline and deterministically, a BPE model of `BASE_VOCAB` pieces on an in-script corpus that
covers the generated "shapes" dataset and the PaliGemma prompt words, then appends the same 1152 extra pieces:

    pad 0, eos 1, bos 2, unk 3, <0x00>..<0xFF> (byte fallback), learned pieces ..., "\n" is one piece,
    <loc0000> = BASE_VOCAB, ..., <loc1023> = BASE_VOCAB + 1023, <seg000> = BASE_VOCAB + 1024, ... <seg127>.

Byte fallback makes any text encodable (unseen characters become their UTF-8 bytes, never `unk`).

Usage: `python scripts/make_tiny_tokenizer.py [--out PATH]`. Running it twice writes identical bytes.
"""

from __future__ import annotations

import argparse
import io
import itertools
import pathlib
from collections.abc import Iterator

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

BASE_VOCAB = 512  # Learned + special + byte pieces; `presets.TINY_VOCAB` = BASE_VOCAB + 1024 + 128 = 1664.
NUM_LOC = 1024  # <loc0000>..<loc1023>, as big_vision's `tokensets.loc`.
NUM_SEG = 128  # <seg000>..<seg127>, as big_vision's `tokensets.seg`.
DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "paligemma_ft" / "assets" / "tiny_tokenizer.model"

COLOURS = "red green blue yellow purple orange white black gray pink brown cyan".split()
SHAPES = "circle square triangle star rectangle ellipse cross diamond".split()
POSITIONS = [
    "top",
    "bottom",
    "left",
    "right",
    "center",
    "middle",
    "upper",
    "lower",
    "corner",
    "top left",
    "top right",
    "bottom left",
    "bottom right",
    "upper left",
    "lower right",
]
SIZES = "big small large tiny".split()
NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()
PROMPTS = [
    "caption en",
    "describe en",
    "answer en how many",
    "detect",
    "question en",
    "ocr",
    "cap en",
    "segment",
    "answer en what color is the",
    "answer en where is the",
]
COMMON = (
    "a an the of on in and there is are with image picture photo background shape shapes color colour "
    "what where which how many count number it this that some no yes to at by for from near next "
    "above below under over beside between object objects drawn plain"
).split()


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def corpus() -> Iterator[str]:
    """Yields the training sentences, always in the same order (no randomness, so training is reproducible)."""
    # Captions like the generated shapes dataset: "a red circle in the top left".
    for colour, shape in itertools.product(COLOURS, SHAPES):
        yield f"a {colour} {shape}"
        yield f"caption en\na {colour} {shape} on a white background"
        for position in POSITIONS:
            yield f"a {colour} {shape} in the {position}"
        for size in SIZES:
            yield f"a {size} {colour} {shape}"
    # Counting questions and answers, with digits and number words.
    for count, word in enumerate(NUMBER_WORDS):
        for shape in SHAPES:
            noun = shape if count == 1 else _plural(shape)
            yield f"answer en how many {_plural(shape)} are there?\n{count}"
            yield f"there are {word} {noun} in the image. {count} {noun}"
        yield f"{count} {word}, {count}; {word}"
    for a, b in itertools.product(range(10), range(10)):
        yield f"{a}{b} {a} {b}"
    # The other PaliGemma task prompts, each followed by the separator.
    for prompt, colour in itertools.product(PROMPTS, COLOURS):
        yield f"{prompt} {colour}\n"
        yield f"{prompt}\nthe picture shows a {colour} shape"
    for shape_a, shape_b in itertools.product(SHAPES, SHAPES):
        yield f"detect {shape_a} ; {shape_b}\n"
    yield " ".join(COMMON)
    for word in COMMON:
        yield f"this is {word} and that is {word}, with the {word}."
    # Upper case and punctuation so they get pieces of their own, not only bytes.
    for word in COLOURS + SHAPES + NUMBER_WORDS + COMMON:
        yield f"{word.capitalize()} {word.upper()}: {word}! ({word}) \"{word}\" '{word}' - {word}?"


def _train_base() -> model_pb2.ModelProto:
    """Trains the `BASE_VOCAB`-piece BPE model (special ids as PaliGemma: pad 0, eos 1, bos 2, unk 3)."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=corpus(),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=BASE_VOCAB,
        hard_vocab_limit=True,  # Exactly BASE_VOCAB, so the extra pieces land where the presets expect.
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        # Like Gemma: text is kept as written (no NFKC, no dummy prefix, whitespace kept), "\n" is a piece.
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        num_threads=1,  # One thread: the merge order then cannot depend on scheduling.
        minloglevel=2,
    )
    proto = model_pb2.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    return proto


def extra_pieces() -> list[str]:
    """The pieces big_vision appends (`tokensets=("loc", "seg")`), in id order."""
    return [f"<loc{i:04d}>" for i in range(NUM_LOC)] + [f"<seg{i:03d}>" for i in range(NUM_SEG)]


def build() -> bytes:
    """Returns the serialized tiny tokenizer model (the same bytes on every call).

    Raises:
      RuntimeError: if the trained model misses the expected layout (size, special ids, single-piece "\\n").
    """
    proto = _train_base()
    if len(proto.pieces) != BASE_VOCAB:
        raise RuntimeError(f"Trained {len(proto.pieces)} pieces, expected {BASE_VOCAB}: enlarge the corpus.")
    existing = {p.piece for p in proto.pieces}
    for piece in extra_pieces():
        if piece in existing:  # big_vision's `_add_pieces` also skips pieces already present.
            raise RuntimeError(f"Piece {piece!r} was learned from the corpus; the layout would shift.")
        proto.pieces.add(piece=piece, score=0.0, type=model_pb2.ModelProto.SentencePiece.USER_DEFINED)
    model = proto.SerializeToString(deterministic=True)
    _check(model)
    return model


def _check(model: bytes) -> None:
    """Verifies the properties the library relies on; raises RuntimeError naming the one that fails."""
    sp = spm.SentencePieceProcessor(model_proto=model)
    if (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) != (0, 1, 2, 3):
        raise RuntimeError("Special ids must be pad 0, eos 1, bos 2, unk 3.")
    newline = sp.EncodeAsIds("\n")
    if len(newline) != 1 or sp.IdToPiece(newline[0]) != "\n":
        raise RuntimeError(f'"\\n" must encode as one piece, got {sp.EncodeAsPieces(chr(10))}.')
    for offset, piece in enumerate(extra_pieces()):
        if sp.EncodeAsIds(piece) != [BASE_VOCAB + offset]:
            raise RuntimeError(f"{piece} does not encode as the single id {BASE_VOCAB + offset}.")
    if sp.GetPieceSize() != BASE_VOCAB + NUM_LOC + NUM_SEG:
        raise RuntimeError(f"Vocabulary has {sp.GetPieceSize()} pieces.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="where to write the .model file")
    args = parser.parse_args(argv)
    model = build()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(model)
    print(f"Wrote {args.out} ({len(model)} bytes, {BASE_VOCAB + NUM_LOC + NUM_SEG} pieces).")


if __name__ == "__main__":
    main()
