"""The ViT's `Dense` and `MultiHeadDotProductAttention`, flax's own numerics and names, with LoRA and quantization.

flax's `nn.Dense` / `nn.MultiHeadDotProductAttention` create their kernels themselves, so a LoRA adapter or a
quantized kernel cannot live inside them under our names. These replicas compute exactly what flax computes
(same `lax.dot_general` dimension numbers, the same `promote_dtype`, bias add and `nn.dot_product_attention`;
tests/test_lora.py checks equality bit for bit) and read their kernels through `lora.weight` / `lora.delta`. The
class names are flax's, so auto-named submodules keep big_vision's names (`Dense_0`,
`MultiHeadDotProductAttention_0`, `query`, `key`, `value`, `out`).

Axes: B batch, P patches, D width, N heads, H head dim, F out features.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from paligemma_ft.model import lora as lora_lib

_LETTERS = "ABCEGJKLMPQRSTUVWXYZ"  # Batch-axis letters for einsum specs (never i, o, n, h, d).


def _flat_init(init: Any, n_in: int) -> Any:
    """flax DenseGeneral's kernel init: initialise the [prod(in), prod(out)] matrix, then reshape."""

    def wrapped(rng, shape, dtype=jnp.float32):
        flat = (int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:])))
        return jnp.reshape(init(rng, flat, dtype), shape)

    return wrapped


class Dense(nn.Module):
    """`nn.Dense` (kernel [in, F], bias [F]) with optional LoRA / quantized kernel."""

    features: int
    dtype: Any = None
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()
    lora: lora_lib.LoraSpec | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (x.shape[-1], self.features)
        kernel = lora_lib.weight(self, "kernel", self.kernel_init, shape, self.lora)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        batch = _LETTERS[: x.ndim - 1]
        d = lora_lib.delta(self, "kernel", f"{batch}i,io->{batch}o", x, shape, self.lora)
        return y if d is None else y + d


class _Projection(nn.Module):
    """flax's `DenseGeneral` as MultiHeadDotProductAttention uses it: `in` [D] → [N, H] (`axis=-1`) for q/k/v, or
    [N, H] → [D] (`axis=(-2, -1)`) for `out`."""

    features: tuple[int, ...]
    n_in: int  # Trailing input axes contracted: 1 for q/k/v, 2 for out.
    dtype: Any = None
    kernel_init: Any = nn.initializers.lecun_normal()
    lora: lora_lib.LoraSpec | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in, features = self.n_in, tuple(self.features)
        shape = (*x.shape[-n_in:], *features)
        kernel = lora_lib.weight(self, "kernel", _flat_init(self.kernel_init, n_in), shape, self.lora)
        bias = self.param("bias", lambda rng, s: jnp.reshape(jnp.zeros((int(np.prod(s)),), jnp.float32), s), features)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        axes = tuple(range(x.ndim - n_in, x.ndim))
        y = jax.lax.dot_general(x, kernel, ((axes, tuple(range(n_in))), ((), ())))
        y += jnp.reshape(bias, (1,) * (x.ndim - n_in) + features)
        batch = _LETTERS[: x.ndim - n_in]
        ins, outs = ("nh", "d") if n_in == 2 else ("d", "nh")
        eqn = f"{batch}{ins},{ins}{outs}->{batch}{outs}"
        d = lora_lib.delta(self, "kernel", eqn, x, shape, self.lora)
        return y if d is None else y + d


class MultiHeadDotProductAttention(nn.Module):
    """Self-attention as `nn.MultiHeadDotProductAttention(num_heads, kernel_init, deterministic, dtype,
    force_fp32_for_softmax)` computes it for the ViT (no mask, no attention dropout): x [B, P, D] → [B, P, D]."""

    num_heads: int
    dtype: Any = None
    kernel_init: Any = nn.initializers.lecun_normal()
    deterministic: bool | None = None
    force_fp32_for_softmax: bool = False  # flax's field: the softmax in float32 under 16-bit matmuls.
    lora: lora_lib.LoraSpec | None = None

    @nn.compact
    def __call__(self, inputs_q: jax.Array, inputs_k: jax.Array | None = None) -> jax.Array:
        inputs_k = inputs_q if inputs_k is None else inputs_k
        width = inputs_q.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"ViT width {width} is not divisible by num_heads={self.num_heads}.")
        proj = dict(dtype=self.dtype, kernel_init=self.kernel_init, lora=self.lora)
        heads = (self.num_heads, width // self.num_heads)
        q = _Projection(heads, 1, name="query", **proj)(inputs_q)
        k = _Projection(heads, 1, name="key", **proj)(inputs_k)
        v = _Projection(heads, 1, name="value", **proj)(inputs_k)
        x = nn.dot_product_attention(
            q, k, v, dtype=self.dtype, deterministic=True, force_fp32_for_softmax=self.force_fp32_for_softmax
        )
        return _Projection((width,), 2, name="out", **proj)(x)
