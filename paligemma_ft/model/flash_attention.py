"""Fused attention for PaliGemma's teacher-forced pass: any boolean mask (the prefix-LM mask) plus Gemma 2's
attention-logit soft-cap, in Pallas kernels (Triton on GPUs; Pallas' interpreter on CPUs, as the tests run it).

`model.llm.attn_impl="pallas"` selects it. No library kernel does both: `jax.nn.dot_product_attention` (XLA, cuDNN)
has no soft-cap, JAX's example Pallas kernel has only causal and segment masks, and tokamax (PyPI 0.0.12: soft-cap
and masks in Triton / Mosaic kernels) has no interpreter mode to test it on a CPU, hence these ~250 lines.

The numerics are the einsum path's (gemma.Attention): logits q·kᵀ accumulated in float32, `tanh(l / cap) * cap`,
masked logits set to -2.3819763e38 (an all-masked row averages every value, as big_vision), softmax in float32,
probabilities in v's dtype for the value product. The softmax is computed block by block (FlashAttention's running
maximum and sum, both kept for the backward pass: a log-sum-exp would round log(sum) away next to -2.4e38 in an
all-masked row), so [T, S] logits never exist in memory; results equal the einsum path to float32 rounding, not bit
for bit. The backward pass is two more kernels (dq; dk and dv), recomputing each block's probabilities.

Axes: B batch, T query length, S key length, N query heads, K kv heads, G = N / K, H head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

_BIG_NEG = -2.3819763e38  # big_vision's mask value (see gemma.py).
_PAD = -np.inf  # Keys added to fill the last block: weight exactly 0, even in an all-masked row.


def _pad_to(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value) if size != x.shape[axis] else x


def _logits(q, k, mask, kv_start, kv_len, softcap):
    """Block logits f32[bq, bk] (soft-capped, masked) and tanh(l / cap) (for the soft-cap's derivative)."""
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32)
    t = None
    if softcap:
        t = jnp.tanh(s / softcap)
        s = t * softcap
    s = jnp.where(mask != 0, s, _BIG_NEG)
    real = (kv_start + jnp.arange(k.shape[0]))[None, :] < kv_len
    return jnp.where(real, s, _PAD), t


# --- Forward -----------------------------------------------------------------------------------------------------


def _fwd_kernel(q_ref, k_ref, v_ref, mask_ref, o_ref, m_ref, sum_ref, *, block_k, kv_len, softcap):
    q = q_ref[...]  # [bq, H]
    bq, h = q.shape

    def body(j, carry):
        acc, m, denom = carry
        start = j * block_k
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        s, _ = _logits(q, k, mask_ref[:, pl.ds(start, block_k)], start, kv_len, softcap)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        denom = alpha * denom + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, m_new, denom

    init = (jnp.zeros((bq, h), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, denom = jax.lax.fori_loop(0, k_ref.shape[0] // block_k, body, init)
    o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)
    m_ref[...] = m
    sum_ref[...] = denom


def _forward(q, k, v, mask, cfg):
    """q [B, N, T, H], k/v [B, K, S, H], mask i8[B, T, S] (all padded) -> (out [B, N, T, H], the softmax's
    running maximum and sum f32[B, N, T] each)."""
    b, n, t, h = q.shape
    kh, s = k.shape[1], k.shape[2]
    g, bq, bk = n // kh, cfg["block_q"], cfg["block_k"]
    kernel = functools.partial(_fwd_kernel, block_k=bk, kv_len=cfg["kv_len"], softcap=cfg["softcap"])
    return pl.pallas_call(
        kernel,
        grid=(b, n, t // bq),
        in_specs=[
            pl.BlockSpec((None, None, bq, h), lambda b_, n_, i: (b_, n_, i, 0)),
            pl.BlockSpec((None, None, s, h), lambda b_, n_, i: (b_, n_ // g, 0, 0)),
            pl.BlockSpec((None, None, s, h), lambda b_, n_, i: (b_, n_ // g, 0, 0)),
            pl.BlockSpec((None, bq, s), lambda b_, n_, i: (b_, i, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bq, h), lambda b_, n_, i: (b_, n_, i, 0)),
            pl.BlockSpec((None, None, bq), lambda b_, n_, i: (b_, n_, i)),
            pl.BlockSpec((None, None, bq), lambda b_, n_, i: (b_, n_, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, v.dtype), *[jax.ShapeDtypeStruct((b, n, t), jnp.float32)] * 2],
        interpret=cfg["interpret"],
        name="prefix_lm_softcap_attention_fwd",
    )(q, k, v, mask)


# --- Backward ----------------------------------------------------------------------------------------------------


def _dlogits(q, k, v, do, mask, m, denom, delta, kv_start, kv_len, softcap):
    """(p f32[bq, bk], d(logits before the soft-cap) f32[bq, bk]) for one block."""
    s, t = _logits(q, k, mask, kv_start, kv_len, softcap)
    p = jnp.exp(s - m[:, None]) / denom[:, None]
    dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    if softcap:
        ds = ds * (1.0 - t * t)
    return p, jnp.where(mask != 0, ds, 0.0)  # A masked logit is a constant: no gradient.


def _dq_kernel(q_ref, k_ref, v_ref, mask_ref, do_ref, m_ref, sum_ref, delta_ref, dq_ref, *, block_k, kv_len, softcap):
    q, do, m, denom, delta = q_ref[...], do_ref[...], m_ref[...], sum_ref[...], delta_ref[...]

    def body(j, dq):
        start = j * block_k
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        mask = mask_ref[:, pl.ds(start, block_k)]
        _, ds = _dlogits(q, k, v, do, mask, m, denom, delta, start, kv_len, softcap)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = jax.lax.fori_loop(0, k_ref.shape[0] // block_k, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(
    q_ref, k_ref, v_ref, mask_ref, do_ref, m_ref, sum_ref, delta_ref, dk_ref, dv_ref, *, block_q, kv_len, softcap
):
    k, v = k_ref[...], v_ref[...]  # [bk, H]
    start = pl.program_id(2) * k.shape[0]
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for g in range(q_ref.shape[0]):  # The query heads sharing this kv head.

        def body(i, carry, g=g):
            dk, dv = carry
            rows = pl.ds(i * block_q, block_q)
            q, do = q_ref[g, rows, :], do_ref[g, rows, :]
            m, denom, delta = m_ref[g, rows], sum_ref[g, rows], delta_ref[g, rows]
            p, ds = _dlogits(q, k, v, do, mask_ref[rows, :], m, denom, delta, start, kv_len, softcap)
            dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
            dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
            return dk, dv

        dk, dv = jax.lax.fori_loop(0, q_ref.shape[1] // block_q, body, (dk, dv))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(q, k, v, mask, out, m, denom, do, cfg):
    b, n, t, h = q.shape
    kh, s = k.shape[1], k.shape[2]
    g, bq, bk = n // kh, cfg["block_q"], cfg["block_k"]
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, N, T]
    common = dict(kv_len=cfg["kv_len"], softcap=cfg["softcap"])
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_k=bk, **common),
        grid=(b, n, t // bq),
        in_specs=[
            pl.BlockSpec((None, None, bq, h), lambda b_, n_, i: (b_, n_, i, 0)),
            pl.BlockSpec((None, None, s, h), lambda b_, n_, i: (b_, n_ // g, 0, 0)),
            pl.BlockSpec((None, None, s, h), lambda b_, n_, i: (b_, n_ // g, 0, 0)),
            pl.BlockSpec((None, bq, s), lambda b_, n_, i: (b_, i, 0)),
            pl.BlockSpec((None, None, bq, h), lambda b_, n_, i: (b_, n_, i, 0)),
            *[pl.BlockSpec((None, None, bq), lambda b_, n_, i: (b_, n_, i))] * 3,
        ],
        out_specs=pl.BlockSpec((None, None, bq, h), lambda b_, n_, i: (b_, n_, i, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=cfg["interpret"],
        name="prefix_lm_softcap_attention_dq",
    )(q, k, v, mask, do, m, denom, delta)
    grouped = lambda x: x.reshape(b, kh, g, *x.shape[2:])  # noqa: E731 - [B, N, ...] -> [B, K, G, ...].
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, block_q=bq, **common),
        grid=(b, kh, s // bk),
        in_specs=[
            pl.BlockSpec((None, None, g, t, h), lambda b_, k_, j: (b_, k_, 0, 0, 0)),
            pl.BlockSpec((None, None, bk, h), lambda b_, k_, j: (b_, k_, j, 0)),
            pl.BlockSpec((None, None, bk, h), lambda b_, k_, j: (b_, k_, j, 0)),
            pl.BlockSpec((None, t, bk), lambda b_, k_, j: (b_, 0, j)),
            pl.BlockSpec((None, None, g, t, h), lambda b_, k_, j: (b_, k_, 0, 0, 0)),
            *[pl.BlockSpec((None, None, g, t), lambda b_, k_, j: (b_, k_, 0, 0))] * 3,
        ],
        out_specs=[
            pl.BlockSpec((None, None, bk, h), lambda b_, k_, j: (b_, k_, j, 0)),
            pl.BlockSpec((None, None, bk, h), lambda b_, k_, j: (b_, k_, j, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=cfg["interpret"],
        name="prefix_lm_softcap_attention_dkv",
    )(grouped(q), k, v, mask, grouped(do), grouped(m), grouped(denom), grouped(delta))
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, mask, cfg):
    return _forward(q, k, v, mask, cfg)[0]


def _attention_fwd(q, k, v, mask, cfg):
    out, m, denom = _forward(q, k, v, mask, cfg)
    return out, (q, k, v, mask, out, m, denom)


def _attention_bwd(cfg, res, do):
    q, k, v, mask, out, m, denom = res
    dq, dk, dv = _backward(q, k, v, mask, out, m, denom, do.astype(out.dtype), cfg)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


class _Cfg(dict):
    """The static settings, hashable (custom_vjp's non-differentiable argument)."""

    def __hash__(self):
        return hash(tuple(sorted(self.items())))


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    softcap: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
    interpret: bool | None = None,
) -> jax.Array:
    """softmax(cap · tanh(q kᵀ / cap), masked) v per head, fused.

    Args:
      q: [B, T, N, H], already scaled (as gemma.Attention scales it); k, v: [B, S, K, H] with N a multiple of K
        (query head n reads kv head n // (N / K)).
      mask: bool[B, T, S], True where query t may attend key s (e.g. the prefix-LM mask).
      softcap: the attention-logit soft-cap (Gemma 2: 50); None or 0 for none.
      block_q, block_k: tile sizes (powers of two; the sequences are padded to multiples of them).
      interpret: run Pallas' interpreter instead of compiling kernels (default: on CPUs).

    Returns:
      [B, T, N, H] in v's dtype.
    """
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    if n % kh:
        raise ValueError(f"flash_attention: {n} query heads are not a multiple of {kh} kv heads.")
    if interpret is None:
        interpret = jax.devices()[0].platform == "cpu"
    bq, bk = min(block_q, pl.next_power_of_2(t)), min(block_k, pl.next_power_of_2(s))
    t_pad, s_pad = -(-t // bq) * bq, -(-s // bk) * bk
    h_pad = max(16, pl.next_power_of_2(h))  # Triton's smallest dot; zero channels change no product.
    cfg = _Cfg(block_q=bq, block_k=bk, kv_len=s, softcap=float(softcap or 0.0), interpret=bool(interpret))
    heads_first = lambda x, length: _pad_to(_pad_to(jnp.swapaxes(x, 1, 2), 2, length), 3, h_pad)  # noqa: E731
    mask = _pad_to(_pad_to(mask.astype(jnp.int8), 1, t_pad), 2, s_pad)
    out = _attention(heads_first(q, t_pad), heads_first(k, s_pad), heads_first(v, s_pad), mask, cfg)
    return jnp.swapaxes(out[:, :, :t, :h], 1, 2)
