"""SentencePiece tokenizer and the token sequences PaliGemma trains and decodes on (big_vision reference 4).

`Tokenizer` wraps a SentencePiece model: the real `paligemma_tokenizer.model` (Gemma's 256 000 pieces, then
`<loc0000>`..`<loc1023>` = 256000.., then `<seg000>`..`<seg127>` = 257024..) or the small offline one shipped
as `builtin:tiny` (same layout on a 512-piece base, built by `scripts/make_tiny_tokenizer.py`).

The sequence builders reproduce big_vision's `combine_and_keep_train` / `combine_and_keep_eval`. A sequence is
three parts, `[bos] + prefix ‖ sep ‖ suffix`, where `sep` is `"\\n"` tokenized on its own:

    part         train text       mask_ar  mask_loss   |  prompt text      mask_ar  mask_input
    prefix       [bos] + prefix   0        0           |  [bos] + prefix   0        1
    sep          "\\n"             0        0           |  "\\n"             0        1
    suffix       suffix + [eos]   1        1           |  suffix (no eos)  1        1
    padding      0                1        0           |  0                1        0

`mask_ar` 0 marks the bidirectional prefix, 1 the causal part (see `model.paligemma.make_attn_mask`). Padding
keeps `mask_ar` 1, as big_vision's `tolen`, so pads never join the prefix. Too-long sequences are cut at the
end (an over-long suffix loses its EOS) and the builders return a `truncated` flag; callers count the flags and
report how many examples were cut, since silently truncated targets teach the model never to stop.
"""

from __future__ import annotations

import importlib.resources
import os
import pathlib
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import sentencepiece as spm

BUILTIN = {"tiny": "tiny_tokenizer.model", "demo": "tiny_tokenizer.model"}  # `builtin:<name>` -> asset file.
NUM_LOC = 1024  # <loc0000>..<loc1023>: detection coordinates in 1024 bins.
NUM_SEG = 128  # <seg000>..<seg127>: segmentation mask codebook entries.

Example = dict[str, np.ndarray]  # Keys -> int32[length] arrays.


class Tokenizer:
    """A SentencePiece model with the special ids and `<loc>`/`<seg>` pieces PaliGemma uses.

    Args:
      model: path of a `.model` file, or its serialized bytes.
      name: how errors and `repr` refer to the model (defaults to the path, or `"<bytes>"`).

    Raises:
      FileNotFoundError: the path does not exist.
      ValueError: the file or bytes are not a usable SentencePiece model.
    """

    def __init__(self, model: str | os.PathLike | bytes, *, name: str | None = None):
        if isinstance(model, (bytes, bytearray)):
            data, self.name = bytes(model), name or "<bytes>"
        else:
            path = pathlib.Path(model)
            self.name = name or str(path)
            if not path.is_file():
                raise FileNotFoundError(_missing_message(str(path)))
            data = path.read_bytes()
        self._model = data
        self._sp = _load(data, self.name)

    @classmethod
    def from_spec(cls, spec: str) -> Tokenizer:
        """Loads `builtin:tiny` (alias `builtin:demo`) or a SentencePiece `.model` file path.

        Raises:
          FileNotFoundError: the path does not exist (the message lists the accepted specs).
          ValueError: an unknown `builtin:` name or an unreadable model.
        """
        if spec.startswith("builtin:"):
            key = spec.removeprefix("builtin:")
            if key not in BUILTIN:
                raise ValueError(
                    f"Unknown tokenizer {spec!r}: builtin tokenizers are {', '.join('builtin:' + k for k in BUILTIN)}."
                )
            data = (importlib.resources.files("paligemma_ft") / "assets" / BUILTIN[key]).read_bytes()
            return cls(data, name=spec)
        return cls(os.path.expanduser(spec))

    # Pickling sends the model bytes, so tokenizers travel to data-loader worker processes.
    def __getstate__(self) -> dict:
        return {"model": self._model, "name": self.name}

    def __setstate__(self, state: dict) -> None:
        self._model, self.name = state["model"], state["name"]
        self._sp = _load(self._model, self.name)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"

    @property
    def model_bytes(self) -> bytes:
        """The serialized SentencePiece model."""
        return self._model

    @property
    def vocab_size(self) -> int:
        """Number of pieces (257 152 for PaliGemma, 1 664 for `builtin:tiny`)."""
        return self._sp.GetPieceSize()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def sep_ids(self) -> list[int]:
        """Ids of `"\\n"` encoded alone: the prefix/suffix separator (one piece in PaliGemma's model)."""
        return self.encode("\n")

    @property
    def loc_base(self) -> int | None:
        """Id of `<loc0000>` (256 000 in PaliGemma), or None when the model has no `<loc>` pieces."""
        return self._piece_id("<loc0000>")

    def loc_id(self, n: int) -> int:
        """Id of `<locNNNN>` (detection coordinate bin `n` in [0, 1024))."""
        return self._extra_id("loc", n, NUM_LOC, f"<loc{n:04d}>")

    def seg_id(self, n: int) -> int:
        """Id of `<segNNN>` (segmentation codebook entry `n` in [0, 128))."""
        return self._extra_id("seg", n, NUM_SEG, f"<seg{n:03d}>")

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally with BOS in front and EOS at the end (big_vision `to_int`)."""
        ids = self._sp.EncodeAsIds(text)
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int] | np.ndarray, *, stop_at_eos: bool = True) -> str:
        """Text of `ids`: cut at the first EOS (big_vision `to_str`), padding dropped.

        Args:
          ids: token ids, e.g. one row `i32[L]` of decoded tokens.
          stop_at_eos: drop everything from the first EOS on (generation pads with 0 after it anyway).

        Raises:
          ValueError: an id outside `[0, vocab_size)` (e.g. the model's vocabulary is larger than this one).
        """
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if stop_at_eos and self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        ids = [i for i in ids if i != self.pad_id]
        self._check_ids(ids)
        return self._sp.DecodeIds(ids)

    def pieces(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        """The piece string of every id, nothing dropped (`<bos>`, `▁red`, `\\n`, `<loc0042>`, `<0xC3>`)."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        self._check_ids(ids)
        return [self._sp.IdToPiece(i) for i in ids]

    def _piece_id(self, piece: str) -> int | None:
        # PieceToId answers unk for unknown pieces, so confirm the round trip.
        i = self._sp.PieceToId(piece)
        return i if self._sp.IdToPiece(i) == piece else None

    def _extra_id(self, kind: str, n: int, count: int, piece: str) -> int:
        if not 0 <= n < count:
            raise ValueError(f"{kind} index {n} is outside [0, {count}).")
        i = self._piece_id(piece)
        if i is None:
            raise ValueError(
                f"Tokenizer {self.name} has no piece {piece}; PaliGemma's tokenizer (and builtin:tiny) "
                f"append <loc0000>..<loc1023> and <seg000>..<seg127>."
            )
        return i

    def _check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"Token id {bad[0]} is outside the vocabulary of tokenizer {self.name} "
                f"(size {self.vocab_size}); does the model's vocabulary match the tokenizer?"
            )


def _missing_message(path: str) -> str:
    return (
        f"Tokenizer file {path!r} not found. Give the path of a SentencePiece .model file (e.g. PaliGemma's "
        f"paligemma_tokenizer.model) or one of: {', '.join('builtin:' + k for k in BUILTIN)}."
    )


def _load(data: bytes, name: str) -> spm.SentencePieceProcessor:
    try:
        sp = spm.SentencePieceProcessor(model_proto=data)
    except (RuntimeError, OSError) as e:
        raise ValueError(f"Tokenizer {name} is not a valid SentencePiece model: {e}") from e
    if sp.GetPieceSize() == 0:  # Empty bytes load without error but cannot tokenize anything.
        raise ValueError(f"Tokenizer {name} is not a valid SentencePiece model (no pieces).")
    return sp


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, *, source: str) -> None:
    """Checks that every token id indexes the model's embedding table.

    Args:
      tokenizer: the tokenizer feeding the model.
      model_vocab_size: rows of `llm/embedder/input_embedding`.
      source: where the model's size comes from (checkpoint path or preset), for the message.

    Raises:
      ValueError: the tokenizer has more pieces than the model has embeddings (ids would index out of range).
    Warns:
      UserWarning: the tokenizer is smaller; it works, but the model can emit ids the tokenizer cannot decode.
    """
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"Tokenizer {tokenizer.name} has {tokenizer.vocab_size} pieces but the model from {source} "
            f"embeds only {model_vocab_size}; ids >= {model_vocab_size} would index out of range. "
            "Use the tokenizer the model was trained with (or extend the model's vocabulary)."
        )
    if tokenizer.vocab_size < model_vocab_size:
        warnings.warn(
            f"Tokenizer {tokenizer.name} has {tokenizer.vocab_size} pieces, fewer than the "
            f"{model_vocab_size} embeddings of the model from {source}; generated ids above "
            f"{tokenizer.vocab_size - 1} cannot be decoded.",
            UserWarning,
            stacklevel=2,
        )


def _to_length(
    parts: Sequence[tuple[list[int], Mapping[str, int]]], length: int, pad: Mapping[str, int]
) -> tuple[Example, bool]:
    """Concatenates `(ids, {mask: value})` parts, then cuts or pads to `length` (big_vision `masked_concat`+`tolen`).

    Returns:
      (`{"text", *masks}` of int32[length], whether anything was cut off).
    """
    if length < 1:
        raise ValueError(f"Sequence length must be >= 1, got {length}.")
    arrays: dict[str, list[int]] = {key: [] for key in pad}
    for ids, masks in parts:
        arrays["text"] += ids
        for key, value in masks.items():
            arrays[key] += [value] * len(ids)
    total = len(arrays["text"])
    out = {
        key: np.asarray((values + [pad[key]] * (length - total))[:length], np.int32) for key, values in arrays.items()
    }
    return out, total > length


def make_train_example(tok: Tokenizer, prefix: str, suffix: str, length: int) -> tuple[Example, bool]:
    """A training sequence, exactly big_vision's `combine_and_keep_train` (the trainer passes `text_len + 1`).

    Example with `builtin:tiny`, prefix "caption en", suffix "a red circle", length 12
    (ids: bos 2; "caption en" -> P P; "\\n" -> S; "a red circle" -> A A A; eos 1):

        text       2 P P S A A A 1 0 0 0 0
        mask_ar    0 0 0 0 1 1 1 1 1 1 1 1
        mask_loss  0 0 0 0 1 1 1 1 0 0 0 0

    Args:
      tok: the tokenizer.
      prefix: the prompt (seen bidirectionally, no loss), e.g. "caption en".
      suffix: the target (causal, with loss), e.g. "a red circle".
      length: output length.

    Returns:
      (`{"text", "mask_ar", "mask_loss"}` each int32[length], `truncated`): `truncated` is True when the
      sequence was longer than `length` and was cut (an over-long suffix then loses its EOS).
    """
    parts = [
        (tok.encode(prefix, add_bos=True), {"mask_ar": 0, "mask_loss": 0}),
        (tok.sep_ids, {"mask_ar": 0, "mask_loss": 0}),
        (tok.encode(suffix, add_eos=True), {"mask_ar": 1, "mask_loss": 1}),
    ]
    return _to_length(parts, length, pad={"text": 0, "mask_ar": 1, "mask_loss": 0})


def make_prompt(tok: Tokenizer, prefix: str, length: int, suffix: str = "") -> tuple[Example, bool]:
    """A decoding prompt, exactly big_vision's `combine_and_keep_eval`: decoding continues after `suffix`.

    Example with prefix "caption en", no suffix, length 8 (P: prefix pieces, S: "\\n"):

        text        2 P P S 0 0 0 0
        mask_ar     0 0 0 0 1 1 1 1
        mask_input  1 1 1 1 0 0 0 0

    Args:
      tok: the tokenizer.
      prefix: the prompt, e.g. "caption en".
      length: output length (big_vision's `text_len`, or `prefill_len` in `run.py`).
      suffix: optional start of the answer, tokenized without EOS (mask_ar 1, mask_input 1).

    Returns:
      (`{"text", "mask_ar", "mask_input"}` each int32[length], `truncated`).
    """
    parts = [
        (tok.encode(prefix, add_bos=True), {"mask_ar": 0, "mask_input": 1}),
        (tok.sep_ids, {"mask_ar": 0, "mask_input": 1}),
        (tok.encode(suffix), {"mask_ar": 1, "mask_input": 1}),
    ]
    return _to_length(parts, length, pad={"text": 0, "mask_ar": 1, "mask_input": 0})


def stack(examples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks examples with the same keys and lengths into `[B, length]` arrays.

    Raises:
      ValueError: no examples, or an example whose keys or shapes differ from the first one's (named by index).
    """
    if not examples:
        raise ValueError("stack() needs at least one example.")
    keys = sorted(examples[0])
    for index, example in enumerate(examples):
        if sorted(example) != keys:
            raise ValueError(f"Example {index} has keys {sorted(example)}, expected {keys}.")
        for key in keys:
            if np.shape(example[key]) != np.shape(examples[0][key]):
                raise ValueError(
                    f"Example {index} key {key!r} has shape {np.shape(example[key])}, "
                    f"expected {np.shape(examples[0][key])}."
                )
    return {key: np.stack([np.asarray(example[key]) for example in examples]) for key in keys}
