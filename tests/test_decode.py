"""Decoding: cached decoding equals uncached argmax decoding; samplers are seeded; beam search semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paligemma_ft import decode as dec
from paligemma_ft.model import Model, get_preset

MAX_LEN = 6


def _perturbed_model(name, seed=0):
    cfg, res = get_preset(name)
    model = Model(**cfg)
    image = jnp.zeros((1, res, res, 3))
    params = model.init(jax.random.PRNGKey(seed), image, jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4), jnp.int32))[
        "params"
    ]
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 64))
    params = jax.tree.map(lambda p: p + 0.2 * jax.random.normal(next(keys), p.shape), params)
    return model, params, res


def _batch(res, prompts, length=8, seed=0):
    """Left-aligned prompts of different lengths: mask_ar 0 on the prompt, mask_input 1, padding after."""
    rng = np.random.default_rng(seed)
    b = len(prompts)
    text = np.zeros((b, length), np.int32)
    mask_input = np.zeros((b, length), np.int32)
    for i, p in enumerate(prompts):
        text[i, : len(p)] = p
        mask_input[i, : len(p)] = 1
    mask_ar = 1 - mask_input  # Prompt 0, padding 1 (as big_vision's tolen).
    image = rng.uniform(-1, 1, (b, res, res, 3)).astype(np.float32)
    return dict(image=image, text=text, mask_ar=mask_ar, mask_input=mask_input, _mask=np.ones(b, bool))


def _uncached_greedy(model, params, batch, n):
    """Reference: rerun the whole forward on prompt + generated tokens, one row at a time, take the argmax."""
    out = []
    for i in range(batch["text"].shape[0]):
        L = int(batch["mask_input"][i].sum())
        toks = list(batch["text"][i, :L])
        ar = [0] * L
        gen, logps = [], []
        for _ in range(n):
            logits, _ = model.apply({"params": params}, batch["image"][i : i + 1], jnp.array([toks]), jnp.array([ar]))
            last = logits[0, -1]
            t = int(jnp.argmax(last))
            gen.append(t)
            logps.append(float(jax.nn.log_softmax(last)[t]))
            toks.append(t)
            ar.append(1)
        out.append((gen, logps))
    return out


@pytest.mark.slow  # ~40 s: one uncached compile per length; fast: test_hf_bridge's generate == predict
@pytest.mark.parametrize("name", ["tiny_pg1", "tiny_pg2"])
def test_cached_greedy_equals_uncached(name):
    model, params, res = _perturbed_model(name)
    batch = _batch(res, [[2, 10, 11, 12], [2, 20], [2, 30, 31, 32, 33, 34]])
    tokens, logp = dec.decode(
        model, params, batch, max_decode_len=MAX_LEN, cache_dtype=None, eos_token=-1, return_logp=True
    )
    ref = _uncached_greedy(model, params, batch, MAX_LEN)
    for i, (gen, logps) in enumerate(ref):
        assert list(np.asarray(tokens[i])) == gen
        np.testing.assert_allclose(logp[i], logps, atol=2e-5)


@pytest.mark.slow  # fast: test_early_stop_and_padding_rows
def test_final_softcap_applies_from_second_token_only():
    """Reference 2.6: with a final soft-cap, the first token's logp is uncapped, later ones capped."""
    model, params, res = _perturbed_model("tiny_pg2")
    capped = model.clone(llm=dict(model.llm, final_logits_softcap=1.0))
    batch = _batch(res, [[2, 10, 11]])
    t0, lp0 = dec.decode(model, params, batch, max_decode_len=3, cache_dtype=None, eos_token=-1, return_logp=True)
    t1, lp1 = dec.decode(capped, params, batch, max_decode_len=3, cache_dtype=None, eos_token=-1, return_logp=True)
    np.testing.assert_array_equal(t0, t1)  # tanh is monotonic: greedy tokens agree.
    np.testing.assert_allclose(lp0[:, 0], lp1[:, 0], atol=1e-6)
    assert not np.allclose(lp0[:, 1:], lp1[:, 1:], atol=1e-3)


@pytest.mark.slow  # fast: test_decode_dtype's bfloat16 token loop
def test_bf16_cache_close_to_f32():
    model, params, res = _perturbed_model("tiny_pg1")
    batch = _batch(res, [[2, 10, 11, 12], [2, 20]])
    _, a = dec.decode(model, params, batch, max_decode_len=1, cache_dtype=None, eos_token=-1, return_logp=True)
    _, b = dec.decode(model, params, batch, max_decode_len=1, cache_dtype="bfloat16", eos_token=-1, return_logp=True)
    assert np.max(np.abs(np.asarray(a) - np.asarray(b))) < 0.1


def test_early_stop_and_padding_rows():
    model, params, res = _perturbed_model("tiny_pg1")
    batch = _batch(res, [[2, 10, 11, 12], [2, 20]])
    free = np.asarray(dec.decode(model, params, batch, max_decode_len=MAX_LEN, eos_token=-1))
    eos = int(free[0, 0])  # Pretend row 0's first token is EOS; row 1 is padding.
    batch["_mask"] = np.array([True, False])
    tokens = np.asarray(dec.decode(model, params, batch, max_decode_len=MAX_LEN, eos_token=eos))
    assert tokens[0, 0] == free[0, 0]
    assert (tokens[:, 1:] == 0).all()  # Everyone done after column 0: the rest stays 0.
    # Without the padding row, row 1 keeps going: it never emits row 0's first token (checked: the case under
    # test), so no early stop happens and both rows decode every column exactly as without EOS (a row's tokens
    # after its EOS are still generated; detokenizing cuts them).
    assert eos not in free[1], (eos, free[1])
    batch["_mask"] = np.array([True, True])
    tokens = np.asarray(dec.decode(model, params, batch, max_decode_len=MAX_LEN, eos_token=eos))
    np.testing.assert_array_equal(tokens, free)


@pytest.mark.slow  # ~20 s; fast: test_compiles_once_per_shape samples
def test_samplers_seeded():
    model, params, res = _perturbed_model("tiny_pg1")
    batch = _batch(res, [[2, 10, 11, 12], [2, 20]])
    kw = dict(max_decode_len=MAX_LEN, eos_token=-1)
    greedy = np.asarray(dec.decode(model, params, batch, **kw))
    for spec in ("temperature(1.5)", "top_k(5)", "nucleus(0.9)"):
        a = np.asarray(dec.decode(model, params, batch, sampler=spec, rng=1, **kw))
        b = np.asarray(dec.decode(model, params, batch, sampler=spec, rng=1, **kw))
        c = np.asarray(dec.decode(model, params, batch, sampler=spec, rng=2, **kw))
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c), spec
    np.testing.assert_array_equal(np.asarray(dec.decode(model, params, batch, sampler="top_k(1)", rng=3, **kw)), greedy)
    np.testing.assert_array_equal(
        np.asarray(dec.decode(model, params, batch, sampler="nucleus(1e-6)", rng=3, **kw)), greedy
    )


def test_parse_sampler():
    assert dec.parse_sampler("top_k(k=40, t=0.5)") == dec.Sampler("top_k", k=40, temperature=0.5)
    assert dec.parse_sampler("beam(3, alpha=0.6)") == dec.Sampler("beam", beam_size=3, length_penalty=0.6)
    for bad in ("import os", "top_k(os.system)", "warp(2)"):
        with pytest.raises(ValueError):
            dec.parse_sampler(bad)


def _seq_score(model, params, batch, i, seq):
    """Sum of logp of `seq` (up to and incl. its first EOS) given row i's prompt, by full forward passes."""
    L = int(batch["mask_input"][i].sum())
    toks = list(batch["text"][i, :L]) + list(seq)
    logits, _ = model.apply(
        {"params": params}, batch["image"][i : i + 1], jnp.array([toks]), jnp.array([[0] * L + [1] * len(seq)])
    )
    lp = jax.nn.log_softmax(logits[0, L - 1 : -1])
    return float(sum(lp[j, t] for j, t in enumerate(seq)))


@pytest.mark.slow  # ~30 s; fast: test_parse_sampler
def test_beam_search():
    model, params, res = _perturbed_model("tiny_pg1")
    batch = _batch(res, [[2, 10, 11, 12], [2, 20]])
    greedy = np.asarray(dec.decode(model, params, batch, max_decode_len=MAX_LEN, cache_dtype=None, eos_token=-1))
    eos = int(greedy[0, 2])  # A token greedy emits at step 2 of row 0: make it EOS.
    g = np.asarray(dec.decode(model, params, batch, max_decode_len=MAX_LEN, cache_dtype=None, eos_token=eos))
    seqs, scores = dec.decode(
        model,
        params,
        batch,
        max_decode_len=MAX_LEN,
        cache_dtype=None,
        eos_token=eos,
        sampler="beam(3)",
        return_beams=True,
    )
    seqs, scores = np.asarray(seqs), np.asarray(scores)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # Sorted best first.
    # Every returned hypothesis is EOS-terminated, zeros after, and its score is its true log-probability.
    for i in range(2):
        for k in range(3):
            s = list(seqs[i, k])
            assert eos in s, (i, k, s)
            end = s.index(eos) + 1
            assert not any(s[end:]), (i, k, s)
            np.testing.assert_allclose(scores[i, k], _seq_score(model, params, batch, i, s[:end]), atol=1e-4)
    # The best beam scores at least as well as greedy's EOS-terminated output.
    row0 = list(g[0, : list(g[0]).index(eos) + 1])
    assert scores[0, 0] >= _seq_score(model, params, batch, 0, row0) - 1e-5
    # Beam size 1 follows the greedy path; big_vision's rule keeps the best EOS-terminated prefix of it, so it
    # equals greedy's output or a more probable, shorter EOS-terminated prefix of the same path.
    one, one_score = dec.decode(
        model,
        params,
        batch,
        max_decode_len=MAX_LEN,
        cache_dtype=None,
        eos_token=eos,
        sampler="beam(1)",
        return_logp=True,
    )
    one = list(np.asarray(one[0]))
    n = one.index(eos)
    assert one[:n] == list(g[0, :n])
    assert float(one_score[0]) >= _seq_score(model, params, batch, 0, row0) - 1e-5
    # When greedy's first token is EOS, beam size 1 returns exactly greedy's output.
    eos0 = int(greedy[1, 0])
    g1 = np.asarray(dec.decode(model, params, batch, max_decode_len=MAX_LEN, cache_dtype=None, eos_token=eos0))
    b1 = np.asarray(
        dec.decode(model, params, batch, max_decode_len=MAX_LEN, cache_dtype=None, eos_token=eos0, sampler="beam(1)")
    )
    assert g1[1, 0] == eos0 and b1[1, 0] == eos0 and (b1[1, 1:] == 0).all()


def test_compiles_once_per_shape():
    model, params, res = _perturbed_model("tiny_pg1")
    kw = dict(max_decode_len=4, eos_token=-1, sampler="temperature(0.9)")
    for seed in range(3):
        dec.decode(model, params, _batch(res, [[2, 5 + seed], [2, 7, 8]], seed=seed), rng=seed, **kw)
    assert dec.trace_count(model, 4, "temperature(0.9)", -1) == 1
