"""Gemma 1 and 2 decoder with big_vision's parameter names, numerics and KV cache.

Mirrors `big_vision/models/ppp/gemma.py` and its PaliGemma wrapper `gemma_bv.py` (reference 2.3, 2.6, 8):
tied embedder (× sqrt(width) on encode), RMSNorm with (1 + scale), GeGLU MLP with tanh GELU, half-split RoPE
(base 10 000), attention logits in float32 with an optional soft-cap and mask value -2.3819763e38, GQA where query
head n uses kv head n // (N / K), fused `qkv_einsum` only when K == N, Gemma 2 post-norms, and a KV cache
(`k_cache`/`v_cache` [B, S, K, H] in `cache_dtype`, read back in the compute dtype).

Einsum axis legend: B batch, T query length, S key length (cache size when decoding), D width, N query heads,
K kv heads, G = N / K query heads per kv head, H head dim, F mlp dim, V vocab.
"""

from __future__ import annotations

from typing import Any, Literal, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from paligemma_ft.model import flash_attention, precision, remat
from paligemma_ft.model import lora as lora_lib
from paligemma_ft.utils import LeafAdapter

# `attn_impl` values: the einsum path below is big_vision's, bit for bit; "xla", "cudnn" and "auto" call
# `jax.nn.dot_product_attention` (same math, logits and softmax in float32, no soft-cap) with that
# `implementation`; "pallas" is the fused kernel of `flash_attention` (any mask, soft-cap included).
ATTN_IMPLS: dict[str, Literal["xla", "cudnn"] | None] = {
    "einsum": None,
    "xla": "xla",
    "cudnn": "cudnn",
    "auto": None,
    "pallas": None,
}

# Masked attention logits use a large finite negative, not -inf, exactly as big_vision (so an all-masked row
# gives a uniform softmax instead of NaN).
_BIG_NEG = -2.3819763e38

# Gemma variants (big_vision `gemma.get_config`): width, depth, mlp_dim, heads, kv heads, head dim, query scaling,
# attention soft-cap, final soft-cap, post norms.
VARIANTS: dict[str, dict[str, Any]] = {
    "gemma_2b": dict(
        width=2048,
        depth=18,
        mlp_dim=16_384,
        num_heads=8,
        num_kv_heads=1,
        head_dim=256,
        query_pre_attn_norm="rsqrt_head_dim",
        attn_logits_softcap=0.0,
        final_logits_softcap=0.0,
        post_norms=False,
    ),
    "gemma_7b": dict(
        width=3072,
        depth=28,
        mlp_dim=24_576,
        num_heads=16,
        num_kv_heads=16,
        head_dim=256,
        query_pre_attn_norm="rsqrt_head_dim",
        attn_logits_softcap=0.0,
        final_logits_softcap=0.0,
        post_norms=False,
    ),
    "gemma2_2b": dict(
        width=2304,
        depth=26,
        mlp_dim=9216,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        query_pre_attn_norm="rsqrt_head_dim",
        attn_logits_softcap=50.0,
        final_logits_softcap=30.0,
        post_norms=True,
    ),
    "gemma2_9b": dict(
        width=3584,
        depth=42,
        mlp_dim=14_336,
        num_heads=16,
        num_kv_heads=8,
        head_dim=256,
        query_pre_attn_norm="rsqrt_head_dim",
        attn_logits_softcap=50.0,
        final_logits_softcap=30.0,
        post_norms=True,
    ),
    "gemma2_27b": dict(
        width=4608,
        depth=46,
        mlp_dim=36_864,
        num_heads=32,
        num_kv_heads=16,
        head_dim=128,
        query_pre_attn_norm="rsqrt_emb_per_head",
        attn_logits_softcap=50.0,
        final_logits_softcap=30.0,
        post_norms=True,
    ),
}
for _v in VARIANTS.values():
    _v.update(vocab_size=256_000, norm_eps=1e-6)


def _fan_in_init(in_axis, out_axis, batch_axis=()):
    """Truncated-normal variance scaling over the contracted (fan-in) axes."""
    return nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis, batch_axis=batch_axis
    )


class Einsum(nn.Module):
    """A single weight `w` applied with an einsum equation (plus its LoRA update when `lora` targets it)."""

    shape: tuple[int, ...]
    w_init: Any = nn.initializers.normal()
    lora: lora_lib.LoraSpec | None = None

    @nn.compact
    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        w = lora_lib.weight(self, "w", self.w_init, tuple(self.shape), self.lora)
        # The weight joins the activations' (compute) dtype here, per layer inside the scan, so a float32 master
        # copy or a float16-stored frozen weight never turns the layer's output, the scan carry, another dtype.
        # With float32 activations this is exactly jnp's promotion of a 16-bit weight (big_vision's numerics).
        y = precision.einsum(eqn, x, w)
        d = lora_lib.delta(self, "w", eqn, x, tuple(self.shape), self.lora)
        return y if d is None else y + d


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + 1e-6) * (1 + scale); `scale` zero-init. The eps is fixed as in big_vision.

    Computed in float32 and returned in x's dtype: a bfloat16 mean of squares over thousands of channels loses
    too much. `1 + scale` is formed in the scale's own dtype, as big_vision does (then promoted).
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1]))
        dtype = x.dtype
        x = x.astype(jnp.promote_types(dtype, jnp.float32))  # A no-op for float32 activations.
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        normed = jnp.asarray(x * jax.lax.rsqrt(var + 1e-06))
        return (normed * (1 + scale).astype(normed.dtype)).astype(dtype)


class Embedder(nn.Module):
    """Token table `input_embedding` [V, D]; `encode` scales by sqrt(D), `decode` is the tied output layer."""

    vocab_size: int
    embed_dim: int

    def setup(self):
        self.input_embedding_table = self.param(
            "input_embedding",
            nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=0),
            (self.vocab_size, self.embed_dim),
        )

    def encode(self, x: jax.Array) -> jax.Array:
        """i32[B, L] → [B, L, D] in the table's dtype (the sqrt(D) factor is cast to it, as big_vision)."""
        x = self.input_embedding_table[(x,)]
        x *= jnp.sqrt(self.embed_dim).astype(x.dtype)
        return x

    def decode(self, x: jax.Array) -> jax.Array:
        """[B, L, D] in the compute dtype → float32 logits [B, L, V]; no bias.

        The table is multiplied in x's dtype with float32 accumulation, so a bfloat16 model never makes a float32
        copy of the [V, D] table (with float32 activations this is the plain float32 product).
        """
        return precision.dot(x, self.input_embedding_table, transpose_w=True, out_dtype=jnp.float32)


def apply_rope(inputs: jax.Array, positions: jax.Array, max_wavelength: int = 10_000) -> jax.Array:
    """Half-split rotary embedding. inputs [B, T, N, H], positions [B, T] (int)."""
    head_dim = inputs.shape[-1]
    fraction = 2 * jnp.arange(0, head_dim // 2) / head_dim
    timescale = max_wavelength**fraction
    sinusoid_inp = positions[..., jnp.newaxis] / timescale[jnp.newaxis, jnp.newaxis, :]
    sinusoid_inp = sinusoid_inp[..., jnp.newaxis, :]
    sin, cos = jnp.sin(sinusoid_inp), jnp.cos(sinusoid_inp)
    first_half, second_half = jnp.split(inputs, 2, axis=-1)
    first_part = first_half * cos - second_half * sin
    second_part = second_half * cos + first_half * sin
    return jnp.concatenate([first_part, second_part], axis=-1).astype(inputs.dtype)


class Attention(nn.Module):
    """Multi-head / multi-query / grouped-query attention with an optional KV cache."""

    num_heads: int
    num_kv_heads: int
    features: int
    head_dim: int
    query_pre_attn_norm: str
    attn_logits_softcap: float | None
    cache_dtype: str | None = None
    attn_impl: str = "einsum"
    lora: lora_lib.LoraSpec | None = None

    @property
    def use_qkv_einsum(self) -> bool:
        return self.num_kv_heads == self.num_heads

    def setup(self):
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"Unknown model.llm.attn_impl {self.attn_impl!r}; use one of {sorted(ATTN_IMPLS)}.")
        if self.attn_impl not in ("einsum", "pallas") and self.attn_logits_softcap:
            raise ValueError(
                f"model.llm.attn_impl={self.attn_impl!r} cannot apply attn_logits_softcap="
                f"{self.attn_logits_softcap} (jax.nn.dot_product_attention has no soft-cap); use "
                "attn_impl='einsum' or 'pallas' for Gemma 2."
            )
        self.attn_vec_einsum = Einsum(
            shape=(self.num_heads, self.head_dim, self.features), w_init=_fan_in_init((0, 1), 2), lora=self.lora
        )
        if self.use_qkv_einsum:
            self.qkv_einsum = Einsum(
                shape=(3, self.num_heads, self.features, self.head_dim),
                w_init=_fan_in_init(2, 3, (0, 1)),
                lora=self.lora,
            )
        else:
            self.q_einsum = Einsum(
                shape=(self.num_heads, self.features, self.head_dim), w_init=_fan_in_init(1, 2, (0,)), lora=self.lora
            )
            self.kv_einsum = Einsum(
                shape=(2, self.num_kv_heads, self.features, self.head_dim),
                w_init=_fan_in_init(2, 3, (0, 1)),
                lora=self.lora,
            )

    def __call__(self, x: jax.Array, positions: jax.Array, attn_mask: jax.Array, decode: bool) -> jax.Array:
        """x [B, T, D], positions i32[B, T], attn_mask bool[B, 1, T, S] → [B, T, D]."""
        dtype = x.dtype  # The compute dtype; the cache is read back in it.
        if self.use_qkv_einsum:
            q, k, v = self.qkv_einsum("BTD,SNDH->SBTNH", x)
        else:
            q = self.q_einsum("BTD,NDH->BTNH", x)
            k, v = self.kv_einsum("BSD,CKDH->CBSKH", x)

        q = apply_rope(q, positions=positions)
        if self.query_pre_attn_norm == "rsqrt_head_dim":
            q *= self.head_dim**-0.5
        elif self.query_pre_attn_norm == "rsqrt_emb_per_head":  # Gemma 2 27B: 1/sqrt(width / heads).
            q *= (self.features // self.num_heads) ** -0.5
        elif self.query_pre_attn_norm != "none":
            raise ValueError(f"Unknown query_pre_attn_norm {self.query_pre_attn_norm!r}.")
        k = apply_rope(k, positions=positions)

        if decode:
            k, v = self._update_cache(k, v, cache_size=attn_mask.shape[-1])
            k, v = k.astype(dtype), v.astype(dtype)

        if self.attn_impl == "pallas" and not decode:  # KV-cache passes keep the einsum path.
            encoded = flash_attention.flash_attention(q, k, v, attn_mask[:, 0], softcap=self.attn_logits_softcap)
            # Named like a 16-bit product's result: the "dots" remat policies keep it rather than rerun the kernel.
            encoded = checkpoint_name(encoded, precision.DOT_NAMES[True])
            return self.attn_vec_einsum("BTNH,NHD->BTD", encoded)
        if self.attn_impl != "einsum" and not decode:  # KV-cache passes keep the einsum path.
            # GQA is native (N query heads over K kv heads); q is already scaled, and the mask is [B, 1, T, S].
            encoded = jax.nn.dot_product_attention(
                q, k, v, mask=attn_mask, scale=1.0, implementation=ATTN_IMPLS[self.attn_impl]
            )
            return self.attn_vec_einsum("BTNH,NHD->BTD", encoded)

        b, t, n, h = q.shape
        q = q.reshape((b, t, self.num_kv_heads, n // self.num_kv_heads, h))
        logits = precision.einsum("BTKGH,BSKH->BKGTS", q, k, out_dtype=jnp.float32)
        if self.attn_logits_softcap:
            logits = jnp.tanh(logits / self.attn_logits_softcap) * self.attn_logits_softcap
        logits = jnp.where(attn_mask[:, :, None, :, :], logits, _BIG_NEG)
        probs = jax.nn.softmax(logits, axis=-1).astype(k.dtype)
        encoded = precision.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape((b, t, n, h))
        return self.attn_vec_einsum("BTNH,NHD->BTD", encoded)

    def _update_cache(self, k: jax.Array, v: jax.Array, cache_size: int) -> tuple[jax.Array, jax.Array]:
        """First call (prefill): cache = k/v padded to cache_size, idx = T. Later calls write at idx[0]."""
        cache_dtype = self.cache_dtype or k.dtype
        if not self.has_variable("cache", "idx"):
            pad = [(0, 0), (0, cache_size - k.shape[1]), (0, 0), (0, 0)]
            k_cache, v_cache = jnp.pad(k, pad).astype(cache_dtype), jnp.pad(v, pad).astype(cache_dtype)
            idx = jnp.full((k.shape[0],), k.shape[1], jnp.int32)
        else:
            # flax types get_variable's result by its `default`; with none given, name the type.
            idx = cast(jax.Array, self.get_variable("cache", "idx"))  # int32[B]
            k_cache, v_cache = self.get_variable("cache", "k_cache"), self.get_variable("cache", "v_cache")
            start = (0, idx[0], 0, 0)  # The same slot for every row (rows are right-aligned at prefill).
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
            idx = idx + k.shape[1]
        self.put_variable("cache", "k_cache", k_cache)
        self.put_variable("cache", "v_cache", v_cache)
        self.put_variable("cache", "idx", idx)
        return k_cache, v_cache


class FeedForward(nn.Module):
    """GeGLU: (gelu(x W0) * (x W1)) W_linear; `gating_einsum` [2, D, F], `linear` [F, D] (no `/w`)."""

    features: int
    hidden_dim: int
    lora: lora_lib.LoraSpec | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gating_shape = (2, self.features, self.hidden_dim)
        w_gating = lora_lib.weight(self, "gating_einsum", _fan_in_init(1, 2, (0,)), gating_shape, self.lora)
        gate, up = precision.dot(x, w_gating[0]), precision.dot(x, w_gating[1])  # In the compute dtype (Einsum).
        if (d := lora_lib.delta(self, "gating_einsum", "BTD,SDF->SBTF", x, gating_shape, self.lora)) is not None:
            gate, up = gate + d[0], up + d[1]
        activations = nn.gelu(gate) * up
        linear_shape = (self.hidden_dim, self.features)
        w_linear = lora_lib.weight(self, "linear", _fan_in_init(0, 1), linear_shape, self.lora)
        out = precision.dot(activations, w_linear)
        d = lora_lib.delta(self, "linear", "BTF,FD->BTD", activations, linear_shape, self.lora)
        return out if d is None else out + d


class Block(nn.Module):
    """h = x + [post_attention_norm](Attn(pre_attention_norm(x))); out = h + [post_ffw_norm](MLP(pre_ffw_norm(h)))."""

    num_heads: int
    num_kv_heads: int
    embed_dim: int
    head_dim: int
    hidden_dim: int
    query_pre_attn_norm: str
    attn_logits_softcap: float | None
    post_norms: bool
    dropout: float = 0.0
    dropout_bdims: tuple[int, ...] = ()
    cache_dtype: str | None = None
    attn_impl: str = "einsum"
    lora: lora_lib.LoraSpec | None = None

    def setup(self):
        self.pre_attention_norm = RMSNorm()
        self.attn = Attention(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            features=self.embed_dim,
            head_dim=self.head_dim,
            query_pre_attn_norm=self.query_pre_attn_norm,
            attn_logits_softcap=self.attn_logits_softcap,
            cache_dtype=self.cache_dtype,
            attn_impl=self.attn_impl,
            lora=self.lora,
        )
        if self.post_norms:
            self.post_attention_norm = RMSNorm()
        self.pre_ffw_norm = RMSNorm()
        self.mlp = FeedForward(features=self.embed_dim, hidden_dim=self.hidden_dim, lora=self.lora)
        if self.post_norms:
            self.post_ffw_norm = RMSNorm()
        if self.dropout:
            self.drop = nn.Dropout(self.dropout, self.dropout_bdims)

    def _drop(self, x, deterministic):
        return self.drop(x, deterministic) if self.dropout else x

    def __call__(self, x, unused_scan_arg, positions, attn_mask, decode, deterministic=True):
        attn_out = self.attn(self.pre_attention_norm(x), positions, attn_mask, decode)
        if self.post_norms:
            attn_out = self.post_attention_norm(attn_out)
        attn_out = self._drop(attn_out, deterministic)  # After the post-norm (asymmetric, as big_vision).
        h = attn_out + x
        out = self.mlp(self.pre_ffw_norm(h))
        out = self._drop(out, deterministic)  # Before the post-norm.
        if self.post_norms:
            out = self.post_ffw_norm(out)
        return h + out, unused_scan_arg


class _Layers(nn.Module):
    """Holds unscanned blocks so their parameters read `layers/{i}/...` as in big_vision."""

    depth: int
    block_kw: dict

    @nn.compact
    def __call__(self, x, positions, attn_mask, decode, deterministic):
        for i in range(self.depth):
            x, _ = Block(name=str(i), **self.block_kw)(x, (), positions, attn_mask, decode, deterministic)
        return x


class Gemma(nn.Module):
    """The Gemma decoder. Submodules `embedder`, `layers`, `final_norm` (no extra nesting)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    query_pre_attn_norm: str = "rsqrt_head_dim"
    attn_logits_softcap: float | None = 0.0
    final_logits_softcap: float | None = 0.0
    post_norms: bool = False
    norm_eps: float = 1e-6  # Kept for config parity; big_vision's RMSNorm hard-codes 1e-6.
    dropout: float = 0.0
    dropout_bdims: tuple[int, ...] = ()
    cache_dtype: str | None = "bfloat16"
    embed_dtype: str = "float32"
    scan: bool = True
    remat_policy: str = "nothing_saveable"
    attn_impl: str = "einsum"  # "einsum" (big_vision's), "xla", "cudnn" or "auto": see ATTN_IMPLS.
    lora: lora_lib.LoraSpec | None = None  # Adapters / quantized weights (model/lora.py).

    def setup(self):
        self.embedder = Embedder(vocab_size=self.vocab_size, embed_dim=self.width)
        block_kw = dict(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            embed_dim=self.width,
            head_dim=self.head_dim,
            hidden_dim=self.mlp_dim,
            query_pre_attn_norm=self.query_pre_attn_norm,
            attn_logits_softcap=self.attn_logits_softcap,
            post_norms=self.post_norms,
            dropout=self.dropout,
            dropout_bdims=tuple(self.dropout_bdims),
            cache_dtype=self.cache_dtype,
            attn_impl=self.attn_impl,
            lora=self.lora,
        )
        if self.scan:
            block = Block
            policy = remat.remat_policy(self.remat_policy)
            if policy is not None:
                # static_argnums count `self` as 0: `decode` and `deterministic` are Python bools.
                block = nn.remat(Block, prevent_cse=False, static_argnums=(5, 6), policy=policy)
            self.layers = nn.scan(
                block,
                variable_axes={"params": 0, "cache": 1},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=self.depth,
            )(**block_kw)
        else:
            self.layers = _Layers(depth=self.depth, block_kw=block_kw)
        self.final_norm = RMSNorm()

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """i32[B, L] → f32[B, L, D] (× sqrt(D), then cast to `embed_dtype`)."""
        return self.embedder.encode(tokens).astype(self.embed_dtype)

    def compute_logits(self, pre_logits: jax.Array) -> jax.Array:
        """Tied output layer WITHOUT the final soft-cap (big_vision's `compute_logits`, reference 2.6)."""
        return self.embedder.decode(pre_logits)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        attn_mask: jax.Array,
        *,
        decode: bool = False,
        deterministic: bool = True,
        return_logits: bool = False,
    ) -> tuple[jax.Array, dict]:
        """Runs the layers over embeddings. x [B, T, D], positions i32[B, T], attn_mask bool[B, T, S].

        Returns `(pre_logits [B, T, D], out)`; with `return_logits` also `out["logits"]` with the final soft-cap
        applied when configured (the path big_vision's `extend_cache` takes).
        """
        out = {}
        x = x.astype(self.embed_dtype)
        mask = attn_mask[:, None, :, :]  # [B, 1, T, S], broadcast over heads.
        if self.scan:
            x, _ = self.layers(x, (), positions, mask, decode, deterministic)
        else:
            x = self.layers(x, positions, mask, decode, deterministic)
        x = out["pre_logits"] = self.final_norm(x)
        if return_logits:
            logits = out["logits_pre_norm"] = self.embedder.decode(x)
            if self.final_logits_softcap:
                logits = jnp.tanh(logits / self.final_logits_softcap) * self.final_logits_softcap
            out["logits"] = logits
        return x, out

    # --- KV-cache decoding (big_vision `gemma_bv.prefill_cache` / `extend_cache`, reference 8.1-8.2) ---

    def prefill_cache(self, x: jax.Array, input_mask: jax.Array, attn_mask: jax.Array, *, cache_size: int) -> jax.Array:
        """Fills the cache with the prompt x [B, P, D] and returns the last valid token's logits [B, 1, V].

        Rows arrive left-aligned (padding at the end); each is rolled right-aligned so every row's last valid
        token sits at index P-1 and per-row positions are 0..L-1. No final soft-cap here (reference 2.6).
        """
        seq_len = jnp.sum(input_mask, axis=-1).astype(jnp.int32)  # [B]
        x = jax.vmap(lambda a, n: jnp.roll(a, -n, axis=0))(x, seq_len)
        input_mask = jax.vmap(lambda a, n: jnp.roll(a, -n, axis=0))(input_mask, seq_len)
        attn_mask = jax.vmap(lambda a, n: jnp.roll(a, -n, axis=(0, 1)))(attn_mask, seq_len)
        positions = jnp.cumsum(input_mask, axis=-1) - 1
        batch_size, prefill_len, _ = x.shape
        self.put_variable("cache", "seq_len", seq_len)
        self.put_variable("cache", "cache_begin", prefill_len - seq_len)
        self.put_variable("cache", "cache_end", jnp.full((batch_size,), prefill_len, jnp.int32))
        mask = jnp.pad(attn_mask, ((0, 0), (0, 0), (0, cache_size - prefill_len)))
        pre_logits, _ = self(x, positions, mask, decode=True, deterministic=True)
        return self.compute_logits(pre_logits[:, -1:])

    def extend_cache(self, x: jax.Array) -> jax.Array:
        """Appends one embedded token x [B, 1, D] to the cache; returns logits [B, 1, V] WITH the final soft-cap."""
        if x.shape[1] != 1:
            raise ValueError(f"extend_cache takes one token at a time, got x of shape {x.shape}.")
        if not self.scan:
            raise NotImplementedError("Decoding with a KV cache needs scan=True (as big_vision).")
        cache_size = self.variables["cache"]["layers"]["attn"]["k_cache"].shape[2]
        positions: jax.Array = self.get_variable("cache", "seq_len")  # int32[B]
        self.put_variable("cache", "seq_len", positions + 1)
        cache_begin: jax.Array = self.get_variable("cache", "cache_begin")  # int32[B]
        cache_end: jax.Array = self.get_variable("cache", "cache_end")  # int32[B]
        cache_end = cache_end + 1
        self.put_variable("cache", "cache_end", cache_end)
        slots = jnp.arange(cache_size)[None, None, :]
        mask = jnp.logical_and(slots >= cache_begin[:, None, None], slots < cache_end[:, None, None])
        _, out = self(x, positions[:, None], mask, decode=True, deterministic=True, return_logits=True)
        return out["logits"]


# --- Checkpoint adaptation (big_vision's `gemma.load`) ---------------------------------------------------------


def _vocab_fits(old: tuple[int, ...], new: tuple[int, ...]) -> bool:
    """[V_old, D] -> [V_new, D]: another vocabulary size of the same width."""
    return len(old) == len(new) == 2 and old[1] == new[1] and old[0] != new[0]


def resize_vocab(table: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    """The embedding table [V, D] with `rows` rows, in its dtype.

    A longer table gets N(0, 0.02) rows appended, as big_vision's `gemma.load` does (e.g. a 256 000-row Gemma
    table made PaliGemma's 257 152). A shorter one is cut only when the dropped rows are all zero (padding
    rows, such as an export's); real rows are refused, since every id past the cut would lose its embedding.

    Raises:
      ValueError: the rows past `rows` hold values; the message gives the setting that keeps them.
    """
    vocab, width = table.shape
    if rows >= vocab:
        extra = rng.standard_normal((rows - vocab, width), dtype=np.float32) * 0.02
        return np.concatenate([table, extra.astype(table.dtype)], axis=0)
    if np.any(table[rows:].astype(np.float32) != 0):
        raise ValueError(
            f"llm/embedder/input_embedding has {vocab} rows but the model has {rows}, and rows {rows}..{vocab - 1} "
            f"hold trained values; set model.llm.vocab_size={vocab} to keep them."
        )
    return np.ascontiguousarray(table[:rows])


def _describe_vocab(name: str, old: tuple[int, ...], new: tuple[int, ...]) -> str:
    if new[0] > old[0]:
        return f"Extended {name} from {old[0]} to {new[0]} rows with N(0, 0.02) rows (as big_vision's gemma.load)."
    return f"Cut {name} from {old[0]} to {new[0]} rows (the dropped rows are all zero: padding)."


def _gating_fits(old: tuple[int, ...], new: tuple[int, ...]) -> bool:
    """An old `gating_einsum` layout [.., 2, F, D] for the model's [.., 2, D, F]."""
    return len(old) == len(new) >= 2 and old != new and old[:-2] + old[:-3:-1] == new


# What `checkpoints/loading.py` may change in a stored Gemma (names below `llm/`) to fit this model.
CHECKPOINT_ADAPTERS = (
    LeafAdapter(
        pattern=r"embedder/input_embedding",
        fits=_vocab_fits,
        apply=lambda array, shape, rng: resize_vocab(array, shape[0], rng),
        describe=_describe_vocab,
    ),
    LeafAdapter(
        pattern=r"layers/(?:\d+/)?mlp/gating_einsum",
        fits=_gating_fits,
        apply=lambda array, shape, rng: np.ascontiguousarray(np.swapaxes(array, -1, -2)),
        describe=lambda name, old, new: f"Transposed {name} from {old} (.., 2, F, D) to {new} (.., 2, D, F).",
    ),
)
