"""SigLIP vision encoder: a ViT with big_vision's parameter names and numerics.

This mirrors `big_vision/models/vit.py` (reference 2.2): a "VALID" patchify conv named `embedding`, a learned
position embedding `pos_embedding`, pre-LN encoder blocks built from flax's own `LayerNorm`,
`MultiHeadDotProductAttention` and `Dense` (so parameter names and numerics are flax's, exactly as in
big_vision), a final `encoder_norm`, no pooling for PaliGemma, and a per-token `head` Dense that projects into the
LLM width. With `scan=True` the blocks run in one `nn.scan` and their parameters are stacked under
`Transformer/encoderblock` with a leading depth axis; with `scan=False` they are `Transformer/encoderblock_{i}`.

Axes: B batch, R image side, P patches (= (R / patch)^2), D width, F mlp dim, E output (LLM) width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

from paligemma_ft.model import layers, remat
from paligemma_ft.model.lora import LoraSpec
from paligemma_ft.utils import LeafAdapter

# Widths, depths, MLP dims and heads of the named ViT sizes (big_vision's `decode_variant`).
_VARIANTS = {
    #          width, depth, mlp_dim, heads
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
}


def decode_variant(variant: str | None) -> dict[str, Any]:
    """Turns e.g. "So400m/14" into `dict(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=(14, 14))`."""
    if variant is None:
        return {}
    name, _, patch = variant.partition("/")
    if name not in _VARIANTS:
        raise ValueError(f"Unknown ViT variant {variant!r}; known sizes: {sorted(_VARIANTS)} (e.g. 'So400m/14').")
    width, depth, mlp_dim, heads = _VARIANTS[name]
    out: dict[str, Any] = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads)
    if patch:
        out["patch_size"] = (int(patch), int(patch))
    return out


class MlpBlock(nn.Module):
    """Dense → tanh-GELU → dropout → Dense, flax's default inits as big_vision sets them."""

    mlp_dim: int
    dropout: float = 0.0
    dtype_mm: str = "float32"
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        inits: dict[str, Any] = dict(
            kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.normal(stddev=1e-6)
        )
        d = x.shape[-1]
        x = layers.Dense(self.mlp_dim, dtype=self.dtype_mm, lora=self.lora, **inits)(x)
        x = nn.gelu(x)  # approximate=True (tanh form), as big_vision: the erf form changes logits.
        x = nn.Dropout(rate=self.dropout)(x, deterministic)
        return layers.Dense(d, dtype=self.dtype_mm, lora=self.lora, **inits)(x)


class Encoder1DBlock(nn.Module):
    """Pre-LN transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    dtype_mm: str = "float32"
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> tuple[jax.Array, dict]:
        out = {}
        y = nn.LayerNorm()(x)
        y = out["sa"] = layers.MultiHeadDotProductAttention(  # flax's numerics and names, LoRA-capable.
            num_heads=self.num_heads,
            kernel_init=nn.initializers.xavier_uniform(),
            deterministic=deterministic,
            dtype=self.dtype_mm,
            lora=self.lora,
            # Softmax in float32 when the matmuls are 16-bit (no effect in float32: big_vision's numerics).
            force_fp32_for_softmax=jnp.dtype(self.dtype_mm) != jnp.float32,
        )(y, y)
        y = nn.Dropout(rate=self.dropout)(y, deterministic)
        x = out["+sa"] = x + y
        y = nn.LayerNorm()(x)
        y = out["mlp"] = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout, dtype_mm=self.dtype_mm, lora=self.lora)(
            y, deterministic
        )
        y = nn.Dropout(rate=self.dropout)(y, deterministic)
        x = out["+mlp"] = x + y
        return x, out


class Encoder(nn.Module):
    """The stack of blocks plus `encoder_norm`; scanned (stacked params) or looped."""

    depth: int
    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    scan: bool = False
    remat_policy: str = "nothing_saveable"
    dtype_mm: str = "float32"
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> tuple[jax.Array, dict]:
        out: dict[str, Any] = {}
        kw: dict[str, Any] = dict(
            mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout, dtype_mm=self.dtype_mm, lora=self.lora
        )
        if self.scan:
            policy = remat.remat_policy(self.remat_policy)
            block = Encoder1DBlock
            if policy is not None:
                # static_argnums counts `self` as 0: `deterministic` is a Python bool.
                block = nn.remat(Encoder1DBlock, prevent_cse=False, static_argnums=(2,), policy=policy)
            x, _ = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=self.depth,
            )(name="encoderblock", **kw)(x, deterministic)
        else:
            for i in range(self.depth):
                x, _ = Encoder1DBlock(name=f"encoderblock_{i}", **kw)(x, deterministic)
        out["pre_ln"] = x
        return nn.LayerNorm(name="encoder_norm")(x), out


class ViT(nn.Module):
    """SigLIP ViT as PaliGemma uses it (`pool_type="none"`, per-token linear `head` into the LLM width).

    Call: `image f32[B, R, R, 3] in [-1, 1]` → `(tokens f32[B, P, E], out)`.
    """

    num_classes: int | None = None
    patch_size: Sequence[int] = (16, 16)
    width: int = 768
    depth: int = 12
    mlp_dim: int | None = None
    num_heads: int = 12
    posemb: str = "learn"
    dropout: float = 0.0
    pool_type: str = "none"
    head_zeroinit: bool = True
    scan: bool = False
    remat_policy: str = "nothing_saveable"
    dtype_mm: str = "float32"
    lora: LoraSpec | None = None  # Adapters / quantized kernels (model/lora.py); None: plain flax layers' math.

    @nn.compact
    def __call__(self, image: jax.Array, *, train: bool = False) -> tuple[jax.Array, dict]:
        if self.pool_type != "none":
            raise ValueError(f"PaliGemma's ViT keeps every token: pool_type must be 'none', got {self.pool_type!r}.")
        out: dict[str, Any] = {}
        image = jnp.asarray(image, self.dtype_mm)
        x = nn.Conv(
            self.width,
            tuple(self.patch_size),
            strides=tuple(self.patch_size),
            padding="VALID",
            name="embedding",
            dtype=self.dtype_mm,
        )(image)
        n, h, w, c = x.shape
        x = jnp.reshape(x, [n, h * w, c])  # Patches row-major: y then x.
        # In the activations' dtype, so that a float32 master copy does not turn a 16-bit stream (and the scan
        # carry) float32; with float32 activations this equals big_vision's promotion of a 16-bit embedding.
        x = x + self._posemb(h, w, c, x.dtype).astype(x.dtype)
        x = nn.Dropout(rate=self.dropout)(x, not train)
        x, out["encoder"] = Encoder(
            depth=self.depth,
            mlp_dim=self.mlp_dim or 4 * self.width,
            num_heads=self.num_heads,
            dropout=self.dropout,
            scan=self.scan,
            remat_policy=self.remat_policy,
            dtype_mm=self.dtype_mm,
            lora=self.lora,
            name="Transformer",
        )(x, deterministic=not train)
        out["encoded"] = x
        out["pre_logits"] = x
        if self.num_classes:
            kw: dict[str, Any] = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
            # In dtype_mm too (big_vision leaves the head to the parameters' dtype; the same in float32), so a
            # bfloat16 tower hands bfloat16 tokens to the LLM.
            head = layers.Dense(self.num_classes, name="head", dtype=self.dtype_mm, lora=self.lora, **kw)
            x = out["logits"] = head(x)
        return x, out

    def _posemb(self, h: int, w: int, width: int, dtype) -> jax.Array:
        if self.posemb == "learn":
            # big_vision creates the parameter in the activation dtype (dtype_mm).
            return self.param(
                "pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(width)), (1, h * w, width), dtype
            )
        if self.posemb == "sincos2d":
            return _posemb_sincos_2d(h, w, width, dtype)
        raise ValueError(f"Unknown posemb {self.posemb!r}: use 'learn' or 'sincos2d'.")


def _posemb_sincos_2d(h: int, w: int, width: int, dtype, temperature: float = 10_000.0) -> jax.Array:
    """Fixed 2-D sin-cos position embedding [1, h*w, width] (big_vision's `posemb_sincos_2d`)."""
    if width % 4:
        raise ValueError(f"sincos2d posemb needs a width divisible by 4, got {width}.")
    y, x = jnp.mgrid[:h, :w]
    omega = jnp.arange(width // 4) / (width // 4 - 1)
    omega = 1.0 / (temperature**omega)
    y = jnp.einsum("m,d->md", y.flatten(), omega)
    x = jnp.einsum("m,d->md", x.flatten(), omega)
    pe = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
    return jnp.asarray(pe, dtype)[None, :, :]


# --- Checkpoint adaptation (big_vision's `vit.load`) -----------------------------------------------------------


def resample_posemb(posemb: np.ndarray, num_tokens: int) -> np.ndarray:
    """Bilinear resize of a square ViT position-embedding grid, as big_vision's `vit.resample_posemb`.

    Args:
      posemb: [1, N, D] with N a square number (row-major sqrt(N) x sqrt(N) grid).
      num_tokens: the new N, also square.

    Returns:
      [1, num_tokens, D] in `posemb`'s dtype (computed in float32 when scipy cannot handle the dtype).
    """
    gs_old, gs_new = math.isqrt(posemb.shape[1]), math.isqrt(num_tokens)
    if gs_old**2 != posemb.shape[1] or gs_new**2 != num_tokens:
        raise ValueError(
            f"Cannot resample a {posemb.shape[1]}-token position embedding to {num_tokens} tokens: "
            "both must be square grids."
        )
    grid = posemb.reshape(gs_old, gs_old, -1)
    if grid.dtype not in (np.float32, np.float64):
        grid = grid.astype(np.float32)  # scipy.ndimage has no float16/bfloat16 kernels.
    zoom = (gs_new / gs_old, gs_new / gs_old, 1)
    grid = scipy.ndimage.zoom(grid, zoom, order=1)
    return grid.reshape(1, gs_new * gs_new, -1).astype(posemb.dtype, copy=False)


def _posemb_fits(old: tuple[int, ...], new: tuple[int, ...]) -> bool:
    """[1, N, D] -> [1, M, D] with N and M square grids: another resolution of the same ViT."""
    return (
        len(old) == len(new) == 3
        and old[0] == new[0] == 1
        and old[2] == new[2]
        and math.isqrt(old[1]) ** 2 == old[1]
        and math.isqrt(new[1]) ** 2 == new[1]
    )


def _describe_posemb(name: str, old: tuple[int, ...], new: tuple[int, ...]) -> str:
    g_old, g_new = math.isqrt(old[1]), math.isqrt(new[1])
    return f"Resampled {name} bilinearly from {old} ({g_old}x{g_old} grid) to {new} ({g_new}x{g_new} grid)."


# What `checkpoints/loading.py` may change in a stored ViT (names below `img/`) to fit this model.
CHECKPOINT_ADAPTERS = (
    LeafAdapter(
        pattern=r"pos_embedding",
        fits=_posemb_fits,
        apply=lambda array, shape, rng: resample_posemb(array, shape[1]),
        describe=_describe_posemb,
    ),
)
