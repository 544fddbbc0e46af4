"""PaliGemma's mask codec: the VQ-VAE that turns a 64 x 64 mask into 16 `<segNNN>` tokens and back.

A JAX/Flax port of what big_vision uses for segmentation (reference 9): the encoder of
`big_vision/pp/proj/paligemma/segmentation.py` (`encode_to_codebook_indices`, used by the `refcoco_mask2str`
preprocessing op) and the decoder of `big_vision/evaluators/proj/paligemma/transfers/segmentation.py`
(`get_reconstruct_masks`). Both read the published PyTorch-named weights `vae-oid.npz`
(gs://big_vision/paligemma/vae-oid.npz, big_vision's model key `'oi'`, trained on OpenImages) unchanged: conv
weights are stored OIHW (ConvTranspose: in, out, kH, kW) and transposed to HWIO with (2, 3, 1, 0), as big_vision
does. The network is the instance-mask VQ-VAE of "All in Tokens" (arXiv 2301.02229; hidden 16, 2 residual blocks,
downsampling 16, 128 codes of width 512).

    encoder: mask f32[N, 64, 64, 1] in [0, 1] -> 2 * (x - 0.5)
             -> 4 x (conv 4x4 stride 2 "SAME" + ReLU): 1 -> 16 -> 32 -> 64 -> 128 channels, 64 -> 4 px
             -> 2 residual blocks (3x3, ReLU, 3x3, ReLU, 1x1, + skip) -> conv 1x1 to 512
             -> nearest codebook row (squared L2) of each of the 4 x 4 cells -> i32[N, 16] in [0, 128), row-major
    decoder: i32[N, 16] -> codebook rows f32[N, 4, 4, 512] -> conv 1x1 to 128 + ReLU -> 2 residual blocks
             -> 4 x (transposed conv 4x4 stride 2, padding 2, `transpose_kernel=True`, + ReLU): 128, 64, 32, 16
             -> conv 1x1 to 1 -> f32[N, 64, 64] in about [-1, 1]; the mask is `value > 0`.

The expected file, every array float32 (`LAYOUT`, checked on load; `OPTIONAL` arrays are the EMA training buffers
of the PyTorch quantizer, accepted and ignored):

    name                                   shape               role
    encoder.0.weight / .bias               [16, 1, 4, 4] / [16]       conv 1 -> 16, stride 2
    encoder.2.weight / .bias               [32, 16, 4, 4] / [32]      conv 16 -> 32, stride 2
    encoder.4.weight / .bias               [64, 32, 4, 4] / [64]      conv 32 -> 64, stride 2
    encoder.6.weight / .bias               [128, 64, 4, 4] / [128]    conv 64 -> 128, stride 2
    encoder.{8,9}.net.{0,2}.weight / .bias [128, 128, 3, 3] / [128]   residual block 3x3 convs
    encoder.{8,9}.net.4.weight / .bias     [128, 128, 1, 1] / [128]   residual block 1x1 conv
    encoder.10.weight / .bias              [512, 128, 1, 1] / [512]   conv 128 -> 512 (code width)
    _vq_vae._embedding                     [128, 512]                 the codebook
    decoder.0.weight / .bias               [128, 512, 1, 1] / [128]   conv 512 -> 128
    decoder.{2,3}.net.{0,2}.weight / .bias [128, 128, 3, 3] / [128]   residual block 3x3 convs
    decoder.{2,3}.net.4.weight / .bias     [128, 128, 1, 1] / [128]   residual block 1x1 conv
    decoder.4.weight / .bias               [128, 128, 4, 4] / [128]   transposed conv 128 -> 128 (in, out, kH, kW)
    decoder.6.weight / .bias               [128, 64, 4, 4] / [64]     transposed conv 128 -> 64
    decoder.8.weight / .bias               [64, 32, 4, 4] / [32]      transposed conv 64 -> 32
    decoder.10.weight / .bias              [32, 16, 4, 4] / [16]      transposed conv 32 -> 16
    decoder.12.weight / .bias              [1, 16, 1, 1] / [1]        conv 16 -> 1

Codec specs (`input.data.codec`, evaluator `codec`, `predict --codec`): `oi` (the default: big_vision's name,
read from `default_codec_path()`), a path to a `.npz`, or `random:SEED` (a randomly initialised codec in the same
layout, for tests and offline smoke runs: its masks mean nothing).

Axes: N masks, C channels.
"""

from __future__ import annotations

import functools
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MASK_SIZE = 64  # The codec's mask side in pixels.
NUM_TOKENS = 16  # <seg> tokens per mask: a 4 x 4 grid of codes, row-major.
NUM_CODES = 128  # Codebook rows: <seg000> .. <seg127>.
CODE_WIDTH = 512
DEFAULT_CODEC = "oi"
DOWNLOAD_URL = "https://storage.googleapis.com/big_vision/paligemma/vae-oid.npz"  # = gs://big_vision/paligemma/...
_ENC_CHANNELS = (1, 16, 32, 64, 128)  # Input, then each stride-2 conv's output.
_DEC_CHANNELS = (128, 128, 64, 32, 16)  # Input of the transposed convs, then each one's output.


def _layout() -> dict[str, tuple[int, ...]]:
    """Name -> shape of every array the codec needs (see the module docstring's table)."""
    out: dict[str, tuple[int, ...]] = {}

    def conv(name: str, c_out: int, c_in: int, k: int) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = (c_out, c_in, k, k), (c_out,)

    def resblock(name: str) -> None:
        conv(f"{name}.net.0", 128, 128, 3)
        conv(f"{name}.net.2", 128, 128, 3)
        conv(f"{name}.net.4", 128, 128, 1)

    for i in range(4):
        conv(f"encoder.{2 * i}", _ENC_CHANNELS[i + 1], _ENC_CHANNELS[i], 4)
    resblock("encoder.8")
    resblock("encoder.9")
    conv("encoder.10", CODE_WIDTH, 128, 1)
    out["_vq_vae._embedding"] = (NUM_CODES, CODE_WIDTH)
    conv("decoder.0", 128, CODE_WIDTH, 1)
    resblock("decoder.2")
    resblock("decoder.3")
    for i in range(4):  # PyTorch's ConvTranspose2d stores (in, out, kH, kW).
        name = f"decoder.{4 + 2 * i}"
        out[f"{name}.weight"], out[f"{name}.bias"] = (
            (_DEC_CHANNELS[i], _DEC_CHANNELS[i + 1], 4, 4),
            (_DEC_CHANNELS[i + 1],),
        )
    conv("decoder.12", 1, 16, 1)
    return out


LAYOUT: dict[str, tuple[int, ...]] = _layout()
DTYPE = np.dtype(np.float32)
OPTIONAL = {"_vq_vae._ema_cluster_size": (NUM_CODES,), "_vq_vae._ema_w": (NUM_CODES, CODE_WIDTH)}


# --- Flax modules (big_vision's decoder names; the encoder named the same way) ---------------------------------


class ResBlock(nn.Module):
    """3x3 conv, ReLU, 3x3 conv, ReLU, 1x1 conv, plus the input."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.relu(nn.Conv(self.features, (3, 3), padding=1)(x))
        y = nn.relu(nn.Conv(self.features, (3, 3), padding=1)(y))
        return x + nn.Conv(self.features, (1, 1), padding=0)(y)


class Encoder(nn.Module):
    """f32[N, 64, 64, 1] in [-1, 1] -> f32[N, 4, 4, 512] (before quantization)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for c in _ENC_CHANNELS[1:]:
            # TF's "SAME" with kernel 4, stride 2 pads 1 on each side, as the PyTorch original's padding=1.
            x = nn.relu(nn.Conv(c, (4, 4), strides=(2, 2), padding="SAME")(x))
        x = ResBlock(128)(x)
        x = ResBlock(128)(x)
        return nn.Conv(CODE_WIDTH, (1, 1), padding="SAME")(x)


class Decoder(nn.Module):
    """f32[N, 4, 4, 512] codebook rows -> f32[N, 64, 64, 1], about [-1, 1]."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(128, (1, 1), padding=0)(x))
        x = ResBlock(128)(x)
        x = ResBlock(128)(x)
        for c in _DEC_CHANNELS[1:]:
            # padding=2 in lax's convention is PyTorch's padding=1 for a 4x4 transposed kernel: 2x upsampling.
            x = nn.relu(nn.ConvTranspose(c, (4, 4), strides=(2, 2), padding=2, transpose_kernel=True)(x))
        return nn.Conv(1, (1, 1), padding=0)(x)


# --- Loading -------------------------------------------------------------------------------------------------


def default_codec_path() -> pathlib.Path:
    """Where the `oi` codec is looked for: `$PALIGEMMA_FT_CODEC` if set, else ~/.cache/paligemma_ft/vae-oid.npz."""
    if os.environ.get("PALIGEMMA_FT_CODEC"):
        return pathlib.Path(os.environ["PALIGEMMA_FT_CODEC"]).expanduser()
    return pathlib.Path.home() / ".cache" / "paligemma_ft" / "vae-oid.npz"


def missing_codec_message(path: pathlib.Path, spec: str) -> str:
    """What to download and where to put it."""
    return (
        f"mask codec {spec!r}: {path} does not exist. Segmentation needs big_vision's VQ-VAE mask codec "
        f"vae-oid.npz. Download it once:\n"
        f"  mkdir -p {path.parent} && curl -L -o {path} {DOWNLOAD_URL}\n"
        f"(or `gsutil cp gs://big_vision/paligemma/vae-oid.npz {path}`), or set input.data.codec / the "
        "evaluator's `codec` to the file's path (the environment variable PALIGEMMA_FT_CODEC moves the default)."
    )


def resolve_codec(spec: str | os.PathLike | None) -> pathlib.Path | None:
    """The codec file a spec names (None for `random:SEED`); checks that it exists.

    Raises:
      FileNotFoundError: the file is missing; the message says what to download and where to put it.
    """
    spec = DEFAULT_CODEC if spec in (None, "") else os.fspath(spec)
    if spec.startswith("random:"):
        return None
    path = default_codec_path() if spec == DEFAULT_CODEC else pathlib.Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(missing_codec_message(path, spec))
    return path


def check_layout(arrays: Mapping[str, np.ndarray], source: str) -> None:
    """Raises ValueError naming every missing, unexpected, misshapen or non-float32 array of a codec file."""
    problems = []
    missing = sorted(set(LAYOUT) - set(arrays))
    if missing:
        problems.append(f"missing arrays {missing}")
    unexpected = sorted(set(arrays) - set(LAYOUT) - set(OPTIONAL))
    if unexpected:
        problems.append(f"unexpected arrays {unexpected}")
    for name, want in {**LAYOUT, **OPTIONAL}.items():
        if name in arrays and tuple(np.shape(arrays[name])) != want:
            problems.append(f"{name} has shape {tuple(np.shape(arrays[name]))}, expected {want}")
        elif name in arrays and np.asarray(arrays[name]).dtype != DTYPE:
            problems.append(f"{name} has dtype {np.asarray(arrays[name]).dtype}, expected float32")
    if problems:
        raise ValueError(
            f"{source} is not big_vision's VQ-VAE mask codec (vae-oid.npz layout, see paligemma_ft/model/vqvae.py): "
            + "; ".join(problems)
        )


def random_codec_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """A randomly initialised codec in vae-oid.npz's layout (float32, fan-in scaled), e.g. to save as a test file."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in LAYOUT.items():
        if name == "_vq_vae._embedding":
            out[name] = rng.normal(0, 1, shape).astype(np.float32)
        elif name.endswith(".bias"):
            out[name] = rng.normal(0, 0.01, shape).astype(np.float32)
        else:  # Fan-in scaled (He); ConvTranspose weights are (in, out, k, k), convs (out, in, k, k).
            transposed = name.startswith(("decoder.4.", "decoder.6.", "decoder.8.", "decoder.10."))
            fan_in = (shape[0] if transposed else shape[1]) * shape[2] * shape[3]
            out[name] = rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
    return out


def _flax_params(arrays: Mapping[str, np.ndarray], prefix: str) -> dict[str, Any]:
    """The Flax parameter tree of the encoder or decoder (big_vision's `_get_params`, extended to the encoder)."""

    def conv(name: str) -> dict[str, np.ndarray]:
        return {"kernel": np.transpose(arrays[f"{name}.weight"], (2, 3, 1, 0)), "bias": arrays[f"{name}.bias"]}

    def resblock(name: str) -> dict[str, Any]:
        return {f"Conv_{i}": conv(f"{name}.net.{k}") for i, k in enumerate((0, 2, 4))}

    if prefix == "encoder":
        tree = {f"Conv_{i}": conv(f"encoder.{2 * i}") for i in range(4)}
        tree.update(ResBlock_0=resblock("encoder.8"), ResBlock_1=resblock("encoder.9"), Conv_4=conv("encoder.10"))
        return tree
    return {
        "Conv_0": conv("decoder.0"),
        "ResBlock_0": resblock("decoder.2"),
        "ResBlock_1": resblock("decoder.3"),
        **{f"ConvTranspose_{i}": conv(f"decoder.{4 + 2 * i}") for i in range(4)},
        "Conv_1": conv("decoder.12"),
    }


class MaskCodec:
    """Encodes masks to codebook indices and decodes indices to masks, jitted on the default device.

    Args:
      arrays: the flat PyTorch-named arrays of `vae-oid.npz` (checked against `LAYOUT`).
      source: how errors refer to them (the file path).
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], source: str = "<arrays>"):
        check_layout(arrays, source)
        self.source = source
        self.codebook = jnp.asarray(arrays["_vq_vae._embedding"])
        self._enc = {"params": _flax_params(arrays, "encoder")}
        self._dec = {"params": _flax_params(arrays, "decoder")}
        self._encode = jax.jit(self._encode_impl)
        self._decode = jax.jit(self._decode_impl)

    def __repr__(self) -> str:
        return f"MaskCodec({self.source})"

    def _encode_impl(self, enc: Any, codebook: jax.Array, masks: jax.Array) -> jax.Array:
        z = jnp.asarray(Encoder().apply(enc, 2.0 * (masks[..., None] - 0.5))).reshape(-1, CODE_WIDTH)
        # Squared distances to every code, as big_vision: |z|^2 + |e|^2 - 2 z.e, argmin over codes.
        dist = (z**2).sum(1, keepdims=True) + (codebook**2).sum(1) - 2 * z @ codebook.T
        return jnp.argmin(dist, axis=1).astype(jnp.int32).reshape(masks.shape[0], NUM_TOKENS)

    def _decode_impl(self, dec: Any, codebook: jax.Array, indices: jax.Array) -> jax.Array:
        x = jnp.take(codebook, indices.reshape(-1), axis=0).reshape(indices.shape[0], 4, 4, CODE_WIDTH)
        return jnp.asarray(Decoder().apply(dec, x))[..., 0]

    def encode(self, masks: np.ndarray) -> np.ndarray:
        """f32[N, 64, 64] in [0, 1] (a mask crop resized to 64 x 64) -> i32[N, 16] codes in [0, 128)."""
        masks = np.asarray(masks, np.float32)
        if masks.ndim != 3 or masks.shape[1:] != (MASK_SIZE, MASK_SIZE):
            raise ValueError(f"MaskCodec.encode: masks must be [N, 64, 64], got {masks.shape}")
        return np.asarray(self._encode(self._enc, self.codebook, masks))

    def decode(self, indices: np.ndarray) -> np.ndarray:
        """i32[N, 16] codes in [0, 128) -> f32[N, 64, 64], about [-1, 1] (the mask is `> 0`)."""
        indices = np.asarray(indices, np.int32)
        if indices.ndim != 2 or indices.shape[1] != NUM_TOKENS:
            raise ValueError(f"MaskCodec.decode: indices must be [N, 16], got {indices.shape}")
        if indices.size and (indices.min() < 0 or indices.max() >= NUM_CODES):
            raise ValueError(
                f"MaskCodec.decode: codes must be in [0, {NUM_CODES}), got {indices.min()}..{indices.max()}"
            )
        return np.asarray(self._decode(self._dec, self.codebook, indices))


def read_codec_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a codec `.npz` (ValueError naming the file when it is not a readable npz)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"mask codec {path}: not a readable .npz file ({type(e).__name__}: {e})") from None


@functools.cache
def load_codec(spec: str | None = DEFAULT_CODEC) -> MaskCodec:
    """The codec a spec names (`oi`, a `.npz` path or `random:SEED`), loaded once per process.

    Raises:
      FileNotFoundError: the file is missing (the message says what to download and where to put it).
      ValueError: the file is not a codec in vae-oid.npz's layout (every wrong name, shape and dtype is named).
    """
    spec = DEFAULT_CODEC if spec in (None, "") else str(spec)
    if spec.startswith("random:"):
        try:
            seed = int(spec.removeprefix("random:"))
        except ValueError:
            raise ValueError(f"mask codec {spec!r}: random:SEED needs an integer seed") from None
        return MaskCodec(random_codec_arrays(seed), spec)
    path = resolve_codec(spec)
    assert path is not None  # Only random:SEED resolves to no file.
    return MaskCodec(read_codec_file(path), str(path))
