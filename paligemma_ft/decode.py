"""Batched decoding with a KV cache, fully on the device: greedy, temperature, top-k, nucleus and beam search.

Semantics follow big_vision's `predict_fns` (reference 8): prompts arrive left-aligned with `mask_input`; the
prefill right-aligns each row so rows of different prompt lengths share one batch; every step samples from the
last logits, writes the token at column i, and extends the cache; the loop stops early once every row has
produced EOS or is a padding row (`_mask` False). All `max_decode_len` columns are returned: tokens after a row's
EOS are still generated, and columns after a global early stop stay 0 (cut at the first EOS when detokenizing).

Unlike big_vision, the token loop is a `lax.while_loop` inside one jitted function (no host round trip per
token), compiled once per batch shape and option set, and sampling is seeded by the caller's `rng`.

Axes: B batch, L prompt text length, P prompt length incl. image tokens, M max_decode_len, V vocab, K beams.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paligemma_ft.errors import UserError
from paligemma_ft.model import Model

PyTree = Any
_NEG_INF = -1e30

# How many times each decode function was traced (== compiled) — evaluation asserts it stays at one per shape.
TRACE_COUNTS: dict[str, int] = {}


# --- Samplers --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A parsed sampler spec: greedy, temperature(t), top_k(k, t=1), nucleus(p, t=1) (alias top_p), beam(n, alpha=0)."""

    kind: str
    temperature: float = 1.0
    k: int = 0
    p: float = 1.0
    beam_size: int = 1
    length_penalty: float = 0.0


class DecodeOptionError(UserError, ValueError):
    """A decoding option that cannot be used (e.g. `max_decode_len < 1`); the message names it."""


class SamplerError(DecodeOptionError):
    """A sampler spec that cannot be used: unknown name or keyword, a value out of range or not finite."""


_SPEC = re.compile(r"^\s*(\w+)\s*(?:\((.*)\))?\s*$")
_EXAMPLES = "e.g. 'greedy', 'temperature(0.7)', 'top_k(40)', 'nucleus(0.9)', 'beam(3)'"
# Each sampler's arguments in positional order, and the keywords that name them.
_ARGS: dict[str, tuple[str, ...]] = {
    "greedy": (),
    "temperature": ("t",),
    "top_k": ("k", "t"),
    "nucleus": ("p", "t"),
    "beam": ("n", "alpha"),
}
_NAMES = {"topk": "top_k", "top_p": "nucleus"}  # Aliases.
_KEYWORDS = {"temperature": "t", "beam_size": "n"}  # Long names of arguments.


def _sampler_args(spec: str, name: str, argstr: str) -> dict[str, float]:
    """`{argument: value}` of a spec's parenthesised arguments, each known, given once, and a finite number."""
    known = _ARGS[name]
    args: dict[str, float] = {}
    positional, keyword_seen = 0, False
    for part in filter(None, (a.strip() for a in argstr.split(","))):
        key, eq, val = part.partition("=")
        if eq:
            keyword_seen, key = True, _KEYWORDS.get(key.strip(), key.strip())
            if key not in known:
                takes = f"it takes {', '.join(known)}" if known else "it takes no arguments"
                raise SamplerError(f"sampler {spec!r}: unknown keyword {key!r} for {name}; {takes}")
        else:
            if keyword_seen:
                raise SamplerError(f"sampler {spec!r}: positional argument {part!r} after a keyword argument")
            if positional >= len(known):
                takes = f"at most {len(known)} argument(s) ({', '.join(known)})" if known else "no arguments"
                raise SamplerError(f"sampler {spec!r}: {name} takes {takes}")
            key, val, positional = known[positional], part, positional + 1
        if key in args:
            raise SamplerError(f"sampler {spec!r}: {key} is given twice")
        try:
            number = float(val)
        except ValueError:
            raise SamplerError(f"sampler {spec!r}: {key}={val.strip()!r} is not a number") from None
        if not math.isfinite(number):
            raise SamplerError(f"sampler {spec!r}: {key} must be a finite number, got {val.strip()}")
        args[key] = number
    return args


def _whole(spec: str, key: str, value: float) -> int:
    if value != int(value) or value < 1:
        raise SamplerError(f"sampler {spec!r}: {key} must be a whole number >= 1, got {value:g}")
    return int(value)


def parse_sampler(spec: str | Sampler) -> Sampler:
    """Parses "greedy", "temperature(0.7)", "top_k(40)", "top_k(k=40, t=0.8)", "nucleus(0.9)", "beam(3)",
    "beam(4, alpha=0.6)" (`topk`, `top_p`, `temperature=`, `beam_size=` are aliases). Numbers only: nothing is
    evaluated as code.

    Raises:
      SamplerError: an unknown sampler or keyword, or a value out of range, each named: `k >= 1` and `n >= 1`
        whole numbers, `0 < p <= 1`, temperature `t > 0` (use greedy for t = 0), `alpha >= 0`, all finite.
    """
    if isinstance(spec, Sampler):
        return spec
    m = _SPEC.match(spec or "") if isinstance(spec, str) else None
    if not m:
        raise SamplerError(f"cannot parse sampler {spec!r}; {_EXAMPLES}")
    name, argstr = _NAMES.get(m.group(1), m.group(1)), (m.group(2) or "").strip()
    if name not in _ARGS:
        raise SamplerError(
            f"unknown sampler {m.group(1)!r} in {spec!r}: use greedy, temperature, top_k, nucleus (top_p) or beam"
        )
    args = _sampler_args(spec, name, argstr)
    t = args.get("t", 1.0)
    if t <= 0:
        raise SamplerError(f"sampler {spec!r}: temperature t must be > 0, got {t:g} (for t = 0 use 'greedy')")
    if name == "greedy":
        return Sampler("greedy")
    if name == "temperature":
        return Sampler("temperature", temperature=t)
    if name == "top_k":
        if "k" not in args:
            raise SamplerError(f"sampler {spec!r}: top_k needs k, e.g. top_k(40)")
        return Sampler("top_k", k=_whole(spec, "k", args["k"]), temperature=t)
    if name == "nucleus":
        p = args.get("p", 1.0)
        if not 0 < p <= 1:
            raise SamplerError(f"sampler {spec!r}: p must be in (0, 1], got {p:g}")
        return Sampler("nucleus", p=p, temperature=t)
    alpha = args.get("alpha", 0.0)
    if alpha < 0:
        raise SamplerError(f"sampler {spec!r}: the length penalty alpha must be >= 0, got {alpha:g}")
    return Sampler("beam", beam_size=_whole(spec, "n", args.get("n", 1)), length_penalty=alpha)


def sample_tokens(logits: jax.Array, rng: jax.Array, sampler: Sampler) -> jax.Array:
    """Draws one token per row from logits f32[B, V] → i32[B]."""
    if sampler.kind == "greedy":
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampler.temperature
    if sampler.kind == "top_k":
        if sampler.k > logits.shape[-1]:  # Known when tracing: refused before anything runs.
            raise SamplerError(f"sampler top_k({sampler.k}): k is larger than the vocabulary ({logits.shape[-1]})")
        kth = jax.lax.top_k(logits, sampler.k)[0][:, -1:]
        logits = jnp.where(logits < kth, _NEG_INF, logits)
    elif sampler.kind == "nucleus":
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest set whose mass reaches p: the cut-off is the first sorted logit where cum >= p.
        cut_idx = jnp.sum(cum < sampler.p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, jnp.minimum(cut_idx, logits.shape[-1] - 1), axis=-1)
        logits = jnp.where(logits < cutoff, _NEG_INF, logits)
    elif sampler.kind != "temperature":
        raise ValueError(f"sample_tokens does not handle {sampler.kind!r}.")
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# --- The decode functions ---------------------------------------------------------------------------------------


def _with_cache_dtype(model: Model, cache_dtype: str | None) -> Model:
    llm = dict(model.llm or {})
    llm["cache_dtype"] = cache_dtype
    return model.clone(llm=llm)


def _prefill(model: Model, params: PyTree, batch: Mapping[str, jax.Array], max_decode_len: int):
    (x, input_mask, mask_ar), _ = model.apply(
        {"params": params},
        batch["image"],
        batch["text"],
        input_mask=batch["mask_input"],
        mask_ar=batch["mask_ar"],
        method=model.embed_image_and_text,
    )
    logits, variables = model.apply(
        {"params": params},
        x,
        input_mask,
        mask_ar,
        cache_size=x.shape[1] + max_decode_len,
        method=model.prefill_cache,
        mutable=("cache",),
    )
    return logits[:, 0], variables["cache"]


def _extend(model: Model, params: PyTree, cache: PyTree, tokens: jax.Array):
    x, _ = model.apply({"params": params}, tokens[:, None], method=model.embed_text)
    logits, variables = model.apply(
        {"params": params, "cache": cache}, x, method=model.extend_cache, mutable=("cache",)
    )
    return logits[:, 0], variables["cache"]


def _mask_logits(logits, batch):
    if "mask_logits" in batch:  # Tokens forbidden at sampling; logp still comes from the unmasked logits.
        return jnp.where(batch["mask_logits"], _NEG_INF, logits)
    return logits


def _sample_loop(model, params, batch, rng, *, max_decode_len, sampler, eos_token, constraint=None):
    logits, cache = _prefill(model, params, batch, max_decode_len)
    b = logits.shape[0]
    valid = batch.get("_mask", jnp.ones((b,), bool))

    def cond(state):
        i, _, _, done, _, _, _ = state
        return jnp.logical_and(i < max_decode_len, jnp.logical_not(jnp.all(done)))

    def body(state):
        i, tokens, logp, done, logits, cache, grammar = state
        masked = _mask_logits(logits, batch)
        if constraint is not None:  # Only tokens the row's grammar state allows (see constrain.py).
            masked = constraint.mask_logits(masked, grammar, i, max_decode_len)
        tok = sample_tokens(masked, jax.random.fold_in(rng, i), sampler)
        if constraint is not None:
            grammar = constraint.advance(grammar, tok)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)[:, 0]
        tokens = tokens.at[:, i].set(tok)
        logp = logp.at[:, i].set(lp)
        done = jnp.logical_or(done, tok == eos_token)
        # big_vision checks the early stop before extending; a skipped last extend changes nothing returned.
        logits, cache = _extend(model, params, cache, tok)
        return i + 1, tokens, logp, done, logits, cache, grammar

    init = (
        jnp.int32(0),
        jnp.zeros((b, max_decode_len), jnp.int32),
        jnp.zeros((b, max_decode_len), jnp.float32),
        jnp.logical_not(valid),
        logits,
        cache,
        constraint.init(b) if constraint is not None else {},
    )
    _, tokens, logp, _, _, _, _ = jax.lax.while_loop(cond, body, init)
    return tokens, logp


def _beam_loop(model, params, batch, rng, *, max_decode_len, sampler, eos_token, constraint=None):
    """big_vision's beam search: each step, every live beam + EOS is a finished candidate; live beams expand
    with non-EOS tokens and the best `beam_size` survive; stop when no live beam can beat the finished ones.
    With length_penalty alpha > 0, finished scores are divided by ((5 + len) / 6) ** alpha (GNMT) and the loop
    runs until every row's live beams are exhausted or max_decode_len."""
    del rng
    nb = sampler.beam_size
    logits, cache = _prefill(model, params, batch, max_decode_len)
    b, v = logits.shape
    rep = lambda a: jnp.repeat(a, nb, axis=0)  # [B, ...] → [B*K, ...], beams of a row adjacent.
    cache = jax.tree.map(rep, cache)
    logits = rep(logits)
    valid = batch.get("_mask", jnp.ones((b,), bool))
    live_seq = jnp.zeros((b, nb, max_decode_len), jnp.int32)
    live_score = jnp.tile(jnp.array([0.0] + [_NEG_INF] * (nb - 1), jnp.float32), (b, 1))  # One start beam.
    fin_seq = jnp.zeros((b, nb, max_decode_len), jnp.int32)
    fin_score = jnp.full((b, nb), _NEG_INF, jnp.float32)
    alpha = sampler.length_penalty

    def penalty(length):
        return ((5.0 + length) / 6.0) ** alpha if alpha else 1.0

    def cond(state):
        i, live_seq, live_score, fin_seq, fin_score, logits, cache, grammar = state
        if alpha:
            can_improve = jnp.any(live_score > _NEG_INF / 2, axis=-1)
        else:  # Scores only fall, so a row is done when its best live beam is below its worst kept finished one.
            can_improve = jnp.max(live_score, axis=-1) > jnp.min(fin_score, axis=-1)
        return jnp.logical_and(i < max_decode_len, jnp.any(jnp.logical_and(can_improve, valid)))

    def body(state):
        i, live_seq, live_score, fin_seq, fin_score, logits, cache, grammar = state
        masked = _mask_logits(logits, batch)
        if constraint is not None:  # Each beam's own grammar state (see constrain.py).
            masked = constraint.mask_logits(masked, grammar, i, max_decode_len)
        logp = jax.nn.log_softmax(masked, axis=-1).reshape(b, nb, v)
        # Finished candidates: every live beam followed by EOS.
        cand_score = (live_score + logp[:, :, eos_token]) / penalty(i + 1)
        cand_seq = live_seq.at[:, :, i].set(eos_token)
        all_score = jnp.concatenate([fin_score, cand_score], axis=1)
        all_seq = jnp.concatenate([fin_seq, cand_seq], axis=1)
        top_score, top_idx = jax.lax.top_k(all_score, nb)
        fin_score = top_score
        fin_seq = jnp.take_along_axis(all_seq, top_idx[:, :, None], axis=1)
        # Live expansions without EOS.
        total = live_score[:, :, None] + logp.at[:, :, eos_token].set(_NEG_INF)
        new_score, flat_idx = jax.lax.top_k(total.reshape(b, nb * v), nb)
        parent, tok = flat_idx // v, (flat_idx % v).astype(jnp.int32)
        live_seq = jnp.take_along_axis(live_seq, parent[:, :, None], axis=1).at[:, :, i].set(tok)
        live_score = new_score
        rows = (jnp.arange(b)[:, None] * nb + parent).reshape(-1)
        cache = jax.tree.map(lambda c: c[rows], cache)
        if constraint is not None:
            grammar = constraint.advance(constraint.reorder(grammar, rows), tok.reshape(-1))
        logits, cache = _extend(model, params, cache, tok.reshape(-1))
        return i + 1, live_seq, live_score, fin_seq, fin_score, logits, cache, grammar

    grammar = constraint.init(b * nb) if constraint is not None else {}
    state = (jnp.int32(0), live_seq, live_score, fin_seq, fin_score, logits, cache, grammar)
    _, live_seq, live_score, fin_seq, fin_score, _, _, _ = jax.lax.while_loop(cond, body, state)
    # A row with no finished hypothesis (none ended within max_decode_len) falls back to its live beams.
    none_finished = fin_score[:, :1] <= _NEG_INF / 2
    seqs = jnp.where(none_finished[:, :, None], live_seq, fin_seq)
    scores = jnp.where(none_finished, live_score, fin_score)
    order = jnp.argsort(-scores, axis=-1)  # Sorted best first.
    seqs = jnp.take_along_axis(seqs, order[:, :, None], axis=1)
    scores = jnp.take_along_axis(scores, order, axis=1)
    return seqs, scores


@dataclasses.dataclass
class _Compiled:
    fn: Callable
    key: str


_COMPILED: dict[str, _Compiled] = {}


def _get_fn(model: Model, max_decode_len: int, sampler: Sampler, eos_token: int, constraint: Any = None) -> Callable:
    key = f"{model!r}|{max_decode_len}|{sampler}|{eos_token}" + (f"|{constraint!r}" if constraint is not None else "")
    if key not in _COMPILED:
        loop = _beam_loop if sampler.kind == "beam" else _sample_loop

        def fn(params, batch, rng):
            TRACE_COUNTS[key] = TRACE_COUNTS.get(key, 0) + 1  # Runs once per trace, i.e. per compilation.
            return loop(
                model,
                params,
                batch,
                rng,
                max_decode_len=max_decode_len,
                sampler=sampler,
                eos_token=eos_token,
                constraint=constraint,
            )

        _COMPILED[key] = _Compiled(jax.jit(fn), key)
    return _COMPILED[key].fn


def decode(
    model: Model,
    params: PyTree,
    batch: Mapping[str, Any],
    *,
    max_decode_len: int,
    sampler: str | Sampler = "greedy",
    eos_token: int = 1,
    cache_dtype: str | None = "bfloat16",
    return_logp: bool = False,
    rng: jax.Array | int | None = None,
    return_beams: bool = False,
    constraint: Any = None,
):
    """Decodes up to `max_decode_len` tokens per row.

    Args:
      model: a `paligemma_ft.model.Model`.
      params: its parameters (the `params` collection, not wrapped in {"params": ...}).
      batch: `image f32[B, R, R, 3]`, `text i32[B, L]` (left-aligned prompts), `mask_ar i32[B, L]`,
        `mask_input i32[B, L]`, optional `_mask bool[B]` (False = padding row) and `mask_logits bool[B, V]`.
        Other keys (e.g. `_meta`) are ignored.
      max_decode_len: number of generated columns M.
      sampler: "greedy", "temperature(t)", "top_k(k[, t])", "nucleus(p[, t])" / "top_p(p)", "beam(n[, alpha])".
      eos_token: id that ends a row.
      cache_dtype: KV-cache dtype ("bfloat16" as big_vision's default); None keeps float32.
      return_logp: also return the log-probability of each sampled token, f32[B, M] (for beam: the scores).
      rng: a PRNG key or an int seed for the stochastic samplers (default seed 0).
      return_beams: for beam search, return all beams [B, K, M] and scores [B, K], sorted best first.
      constraint: a `constrain.LocGrammar`: only tokens its automaton allows at each position are sampled, so
        every output is a well-formed localization string (logp still come from the unconstrained logits).

    Returns:
      tokens i32[B, M], plus logp f32[B, M] if `return_logp`.
    """
    sampler = parse_sampler(sampler)
    if int(max_decode_len) < 1:
        raise DecodeOptionError(f"max_decode_len must be >= 1 (tokens to generate), got {max_decode_len}")
    model = _with_cache_dtype(model, cache_dtype)
    if rng is None:
        rng = 0
    if isinstance(rng, (int, np.integer)):
        rng = jax.random.PRNGKey(int(rng))
    arrays = {k: batch[k] for k in ("image", "text", "mask_ar", "mask_input", "_mask", "mask_logits") if k in batch}
    fn = _get_fn(model, int(max_decode_len), sampler, int(eos_token), constraint)
    out = fn(params, arrays, rng)
    if sampler.kind == "beam":
        seqs, scores = out
        if return_beams:
            return seqs, scores
        return (seqs[:, 0], scores[:, 0]) if return_logp else seqs[:, 0]
    tokens, logp = out
    return (tokens, logp) if return_logp else tokens


def trace_count(
    model: Model,
    max_decode_len: int,
    sampler: str | Sampler = "greedy",
    eos_token: int = 1,
    cache_dtype: str | None = "bfloat16",
) -> int:
    """How many times the decode function for these options was traced (compiled)."""
    key = f"{_with_cache_dtype(model, cache_dtype)!r}|{max_decode_len}|{parse_sampler(sampler)}|{eos_token}"
    return TRACE_COUNTS.get(key, 0)
