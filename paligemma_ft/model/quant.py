"""Blockwise weight quantization for QLoRA: NF4 (QLoRA's 4-bit NormalFloat) and int8, with on-the-fly dequantization.

A frozen weight W is cut into blocks of `block_size(n)` consecutive entries along one axis (the last contracted
axis, so a block is part of one output column as in bitsandbytes, where blocks run along torch's `in` axis). Each
block stores its absolute maximum `absmax` as the scale; entries are stored as

  * nf4: the index of the nearest of QLoRA's 16 NormalFloat levels (bitsandbytes' table, paper appendix E) to
    W / absmax, two indices per uint8 (element 2j in the high nibble, 2j+1 in the low one, as bitsandbytes);
  * int8: round(W / absmax * 127) as int8 (symmetric absmax quantization).

Dequantization is `level[code] * absmax`: a table lookup and a multiply, done inside the layer that reads the
weight so only one layer's dense weight exists at a time (inside `nn.scan` and remat).

Why not qwix's quantization: qwix scales whole channels (one scale per output column, not 64-entry blocks as
QLoRA and bitsandbytes), stores NF4 as `uint4` (whose memory layout depends on the XLA backend) and finds the NF4
level with a [N, 16] argmin; here codes are packed explicitly into bytes (0.5 byte per weight on every backend,
so `plan` counts what a GPU holds) and found with a binary search over the 15 midpoints. See docs/design.md.

Both `quantize` (numpy on the host, for checkpoints; `jax.numpy` inside a model's init) and `dequantize`
(`jax.numpy`) take the array module as `xp`.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

QUANT_MODES = ("none", "int8", "nf4")
BLOCK = 64  # Entries per scale, as bitsandbytes' default QLoRA block size.

# QLoRA's NormalFloat-4 levels (Dettmers et al. 2023, appendix E; bitsandbytes' NF4 code book), ascending.
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


def block_size(n: int) -> int:
    """Entries per block along an axis of length n: 64, or the largest power of two dividing n when 64 does not
    (tiny test models with 16-wide heads). nf4 needs an even block (two codes per byte)."""
    return math.gcd(BLOCK, n)


def _blocked(w: Any, axis: int, xp: Any) -> tuple[Any, int]:
    """w [..., n, ...] → [..., n / b, b, ...] (the block axis right after `axis`) and b."""
    n = w.shape[axis]
    b = block_size(n)
    return xp.reshape(w, (*w.shape[:axis], n // b, b, *w.shape[axis + 1 :])), b


def quantized_shapes(shape: tuple[int, ...], axis: int, mode: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(codes shape, scale shape) of a weight of `shape` blocked along `axis` (non-negative)."""
    n = shape[axis]
    codes = list(shape)
    if mode == "nf4":
        if block_size(n) % 2:
            raise ValueError(f"nf4 needs an even axis to pack two codes per byte, got {shape} along axis {axis}.")
        codes[axis] = n // 2
    scale = list(shape)
    scale[axis] = n // block_size(n)
    return tuple(codes), tuple(scale)


def quantize(w: Any, axis: int, mode: str, xp: Any = np) -> tuple[Any, Any]:
    """Quantizes w (float, any shape) in blocks along `axis`; returns (codes, absmax).

    Returns:
      nf4: (uint8 codes with `axis` halved, float32 absmax with `axis` = n / block); int8: (int8 codes of w's shape,
      float32 absmax). An all-zero block gets absmax 1 (its codes are the zero level), so nothing divides by 0.
    """
    if mode not in ("int8", "nf4"):
        raise ValueError(f"Unknown quantization {mode!r}; use one of {QUANT_MODES}.")
    axis = axis % w.ndim
    blocks, _ = _blocked(xp.asarray(w, xp.float32), axis, xp)
    absmax = xp.max(xp.abs(blocks), axis=axis + 1, keepdims=True)
    absmax = xp.where(absmax > 0, absmax, xp.ones_like(absmax))
    x = blocks / absmax
    if mode == "int8":
        codes = xp.round(x * 127).astype(xp.int8)
        return xp.reshape(codes, w.shape), xp.squeeze(absmax, axis + 1)
    # Nearest level = number of midpoints below x (a midpoint itself rounds down, like argmin's first index).
    idx = xp.searchsorted(xp.asarray(_NF4_MIDPOINTS), x, side="left").astype(xp.uint8)
    idx = xp.reshape(idx, w.shape)
    pairs = xp.reshape(idx, (*w.shape[:axis], w.shape[axis] // 2, 2, *w.shape[axis + 1 :]))
    hi = xp.take(pairs, 0, axis=axis + 1)
    lo = xp.take(pairs, 1, axis=axis + 1)
    return (hi << 4 | lo).astype(xp.uint8), xp.squeeze(absmax, axis + 1)


def dequantize(codes: Any, absmax: Any, axis: int, mode: str, dtype: Any = None, xp: Any = jnp) -> Any:
    """The inverse of `quantize` (up to rounding): float weights of the original shape in `dtype` (default the
    scale's dtype). `axis` is the blocked axis of the original weight (codes and scale have as many axes)."""
    axis = axis % codes.ndim
    if mode == "nf4":
        hi, lo = codes >> 4, codes & 15
        idx = xp.stack([hi, lo], axis=axis + 1)
        shape = list(codes.shape)
        shape[axis] *= 2
        idx = xp.reshape(idx, shape)
        levels = xp.asarray(NF4_LEVELS, absmax.dtype)[idx.astype(xp.int32)]
    elif mode == "int8":
        levels = codes.astype(absmax.dtype) / xp.asarray(127, absmax.dtype)
    else:
        raise ValueError(f"Unknown quantization {mode!r}; use one of {QUANT_MODES}.")
    blocks, _ = _blocked(levels, axis, xp)
    w = xp.reshape(blocks * xp.expand_dims(absmax, axis + 1), levels.shape)
    return w if dtype is None else w.astype(dtype)
