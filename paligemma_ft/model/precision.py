"""The compute dtype: which dtype the model's activations and matmuls use, chosen once per run.

`config.compute_dtype` is "float32" or "bfloat16"; None (or "auto") picks bfloat16 on GPUs and TPUs and float32
on CPUs. It is applied to a model config as the towers' own keys, so the model needs no other field:

* `img.dtype_mm`: the ViT's convolution, dense and attention dtype (big_vision's key);
* `llm.embed_dtype`: the dtype the Gemma layers' input is cast to; every layer then casts its weights to it at the
  point of use (per layer, inside the scan), so a float32 master weight or a float16-stored frozen weight is
  multiplied in the compute dtype without a float32 copy of the whole stack.

Attention logits, softmax, RMSNorm statistics and the vocabulary logits stay float32 (float32 accumulation via
`preferred_element_type`). In float32 nothing changes: both keys default to float32 and every cast is a no-op,
so float32 results are big_vision's bit for bit. Keys given explicitly under `config.model.img/llm` win (e.g.
the colab's `img.dtype_mm="float16"`).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

COMPUTE_DTYPES = ("float32", "bfloat16")
_AUTO = (None, "", "auto")


def platform_default(platform: str | None = None) -> str:
    """bfloat16 on GPUs and TPUs, float32 elsewhere; `platform` ("cpu", "gpu", "cuda", "rocm", "tpu") defaults to
    the platform of `jax.devices()[0]`."""
    if platform is None:
        platform = jax.devices()[0].platform
    return "bfloat16" if platform.lower() in ("gpu", "cuda", "rocm", "tpu") else "float32"


def resolve_compute_dtype(value: Any, platform: str | None = None, *, key: str = "config.compute_dtype") -> str:
    """The compute dtype a config asks for: "float32" or "bfloat16" (None / "auto": `platform_default`).

    Raises:
      ValueError: naming `key` for any other value.
    """
    if value in _AUTO:
        return platform_default(platform)
    name = str(getattr(value, "name", value)).lower()
    name = {"f32": "float32", "fp32": "float32", "bf16": "bfloat16"}.get(name, name)
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"{key}={value!r} is not supported: use 'float32', 'bfloat16' or 'auto' (None).")
    return name


def apply_compute_dtype(model_cfg: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """`model_cfg` (`dict(img=..., llm=...)`) computing in `dtype` ("float32" / "bfloat16").

    Sets `img.dtype_mm` and `llm.embed_dtype` where the config does not set them itself. float32 leaves the
    config untouched (both default to float32), so float32 models keep their exact configs and cache keys.
    """
    out = {k: (dict(v) if isinstance(v, Mapping) else copy.deepcopy(v)) for k, v in model_cfg.items()}
    if resolve_compute_dtype(dtype) == "float32":
        return out
    if out.get("img") is None:  # Model's default image tower.
        from paligemma_ft.model import presets  # noqa: PLC0415 - presets imports the towers.

        out["img"] = dict(presets._SIGLIP)  # noqa: SLF001 - the same package.
    if out.get("llm") is None:
        out["llm"] = {}
    out["img"].setdefault("dtype_mm", dtype)
    out["llm"].setdefault("embed_dtype", dtype)
    return out


def model_compute_dtype(model_cfg: Mapping[str, Any]) -> str:
    """The LLM's compute dtype of a model config (`llm.embed_dtype`, default float32)."""
    llm = model_cfg.get("llm") or {}
    return str(llm.get("embed_dtype") or "float32")


def device_platform(device: str | None) -> str | None:
    """ "tpu", "gpu" or "cpu" for a device name as `paligemma-ft plan --device` takes it ("H100", "TPU v5 lite",
    "cpu"); None when the name is unknown."""
    if not device:
        return None
    name = device.lower()
    if "tpu" in name:
        return "tpu"
    if "cpu" in name:
        return "cpu"
    from paligemma_ft import flops  # noqa: PLC0415 - the device table.

    return "gpu" if flops.peak_flops(device) is not None else None


# --- Products: 16-bit operands, float32 accumulation -------------------------------------------------------------

# Names of the results of 16-bit products (custom VJPs, invisible to JAX's dot remat policies; see
# `paligemma_ft.model.remat`): without and with batch dimensions.
DOT_NAMES = {False: "precision_dot", True: "precision_dot_batched"}


def einsum(eqn: str, x: jax.Array, w: jax.Array, *, out_dtype: Any = None) -> jax.Array:
    """`jnp.einsum(eqn, x, w)` computed in x's dtype (the compute dtype); `w` (a weight as stored: a float32 master
    or a float16 frozen weight; or another activation) is cast to it here, so one layer's weight is cast at a
    time inside the scan. With float32 x this is the plain float32 einsum: big_vision's product, bit for bit.

    With 16-bit x the product accumulates in float32 (`preferred_element_type`) and is rounded once to
    `out_dtype` (default x's dtype; float32 for attention and vocabulary logits). The backward pass is written out
    (a custom VJP) so that it multiplies 16-bit operands too: JAX's own transpose would pair a float32 cotangent
    with the 16-bit operand and upcast the operand, e.g. a float32 copy of the whole [V, D] table in the loss.
    The weight's gradient comes back in its own dtype, accumulated in float32 (a float32 master gets a float32
    gradient). Products with float32 results are also the only bfloat16 products XLA:CPU compiles as such, which
    the HLO tests rely on. The result carries a name from `DOT_NAMES` for the remat policies.

    Every index of an operand must appear in the output or in the other operand (plain contractions, as all of
    the model's products): swapping an operand's subscripts with the output's is then its transpose.
    """
    if x.dtype == jnp.float32:
        return jnp.einsum(eqn, x, w.astype(x.dtype), preferred_element_type=out_dtype)
    lhs, rhs, out = _split(eqn)
    batched = bool(set(lhs) & set(rhs) & set(out))
    return checkpoint_name(_einsum_low(eqn, jnp.dtype(out_dtype or x.dtype), x, w), DOT_NAMES[batched])


def dot(x: jax.Array, w: jax.Array, *, transpose_w: bool = False, out_dtype: Any = None) -> jax.Array:
    """`jnp.dot(x, w)` (or `x @ w.T`) for x [..., D] and a 2-D w, with `einsum`'s dtype rules. With float32 x it
    is exactly the `jnp.dot` big_vision writes (an einsum over a transposed table sums in another order)."""
    if x.dtype == jnp.float32:
        w = w.astype(x.dtype)
        return jnp.dot(x, w.T if transpose_w else w, preferred_element_type=out_dtype)
    lead = x.shape[:-1]
    y = einsum("MD,VD->MV" if transpose_w else "MD,DV->MV", x.reshape(-1, x.shape[-1]), w, out_dtype=out_dtype)
    return y.reshape(*lead, y.shape[-1])


def _split(eqn: str) -> tuple[str, str, str]:
    inputs, out = eqn.split("->")
    lhs, rhs = inputs.split(",")
    return lhs, rhs, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _einsum_low(eqn: str, out_dtype: Any, x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum(eqn, x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(out_dtype)


def _einsum_low_fwd(eqn: str, out_dtype: Any, x: jax.Array, w: jax.Array):
    return _einsum_low(eqn, out_dtype, x, w), (x, w)  # w as stored: the backward casts it again (no saved copy).


def _einsum_low_bwd(eqn: str, out_dtype: Any, res: tuple[jax.Array, jax.Array], g: jax.Array):
    x, w = res
    lhs, rhs, out = _split(eqn)
    g, wc = g.astype(x.dtype), w.astype(x.dtype)
    dx = jnp.einsum(f"{out},{rhs}->{lhs}", g, wc, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.einsum(f"{out},{lhs}->{rhs}", g, x, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


_einsum_low.defvjp(_einsum_low_fwd, _einsum_low_bwd)
