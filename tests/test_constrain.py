"""Constrained localization decoding: every output parses (100 % validity), for every mode, sampler and length,
inside the jitted decode loop; without the constraint the same model's outputs mostly do not parse."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paligemma_ft import constrain, decode
from paligemma_ft.data import shapes
from paligemma_ft.evaluate.detection import parse_detections
from paligemma_ft.predictor import load_predictor, until_eos
from paligemma_ft.tokenizer import Tokenizer

TOK = Tokenizer.from_spec("builtin:tiny")
SEMICOLON = TOK.pieces(range(TOK.vocab_size)).index(";")


def _valid(text: str, mode: str) -> bool:
    boxes, ok = parse_detections(text, require_label=constrain.MODES[mode][1])
    n_seg = constrain.MODES[mode][0]
    return ok and all(len(b.seg or ()) == n_seg for b in boxes)


def test_token_classes_of_the_tiny_tokenizer():
    grammar = constrain.LocGrammar.from_tokenizer(TOK, "detect")
    by_piece = {p: int(c) for p, c in zip(TOK.pieces(range(TOK.vocab_size)), grammar.classes)}
    assert by_piece["<loc0000>"] == by_piece["<loc1023>"] == constrain.LOC
    assert by_piece["<seg127>"] == constrain.SEG and by_piece["</s>"] == constrain.EOS
    assert by_piece[";"] == constrain.SEP and by_piece["\u2581"] == constrain.SPACE
    assert by_piece["\u2581circle"] == by_piece["a"] == constrain.TEXT
    assert by_piece["<0x41>"] == by_piece["?\n"] == by_piece["<s>"] == by_piece["<pad>"] == constrain.OTHER
    assert grammar.bins[TOK.loc_id(42)] == 42 and grammar.bins[TOK.seg_id(3)] == -1
    with pytest.raises(ValueError, match="unknown; known"):
        constrain.LocGrammar.from_tokenizer(TOK, "ocr")


@pytest.mark.parametrize(  # One mode in the fast set (`-m "not slow"`), every mode in CI.
    "mode", [m if m == "detect" else pytest.param(m, marks=pytest.mark.slow) for m in sorted(constrain.MODES)]
)
def test_grammar_accepts_only_parsable_outputs_under_random_logits(mode):
    """The automaton alone, driven by random logits (any token may be the most likely): 256 rows per length."""
    grammar = constrain.LocGrammar.from_tokenizer(TOK, mode)
    rng = np.random.default_rng(0)
    step = jax.jit(lambda logits, carry, i, key, m: _step(grammar, logits, carry, i, key, m), static_argnums=4)
    for max_len in (1, 4, 5, 6, 20, 21, 22, 43):
        carry, tokens = grammar.init(256), []
        for i in range(max_len):
            logits = jnp.asarray(rng.normal(0, 3, (256, TOK.vocab_size)), jnp.float32)
            # Push EOS and ";" down sometimes and up other times, so long and short outputs both appear.
            logits = logits.at[:, TOK.eos_id].add(rng.normal(-2, 3)).at[:, SEMICOLON].add(rng.normal(4, 3))
            tok, carry = step(logits, carry, jnp.int32(i), jax.random.PRNGKey(i), max_len)
            tokens.append(np.asarray(tok))
        rows = np.stack(tokens, 1)
        texts = [TOK.decode(until_eos(r, TOK.eos_id)) for r in rows]
        assert all(_valid(t, mode) for t in texts), [t for t in texts if not _valid(t, mode)][:3]
        if max_len >= 2 * grammar.object_len + 1:  # Room for two objects.
            assert sum(t.count("<loc") >= 8 for t in texts) > 0, "no output had two objects"


def _step(grammar, logits, carry, i, key, max_len):
    masked = grammar.mask_logits(logits, carry, i, max_len)
    tok = jax.random.categorical(key, masked).astype(jnp.int32)
    return tok, grammar.advance(carry, tok)


@pytest.fixture(scope="module")
def demo():
    predictor = load_predictor("builtin:demo")
    images = [shapes.make_example(0, i, "detect")["image"] for i in range(8)]
    return predictor, predictor.prompt_batch(images, "detect circle")


@pytest.mark.parametrize(
    "sampler",
    [
        pytest.param("greedy", marks=pytest.mark.slow),  # ~17 s; fast: test_predict's --constrain run.
        pytest.param("temperature(3)", marks=pytest.mark.slow),
        pytest.param("beam(2)", marks=pytest.mark.slow),
    ],
)
def test_constrained_decoding_reaches_full_validity(demo, sampler):
    """The caption-pretrained demo model: free decoding writes captions (0 % valid); constrained, 100 %."""
    predictor, batch = demo
    free = predictor.generate(batch, max_decode_len=12, sampler=sampler)
    assert np.mean([_valid(t, "detect") for t in free]) < 0.5
    for mode, max_len in (("detect", 12), ("segment", 26), ("refexp", 5), ("refseg", 21)):
        predictor.constrain = mode
        try:
            texts = predictor.generate(batch, max_decode_len=max_len, sampler=sampler)
        finally:
            predictor.constrain = ""
        assert all(_valid(t, mode) for t in texts), (mode, texts)


def test_constrained_decode_is_one_jitted_loop(demo):
    predictor, batch = demo
    grammar = constrain.LocGrammar.from_tokenizer(predictor.tok, "detect")
    arrays = {k: jnp.asarray(batch[k]) for k in ("image", "text", "mask_ar", "mask_input")}
    for seed in range(3):
        out = decode.decode(predictor.model, predictor.params, arrays, max_decode_len=9, constraint=grammar, rng=seed)
    assert out.shape == (8, 9)
    key = f"{decode._with_cache_dtype(predictor.model, 'bfloat16')!r}|9|{decode.parse_sampler('greedy')}|1|{grammar!r}"
    assert decode.TRACE_COUNTS[key] == 1  # Compiled once; the grammar runs inside the loop, on the device.
