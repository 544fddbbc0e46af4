"""The training loss, in a module with no data or checkpoint dependencies (benchmarks import it on bare images).

Token-level cross-entropy helpers (`softmax_xent`, `chunked_softmax_xent`) live in `optim.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from paligemma_ft.model import Model
from paligemma_ft.training import optim

PyTree = Any


def loss_fn(
    params: PyTree,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    model: Model,
    label_smoothing: float = 0.0,
    reduction: str = "example_mean",
) -> jax.Array:
    """big_vision's loss: mean over examples of the mean next-token xent on `mask_loss[:, 1:]` positions.

    Mixed precision: `params` arrive in their storage dtypes (trainable float32 masters, frozen ones as stored,
    e.g. float16) and the model casts each weight to its compute dtype (`model.llm.embed_dtype`,
    `model.img.dtype_mm`: `config.compute_dtype`, see `paligemma_ft.model.precision`) where it is used, inside
    this loss: layer weights one layer at a time inside the scan, the tied table in each logits chunk. Gradients
    come back in the storage dtypes. No parameter is cast as a whole up front.

    Args:
      params: model parameters (the `params` collection).
      batch: `image f32[B, R, R, 3]`, `text, mask_ar, mask_loss i32[B, L + 1]`, `_mask bool[B]` (padding rows
        get no loss).
      rng: dropout key.

    Returns:
      f32[] loss. Vocabulary logits are formed chunk by chunk on the text positions only (never for image tokens),
      so `[B, L, vocab]` float32 logits never exist at once.
    """
    text = batch["text"]
    pre_logits, _ = model.apply(
        {"params": params},
        batch["image"],
        text[:, :-1],
        batch["mask_ar"][:, :-1],
        train=True,
        rngs={"dropout": rng},
        method=model.prelogits,
    )
    mask = batch["mask_loss"][:, 1:]
    if "_mask" in batch:
        mask = mask * batch["_mask"][:, None].astype(mask.dtype)
    # Both in the dtypes they arrive in: pre-logits in the compute dtype, the table as stored. The chunks multiply
    # in the compute dtype with float32 accumulation, so no float32 copy of the [V, D] table is made.
    embedding = params["llm"]["embedder"]["input_embedding"]
    return optim.chunked_softmax_xent(
        pre_logits,
        embedding,
        text[:, 1:],
        mask,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )
