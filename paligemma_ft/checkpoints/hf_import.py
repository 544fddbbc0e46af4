"""A Hugging Face PaliGemma folder read as our parameters, tensor by tensor: the exact inverse of `hf_export`.

`HFSource` is a `ParamSource` (`checkpoints/fit.py`) over an HF folder (`config.json` + safetensors, any of the
tensor-name layouts of `hf_names`), so training (`model_init=hf:...` or a folder), inference and `convert` read it
like an `.npz`: names and shapes first, then one parameter at a time (each of our per-layer parameters from its
HF tensors; `fit.relayout` stacks layers for a scanned model).

What does not map one to one:
  * Vocabulary: HF's table has our V rows, then `<image>` (the placeholder id, usually V) and padding to a
    multiple of 64 (257 216 rows for 257 152 tokens). The extra rows are dropped only when no token uses them:
    the folder's tokenizer files (`tokenizer.model`, `tokenizer.json`, `tokenizer_config.json`) say which ids
    exist; a token other than `<image>` past the SentencePiece vocabulary is refused (big_vision's tokenizer
    cannot produce it), unless `vocab="keep"` keeps every row.
  * Tied embeddings: an `lm_head.weight` in the files must equal the embedding (big_vision ties them).
  * Gemma 2's sliding window: big_vision attends to every token; `check_sliding_window` warns, naming the
    setting, when HF's window is shorter than the sequences a config will see.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from paligemma_ft.checkpoints import hf, hf_export, hf_files, hf_names
from paligemma_ft.checkpoints.npz import ArraySpec, CheckpointError
from paligemma_ft.model.presets import resolve_img_config, resolve_llm_config
from paligemma_ft.utils import names_and_shapes

_LOG = logging.getLogger(__name__)
_TIE_CHUNK = 4096  # Rows compared at a time when checking a stored lm_head against the embedding.


def _config(folder: Path) -> dict[str, Any]:
    hf_config = hf_files.read_config(folder)
    if hf_config is None:
        raise CheckpointError(f"{folder} has no readable config.json; it is not a Hugging Face model folder.")
    return hf_config


def _image_token(hf_config: Mapping[str, Any]) -> int | None:
    value = hf_config.get("image_token_index", hf_config.get("image_token_id"))
    return None if value is None else int(value)


def _tokenizer_ids(folder: Path) -> tuple[int | None, dict[int, str]]:
    """`(SentencePiece vocabulary size or None, {added token id: content})` from the folder's tokenizer files."""
    base, added = None, {}
    if (folder / "tokenizer.model").is_file():
        import sentencepiece as spm  # noqa: PLC0415

        base = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if name == "tokenizer.json":
            vocab = (data.get("model") or {}).get("vocab")
            base = base if base is not None or vocab is None else len(vocab)
            added.update({int(t["id"]): str(t.get("content")) for t in data.get("added_tokens") or []})
        else:
            added.update({int(i): str(t.get("content")) for i, t in (data.get("added_tokens_decoder") or {}).items()})
    return base, added


def vocab_rows(folder: Path, hf_config: Mapping[str, Any], rows: int, *, vocab: str = "auto") -> tuple[int, str]:
    """`(our vocabulary size, how it was decided)` for an HF table of `rows` rows.

    Raises:
      CheckpointError: a token other than `<image>` uses a row past the SentencePiece vocabulary (listed), or
        the tokenizer has more ids than the table has rows.
    """
    if vocab == "keep":
        return rows, f"kept all {rows} embedding rows (vocab='keep')"
    image = _image_token(hf_config)
    base, added = _tokenizer_ids(folder)
    if base is None:
        if image is not None and image < rows:
            return image, (
                f"no tokenizer files in {folder}: rows {image}..{rows - 1} (<image> and padding) taken as unused"
            )
        return rows, f"no tokenizer files in {folder}: all {rows} rows kept"
    used = {i: c for i, c in added.items() if i >= base and i != image}
    if used:
        shown = ", ".join(f"{i} {c!r}" for i, c in sorted(used.items())[:5])
        raise CheckpointError(
            f"{folder}: embedding rows past the {base} SentencePiece pieces are used by tokens the tokenizer added "
            f"({shown}{' ...' if len(used) > 5 else ''}); big_vision's tokenizer cannot produce them, so they are "
            "not dropped. Convert with --keep-vocab to keep every row (those ids stay unused by paligemma_ft)."
        )
    if base > rows:
        raise CheckpointError(f"{folder}: the tokenizer has {base} pieces but the embedding only {rows} rows.")
    return base, f"rows {base}..{rows - 1} (<image> and padding, used by no token) dropped"


def model_config_from_folder(folder: str | os.PathLike, *, vocab: str = "auto") -> tuple[dict[str, Any], int]:
    """Our `(model hf_config, image size)` for an HF PaliGemma folder (hf_config + tokenizer + tensor headers).

    Raises:
      CheckpointError: not a PaliGemma folder, missing shards, or a setting big_vision cannot express.
    """
    folder = Path(folder)
    hf_config = _config(folder)
    hf.from_hf_config(hf_config, vocab_size=0, where=str(folder / "config.json"))  # Not PaliGemma: say so first.
    with hf_files.HFWeights(folder) as weights:
        rows = _embedding_rows(weights, folder)
    v, _ = vocab_rows(folder, hf_config, rows, vocab=vocab)
    return hf.from_hf_config(hf_config, vocab_size=v, where=str(folder / "config.json"))


def _embedding_rows(weights: hf_files.HFWeights, folder: Path) -> int:
    for name, spec in weights.specs().items():
        if hf_names.canonical(name) == hf_names.EMBEDDING:
            return spec.shape[0]
    raise CheckpointError(f"{folder} has no token embedding ({hf_names.in_layout(hf_names.EMBEDDING)}).")


def check_sliding_window(folder: str | os.PathLike, num_image_tokens: int, text_len: int, setting: str) -> str | None:
    """Warns (and returns the message) when a Gemma 2 folder's sliding window is shorter than the sequences.

    big_vision's Gemma attends to every token, as our model does; HF's sliding layers see only the last
    `sliding_window` tokens. Past that length the two compute different things: what the checkpoint was trained
    with decides which is right (the released PaliGemma 2 weights were trained without a window).
    """
    hf_config = _config(Path(folder))
    window = hf.sliding_window(hf_config)
    length = num_image_tokens + text_len
    if window is None or length <= window:
        return None
    message = (
        f"text_config.sliding_window={window} in {Path(folder) / 'config.json'}: HF's Gemma 2 attends only to the "
        f"last {window} tokens in its sliding layers, big_vision (and paligemma_ft) to all; sequences here reach "
        f"{length} tokens ({num_image_tokens} image + {setting}={text_len}), so they differ from HF's computation "
        f"past {window}. Keep {setting} <= {window - num_image_tokens} to match HF exactly."
    )
    warnings.warn(message, UserWarning, stacklevel=2)
    _LOG.warning(message)
    return message


class HFSource:
    """An HF PaliGemma folder as a `ParamSource` of our per-layer names. Use `with`, or call `close()`.

    Attributes:
      model_config, image_size: the model the folder holds, in our terms.
      vocab_note: how the vocabulary size was decided (for logs and summaries).

    Raises (on open):
      CheckpointError: not a PaliGemma folder, missing shards, an untied `lm_head`, rows used by added tokens,
        a setting big_vision cannot express; each named with the file.
    """

    def __init__(self, folder: str | os.PathLike, *, vocab: str = "auto", log: logging.Logger = _LOG):
        self.folder = Path(folder)
        hf_config = _config(self.folder)
        hf.from_hf_config(hf_config, vocab_size=0, where=str(self.folder / "config.json"))  # Not PaliGemma: first.
        self.weights = hf_files.HFWeights(self.folder)
        try:
            self._open(hf_config, vocab, log)
        except BaseException:
            self.weights.close()
            raise

    def _open(self, hf_config: dict[str, Any], vocab: str, log: logging.Logger) -> None:
        stored = self.weights.specs()
        self._actual = {}  # canonical name -> name in the files
        self._unknown = {}  # names of no known layout -> spec (reported as unexpected)
        for name, spec in stored.items():
            short = hf_names.canonical(name)
            if short is None:
                self._unknown[name] = spec
            else:
                self._actual[short] = name
        rows = _embedding_rows(self.weights, self.folder)
        self.vocab, self.vocab_note = vocab_rows(self.folder, hf_config, rows, vocab=vocab)
        log.info("%s: vocabulary of %d: %s.", self.folder, self.vocab, self.vocab_note)
        self.model_config, self.image_size = hf.from_hf_config(
            hf_config, vocab_size=self.vocab, where=str(self.folder / "config.json")
        )
        llm = resolve_llm_config(self.model_config["llm"])
        img = resolve_img_config(self.model_config["img"], llm_width=llm["width"])
        shapes = names_and_shapes(hf_export.per_layer_abstract(self.model_config, self.image_size))
        self._rules, self._specs = {}, {}
        consumed = set()
        for rule in hf_names.rules_for(img, llm):
            present = [n for n in rule.hf if n in self._actual]
            consumed.update(present)
            if len(present) == len(rule.hf):
                dtypes = {stored[self._actual[n]].dtype for n in rule.hf}
                self._rules[rule.ours] = rule
                self._specs[rule.ours] = ArraySpec(shapes[rule.ours], dtypes.pop())
        table = stored[self._actual[hf_names.EMBEDDING]]
        self._specs["llm/embedder/input_embedding"] = ArraySpec((self.vocab, table.shape[1]), table.dtype)
        consumed.add(hf_names.EMBEDDING)
        if hf_names.LM_HEAD in self._actual:
            self._check_tied(hf_config)
            consumed.add(hf_names.LM_HEAD)
        for short, name in self._actual.items():  # Known layout, but no parameter of ours: unexpected.
            if short not in consumed:
                self._unknown[name] = stored[name]
        self._specs.update(self._unknown)

    def _check_tied(self, hf_config: Mapping[str, Any]) -> None:
        """An `lm_head.weight` in the files must be the embedding (big_vision's output layer is tied)."""
        head, table = self._actual[hf_names.LM_HEAD], self._actual[hf_names.EMBEDDING]
        specs = self.weights.specs()
        untied = specs[head].shape != specs[table].shape
        rows = specs[table].shape[0]
        for start in range(0, rows, _TIE_CHUNK):
            if untied:
                break
            part = slice(start, min(start + _TIE_CHUNK, rows))
            untied = not np.array_equal(self.weights.read(head, part), self.weights.read(table, part))
        if untied:
            text = hf_config.get("text_config") or {}
            tied = hf_config.get("tie_word_embeddings", text.get("tie_word_embeddings"))
            raise CheckpointError(
                f"{self.folder}: {head} differs from {table} (tie_word_embeddings={tied}); "
                "big_vision's PaliGemma ties its output layer to the embedding, so this model cannot be converted."
            )

    @property
    def where(self) -> str:
        return repr(str(self.folder))

    def specs(self) -> dict[str, ArraySpec]:
        return self._specs

    def read(self, name: str, index: int | None = None) -> np.ndarray:
        """One of our parameters (stored dtype kept), or, for an unknown HF tensor, the tensor as stored."""
        if name == "llm/embedder/input_embedding":
            out = self.weights.read(self._actual[hf_names.EMBEDDING], slice(0, self.vocab))
        elif name in self._rules:
            rule = self._rules[name]
            arrays = [self.weights.read(self._actual[n]) for n in rule.hf]
            out = np.ascontiguousarray(rule.from_hf(arrays, self._specs[name].shape))
        else:
            out = self.weights.read(name)
        return out if index is None else np.ascontiguousarray(out[index])

    def close(self) -> None:
        self.weights.close()

    def __enter__(self) -> HFSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
