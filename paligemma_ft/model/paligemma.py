"""PaliGemma: the glue between the SigLIP ViT (`img/...`) and the Gemma decoder (`llm/...`).

Mirrors `big_vision/models/proj/paligemma/paligemma.py` (reference 2.1, 2.4): image tokens first, text embedded
with × sqrt(width) (image tokens are not scaled), a prefix-LM attention mask from `cumsum(mask_ar)`, positions
0..T-1 over the concatenated sequence, and logits computed only for the text positions.

Axes: B batch, R image side, P image tokens, L text length, T = P + L, D LLM width, V vocab.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from paligemma_ft.model.gemma import Gemma
from paligemma_ft.model.lora import LoraSpec
from paligemma_ft.model.presets import resolve_img_config, resolve_llm_config
from paligemma_ft.model.vit import ViT


def make_attn_mask(input_mask: jax.Array, mask_ar: jax.Array) -> jax.Array:
    """Attention mask bool[B, T, T] from validity and auto-regressive markers (big_vision's 4-line rule).

    Query i may attend key j iff cumsum(mask_ar)[j] <= cumsum(mask_ar)[i] and both are valid. Examples:

      mask_ar [0 0 0 1 1 1]  →  prefix-LM: 3 bidirectional prefix tokens, then causal suffix tokens.
      mask_ar [1 1 1 1 1 1]  →  pure causal.
      mask_ar [1 0 0 1 0 0]  →  two causal blocks, bidirectional inside each.

    Args:
      input_mask: bool/int[B, T], True where the token is valid (not padding).
      mask_ar: int[B, T], 1 where a token starts a new causal step, 0 where it shares the previous one's block.
    """
    cumsum = jnp.cumsum(mask_ar, axis=1)
    attn_mask = cumsum[:, None, :] <= cumsum[:, :, None]
    valid_mask = input_mask[:, None, :] * input_mask[:, :, None]
    return jnp.logical_and(attn_mask, valid_mask)


class Model(nn.Module):
    """PaliGemma 1 or 2. `img` and `llm` are config dicts with big_vision's keys (see `presets`).

    `model.apply({"params": p}, image, text, mask_ar, train=False)` → `(text_logits f32[B, L, V], out)`.
    `lora` adds adapters and/or quantized frozen weights to both towers (model/lora.py).
    """

    img: Mapping[str, Any] | None = None
    llm: Mapping[str, Any] | None = None
    lora: LoraSpec | None = None

    def setup(self):
        llm_cfg = resolve_llm_config(self.llm)
        self._llm = Gemma(**llm_cfg, lora=self.lora, name="llm")
        self._img_model = ViT(**resolve_img_config(self.img, llm_width=llm_cfg["width"]), lora=self.lora, name="img")

    # --- Embeddings ---------------------------------------------------------------------------------------

    def embed_image(self, image: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
        """image f32[B, R, R, 3] in [-1, 1] (or video [B, F, R, R, 3]) → (zimg f32[B, P(·F), D], out)."""
        out = {}
        image_shape = image.shape
        if len(image_shape) == 5:  # Video: fold frames into the batch, then concatenate their tokens.
            image = jnp.reshape(image, (-1, *image.shape[-3:]))
        zimg, out_img = self._img_model(image, train=train)
        if len(image_shape) == 5:
            zimg = jnp.reshape(zimg, (image_shape[0], -1, zimg.shape[-1]))
        out["img/zimg"] = zimg
        for k, v in out_img.items():
            out[f"img/{k}"] = v
        return zimg, out

    def embed_text(self, tokens: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
        """tokens i32[B, L] → (ztxt f32[B, L, D] = table[tokens] · sqrt(D), out)."""
        del train
        ztxt = self._llm.embed_tokens(tokens)
        return ztxt, {"llm/ztxt": ztxt}

    def embed_image_and_text(
        self,
        image: jax.Array,
        text: jax.Array,
        *,
        input_mask: jax.Array | None = None,
        mask_ar: jax.Array | None = None,
        train: bool = False,
    ) -> tuple[tuple[jax.Array, jax.Array, jax.Array], dict]:
        """Concatenates [image tokens, text tokens] → ((x [B, T, D], input_mask [B, T], mask_ar [B, T]), out).

        Defaults: `input_mask` all True, `mask_ar` all 1. Image positions get mask_ar 0 and input_mask True.
        """
        zimg, out_img = self.embed_image(image, train=train)
        ztxt, out_txt = self.embed_text(text, train=train)
        if input_mask is None:
            input_mask = jnp.full(text.shape, True)
        if mask_ar is None:
            mask_ar = jnp.full(text.shape, 1)
        x = jnp.concatenate([zimg, ztxt], axis=1)
        pad_width = ((0, 0), (zimg.shape[1], 0))
        mask_ar = jnp.pad(mask_ar, pad_width, constant_values=0)
        input_mask = jnp.pad(input_mask, pad_width, constant_values=True)
        return (x, input_mask, mask_ar), {**out_img, **out_txt}

    # --- Teacher-forced pass --------------------------------------------------------------------------------

    def prelogits(
        self, image: jax.Array, text: jax.Array, mask_ar: jax.Array, train: bool = False
    ) -> tuple[jax.Array, dict]:
        """The teacher-forced pass up to the final norm: (text pre-logits f32[B, L, D], out).

        The trainer uses this with `compute_logits` on the loss positions only, so [B, L, V] float32 logits
        never materialize for image and prefix positions.
        """
        (x, input_mask, mask_ar), out = self.embed_image_and_text(image, text, mask_ar=mask_ar, train=train)
        attn_mask = out["attn_mask"] = make_attn_mask(input_mask, mask_ar)
        positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32)[None], x.shape[:2])
        _, out_llm = self._llm(x, positions, attn_mask, deterministic=not train)
        for k, v in out_llm.items():
            out[f"llm/{k}"] = v
        text_pre_logits = out["llm/pre_logits"][:, out["img/zimg"].shape[1] :, :]
        return text_pre_logits, out

    def compute_logits(self, pre_logits: jax.Array, train: bool = False) -> jax.Array:
        """Tied output layer [..., D] → [..., V]; no final soft-cap (big_vision's `compute_logits`)."""
        del train
        return self._llm.compute_logits(pre_logits)

    def __call__(
        self, image: jax.Array, text: jax.Array, mask_ar: jax.Array, train: bool = False
    ) -> tuple[jax.Array, dict]:
        """image f32[B, R, R, 3], text i32[B, L], mask_ar i32[B, L] → (text_logits f32[B, L, V], out)."""
        text_pre_logits, out = self.prelogits(image, text, mask_ar, train=train)
        text_logits = self.compute_logits(text_pre_logits, train=train)
        out["text_logits"] = text_logits
        out["text_tokens"] = jnp.argmax(text_logits, axis=-1)
        return text_logits, out

    # --- Decoding (reference 8) -------------------------------------------------------------------------------

    def prefill_cache(self, x: jax.Array, input_mask: jax.Array, mask_ar: jax.Array, *, cache_size: int) -> jax.Array:
        """Initializes the KV cache with the prompt x [B, P, D]; returns the first sampled token's logits [B, 1, V]."""
        attn_mask = make_attn_mask(input_mask, mask_ar)
        return self._llm.prefill_cache(x, input_mask, attn_mask, cache_size=cache_size)

    def extend_cache(self, x: jax.Array) -> jax.Array:
        """Extends the cache by one embedded token x [B, 1, D]; returns logits [B, 1, V]."""
        return self._llm.extend_cache(x)
