"""Constrained decoding of localization outputs: a per-position vocabulary mask that makes every output parse.

`LocGrammar` is a small automaton over token classes, run inside the jitted decode loop (`decode.decode(...,
constraint=LocGrammar.from_tokenizer(tok, "detect"))`). Each row carries a state; at every step the logits of the
tokens its state forbids are set to -1e30 before sampling, and the sampled token moves the state on:

    start       <loc> (y0)  or  EOS (nothing found: an empty output is valid)
    loc 2..4    <loc> only: x0, then y1 > y0, then x1 > x0 (so the box is never empty or inverted)
    seg 1..16   <seg> only (modes "segment" and "refseg")
    label       modes "detect"/"segment": one label piece first (text without ';', '<', '>', newlines), then more
                label text, spaces, ";" (then optional spaces, then the next object's <loc>) or EOS;
                modes "refexp"/"refseg": the label is optional (big_vision's RefCOCO targets have none)

A ";" and a first `<loc>` are only allowed while enough steps remain to finish an object before `max_decode_len`,
so a cut output never ends half-way: every output of a constrained decode is accepted by
`evaluate.detection.parse_detections` (with `require_label=False` for the ref modes).

Token classes come from the tokenizer's pieces; `<locNNNN>`/`<segNNN>` are recognised by name, so any tokenizer
with PaliGemma's extra pieces works (the real one, or `builtin:tiny`).

Axes: B batch rows, V vocab, S grammar states, C token classes.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MODES = {  # name -> (<seg> tokens per object, label required)
    "detect": (0, True),
    "segment": (16, True),
    "refexp": (0, False),
    "refseg": (16, False),
}
_NEG_INF = -1e30
# Token classes.
OTHER, LOC, SEG, EOS, SEP, SPACE, TEXT = range(7)
_NUM_CLASSES = 7
_LOC_PIECE, _SEG_PIECE = re.compile(r"<loc(\d{4})>"), re.compile(r"<seg(\d{3})>")


def token_classes(pieces: list[str], eos_id: int, special_ids: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """(class i8[V], loc bin i32[V] (-1 for other tokens)) of a vocabulary given as its pieces."""
    classes = np.full(len(pieces), OTHER, np.int8)
    bins = np.full(len(pieces), -1, np.int32)
    for i, piece in enumerate(pieces):
        text = piece.replace("\u2581", " ")
        if i == eos_id:
            classes[i] = EOS
        elif i in special_ids:
            continue
        elif m := _LOC_PIECE.fullmatch(piece):
            classes[i], bins[i] = LOC, int(m.group(1))
        elif _SEG_PIECE.fullmatch(piece):
            classes[i] = SEG
        elif any(c in text for c in "<>\n\r\t"):
            continue  # Byte pieces (<0x..>), markup and line breaks never belong to a label.
        elif text.strip() == ";":
            classes[i] = SEP
        elif text and not text.strip(" "):
            classes[i] = SPACE
        elif ";" not in text and text.strip():
            classes[i] = TEXT
    return classes, bins


class LocGrammar:
    """The automaton for one mode ("detect", "segment", "refexp", "refseg") over one vocabulary.

    Build it with `from_tokenizer`; pass it to `decode.decode(constraint=...)`. Its repr names the mode and a
    digest of the vocabulary, so compiled decode functions are cached per grammar.
    """

    def __init__(self, mode: str, classes: np.ndarray, bins: np.ndarray, name: str = ""):
        if mode not in MODES:
            raise ValueError(f"constrained decoding mode {mode!r} is unknown; known: {sorted(MODES)}")
        self.mode, self.num_seg, self.labels = mode, *MODES[mode]
        self.classes, self.bins = np.asarray(classes, np.int8), np.asarray(bins, np.int32)
        if not (self.classes == LOC).any() or (self.num_seg and not (self.classes == SEG).any()):
            raise ValueError(
                f"constrained decoding {mode!r} needs a tokenizer with <loc>{'/<seg>' if self.num_seg else ''} "
                f"pieces; {name or 'this vocabulary'} has none"
            )
        digest = hashlib.sha1(self.classes.tobytes() + self.bins.tobytes()).hexdigest()[:12]
        self._key = f"LocGrammar({mode}, V={len(self.classes)}, {digest})"
        # States: 0 start, 1 first <loc> after "; ", 2..4 <loc> 2..4, 5..5+num_seg-1 <seg>, then the label states.
        self.START, self.LOC0, self.SEG0 = 0, 1, 5
        self.LABEL_START = 5 + self.num_seg
        self.LABEL, self.LABEL_OPT, self.AFTER_SEP, self.DONE = (self.LABEL_START + k for k in (1, 2, 3, 4))
        self.num_states = self.DONE + 1
        self.object_len = 4 + self.num_seg + int(self.labels)  # Tokens an object needs at least.
        self.allowed, self.next = self._tables()

    @classmethod
    def from_tokenizer(cls, tok: Any, mode: str) -> LocGrammar:
        """The grammar of `mode` over a `paligemma_ft.tokenizer.Tokenizer`'s vocabulary."""
        special = {tok.pad_id, tok.bos_id, tok.unk_id}
        classes, bins = token_classes(tok.pieces(range(tok.vocab_size)), tok.eos_id, special)
        return cls(mode, classes, bins, name=getattr(tok, "name", ""))

    def __repr__(self) -> str:
        return self._key

    def _tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(allowed bool[S, C], next state i32[S, C]) before the position-dependent rules."""
        s, allowed = self.num_states, np.zeros((self.num_states, _NUM_CLASSES), bool)
        nxt = np.tile(np.arange(s, dtype=np.int32)[:, None], (1, _NUM_CLASSES))

        def rule(state: int, cls_: int, to: int) -> None:
            allowed[state, cls_], nxt[state, cls_] = True, to

        after_object = self.LABEL_START if self.labels else self.LABEL_OPT
        rule(self.START, LOC, 2)
        rule(self.START, EOS, self.DONE)
        rule(self.AFTER_SEP, SPACE, self.LOC0)
        rule(self.AFTER_SEP, LOC, 2)
        rule(self.LOC0, LOC, 2)
        rule(2, LOC, 3)
        rule(3, LOC, 4)
        rule(4, LOC, self.SEG0 if self.num_seg else after_object)
        for k in range(self.num_seg):
            rule(self.SEG0 + k, SEG, self.SEG0 + k + 1 if k + 1 < self.num_seg else after_object)
        rule(self.LABEL_START, TEXT, self.LABEL)
        for state in (self.LABEL, self.LABEL_OPT):
            rule(state, TEXT, self.LABEL)
            rule(state, SEP, self.AFTER_SEP)
            rule(state, EOS, self.DONE)
        rule(self.LABEL, SPACE, self.LABEL)
        rule(self.LABEL_OPT, SPACE, self.LABEL_OPT)
        rule(self.DONE, EOS, self.DONE)
        return allowed, nxt

    def init(self, batch: int) -> dict[str, jax.Array]:
        """The start state of `batch` rows: state, and the y0 / x0 bins of the box being written."""
        zeros = jnp.zeros((batch,), jnp.int32)
        return {"state": zeros, "y0": zeros, "x0": zeros}

    def mask_logits(self, logits: jax.Array, carry: dict[str, jax.Array], i: jax.Array, max_len: int) -> jax.Array:
        """logits f32[B, V] with the tokens row states forbid at position `i` (of `max_len`) set to -1e30."""
        classes, bins = jnp.asarray(self.classes, jnp.int32), jnp.asarray(self.bins)
        state = carry["state"]
        allowed = jnp.asarray(self.allowed)[state]  # [B, C]
        # Room left after this token: a ";" or an object's first token must leave enough for a whole object.
        left = max_len - i - 1
        starts_object = (state == self.START) | (state == self.AFTER_SEP) | (state == self.LOC0)
        allowed = allowed.at[:, SEP].set(allowed[:, SEP] & (left >= self.object_len))
        allowed = allowed.at[:, SPACE].set(allowed[:, SPACE] & ((state != self.AFTER_SEP) | (left >= self.object_len)))
        allowed = allowed.at[:, LOC].set(allowed[:, LOC] & (~starts_object | (left + 1 >= self.object_len)))
        ok = allowed[:, classes]  # [B, V]
        # Box geometry: y0, x0 <= 1022 (room for y1 > y0), y1 > y0, x1 > x0.
        low = jnp.where(state == 3, carry["y0"], jnp.where(state == 4, carry["x0"], -1))
        high = jnp.where(starts_object | (state == 2), 1022, 1023)
        in_range = (bins[None, :] > low[:, None]) & (bins[None, :] <= high[:, None])
        ok = ok & ((classes != LOC)[None, :] | in_range)
        return jnp.where(ok, logits, _NEG_INF)

    def advance(self, carry: dict[str, jax.Array], tokens: jax.Array) -> dict[str, jax.Array]:
        """The row states after emitting `tokens` i32[B]."""
        classes, bins = jnp.asarray(self.classes, jnp.int32), jnp.asarray(self.bins)
        state, cls_ = carry["state"], classes[tokens]
        first = ((state == self.START) | (state == self.AFTER_SEP) | (state == self.LOC0)) & (cls_ == LOC)
        return {
            "state": jnp.asarray(self.next)[state, cls_],
            "y0": jnp.where(first, bins[tokens], carry["y0"]),
            "x0": jnp.where(state == 2, bins[tokens], carry["x0"]),
        }

    def reorder(self, carry: dict[str, jax.Array], rows: jax.Array) -> dict[str, jax.Array]:
        """The carry of beams `rows` (beam search keeps the states of the surviving beams)."""
        return {k: v[rows] for k, v in carry.items()}
