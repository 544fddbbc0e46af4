"""A model, its parameters and its tokenizer, ready to caption images: what `predict`, `evaluate`, the app, the
notebook and the trainer's evaluations share.

    from paligemma_ft.predictor import load_predictor
    p = load_predictor("builtin:demo")                # or a .npz, a run's workdir, kaggle:<handle>
    p.predict_images(["a.jpg"], "caption en")          # -> ["a red circle and a blue square"]

Checkpoint specs, the architecture and the tokenizer are resolved by `paligemma_ft.checkpoints.loading`, the one
loading path every command shares (`builtin:NAME`, `kaggle:HANDLE`, `hf:REPO_ID`, a workdir, an HF folder,
`FILE.npz[:sub]`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from paligemma_ft import decode as decode_lib
from paligemma_ft import multihost
from paligemma_ft import sharding as sharding_lib
from paligemma_ft import tokenizer as tokenizer_lib
from paligemma_ft.checkpoints import loading
from paligemma_ft.checkpoints.loading import checkpoint_path as resolve_checkpoint  # noqa: F401 - older callers.
from paligemma_ft.checkpoints.loading import init_shapes, model_config  # noqa: F401 - older callers.
from paligemma_ft.data import images as images_lib
from paligemma_ft.data import transforms
from paligemma_ft.model import Model

PyTree = Any
ImageLike = Any  # A path, encoded bytes, a PIL image or a uint8[H, W, 3] array.


def _per_example_loss(model: Model, params: PyTree, batch: dict) -> jax.Array:
    """f32[B]: mean next-token loss over `mask_loss[:, 1:]` positions of each row."""
    text = batch["text"]
    pre_logits, _ = model.apply(
        {"params": params}, batch["image"], text[:, :-1], batch["mask_ar"][:, :-1], method=model.prelogits
    )
    # flax types `apply` as possibly an (output, mutated) pair; with no `mutable` it is the output alone.
    logits = cast(jax.Array, model.apply({"params": params}, pre_logits, method=model.compute_logits))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, text[:, 1:, None], axis=-1)[..., 0]
    mask = batch["mask_loss"][:, 1:]
    return (nll * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1)


_LOSS_FNS: dict[str, Any] = {}


def _loss_fn(model: Model) -> Any:
    """`_per_example_loss` jitted for `model`; keyed by its repr, since a Model with dict fields cannot be hashed
    as a static argument (the same reason `decode` keys its functions by repr)."""
    key = repr(model)
    if key not in _LOSS_FNS:
        _LOSS_FNS[key] = jax.jit(functools.partial(_per_example_loss, model))
    return _LOSS_FNS[key]


def until_eos(row: Sequence[int], eos: int = 1) -> list[int]:
    """The tokens of one decoded row before its first EOS."""
    row = [int(t) for t in row]
    return row[: row.index(eos)] if eos in row else row


class Predictor:
    """Decodes and scores batches (the evaluators' `Predictor` protocol) and captions raw images.

    Attributes:
      model, params, tok: the Flax model, its parameters (possibly sharded) and the tokenizer.
      res: the image side the model expects; `prompt_len`: prompt tokens for `predict_images`.
    """

    def __init__(
        self,
        model: Model,
        params: PyTree,
        tok: tokenizer_lib.Tokenizer,
        *,
        res: int,
        max_decode_len: int = 32,
        sampler: str = "greedy",
        prompt_len: int = 32,
        seed: int = 0,
    ):
        self.model, self.params, self.tok, self.res = model, params, tok, int(res)
        self.max_decode_len, self.sampler, self.prompt_len = int(max_decode_len), sampler, int(prompt_len)
        self._rng = jax.random.PRNGKey(seed)
        self.constrain = ""  # "" or a `constrain.MODES` name: localization outputs that always parse.

    def reseed(self, key: jax.Array) -> None:
        """Restarts the sampling keys from `key` (each `generate` call splits off the next one); the trainer seeds
        each evaluation from (seed, step, evaluator), so a resumed run samples what an uninterrupted one does."""
        self._rng = key

    def generate(
        self, batch: Mapping[str, Any], *, max_decode_len: int | None = None, sampler: str | None = None
    ) -> list[str]:
        """One string per row of `batch` (`image f32[B, R, R, 3]`, `text, mask_ar, mask_input i32[B, L]`, optional
        `_mask bool[B]`: padding rows, False, do not keep the decode loop running)."""
        arrays, back = self._inputs(batch, ("image", "text", "mask_ar", "mask_input", "_mask"))
        self._rng, rng = jax.random.split(self._rng)
        host_rng: Any = np.asarray(rng)  # A host value: the same key on every process, whatever the params' devices.
        tokens = decode_lib.decode(
            self.model,
            self.params,
            arrays,
            rng=host_rng,
            max_decode_len=max_decode_len or self.max_decode_len,
            sampler=sampler or self.sampler,
            constraint=self._grammar(self.constrain),
        )
        return [self.tok.decode(until_eos(row)) for row in back(tokens)]

    @functools.lru_cache(maxsize=8)  # noqa: B019 - a handful of modes per predictor; the vocabulary scan is slow.
    def _grammar(self, mode: str) -> Any:
        if not mode:
            return None
        from paligemma_ft.constrain import LocGrammar  # noqa: PLC0415

        return LocGrammar.from_tokenizer(self.tok, mode)

    def losses(self, batch: Mapping[str, Any]) -> np.ndarray:
        """f32[B]: per-example teacher-forced loss of a training-style batch (`text, mask_ar, mask_loss`)."""
        arrays, back = self._inputs(batch, ("image", "text", "mask_ar", "mask_loss"))
        return back(_loss_fn(self.model)(self.params, arrays))

    def _inputs(self, batch: Mapping[str, Any], keys: Sequence[str]) -> tuple[dict, Any]:
        """`(device arrays of batch[keys], outputs -> this batch's rows as numpy)`.

        With parameters on one process's devices the rows go in as they are. With parameters spanning processes
        (the trainer's evaluations in a multi-process run) every process passes its own rows: they become one
        global batch split over the parameters' mesh, and each process gets its own rows' outputs back.
        """
        if not multihost.spans_processes(self.params):
            return {k: jnp.asarray(batch[k]) for k in keys if k in batch}, np.asarray
        mesh = jax.tree.leaves(self.params)[0].sharding.mesh
        sharding = sharding_lib.batch_sharding(mesh)
        arrays, n = multihost.global_batch({k: batch[k] for k in keys if k in batch}, sharding, what="evaluation")
        return arrays, lambda out: multihost.local_rows(out, sharding, n)

    def prepare_image(self, image: ImageLike) -> np.ndarray:
        """f32[res, res, 3] in [-1, 1] from a path, bytes, PIL image or uint8 array (decode errors raise)."""
        if isinstance(image, (str, os.PathLike)):
            image = images_lib.read_image_file(image)  # Regular files within the size limit only.
        elif hasattr(image, "save") and hasattr(image, "mode"):  # A PIL image.
            image = np.asarray(image.convert("RGB"))
        return transforms.value_range(transforms.resize(transforms.decode_image(image), self.res))

    def prompt_batch(self, images: Sequence[ImageLike], prompt: str) -> dict[str, np.ndarray]:
        """A decoding batch for `images` with one `prompt` (e.g. "caption en", "detect circle")."""
        rows = []
        for image in images:
            example, _ = tokenizer_lib.make_prompt(self.tok, prompt, self.prompt_len)
            rows.append({**example, "image": self.prepare_image(image)})
        return tokenizer_lib.stack(rows)

    def predict_images(self, images: Sequence[ImageLike], prompt: str, **decode_kw: Any) -> list[str]:
        """One decoded string per image."""
        return self.generate(self.prompt_batch(images, prompt), **decode_kw)


def load_predictor(
    checkpoint: str = "builtin:demo",
    tokenizer: str | None = None,
    *,
    preset: str | None = None,
    model_overrides: Mapping[str, Any] | None = None,
    res: int | None = None,
    dtype: str | None = None,
    compute_dtype: str | None = None,
    adapters: str | None = None,
    **kwargs: Any,
) -> Predictor:
    """A `Predictor` for a checkpoint spec (`checkpoints/loading.py`) on the default device, in float32.

    Args:
      checkpoint: `builtin:demo`, a `.npz`, a run's workdir, an HF folder, `hf:<repo>` or `kaggle:<handle>`; or a
        LoRA run's `adapters.npz` alone (its base is the checkpoint it records).
      tokenizer: a tokenizer spec; default: the one found with the checkpoint (`loading.resolve_tokenizer`).
      preset: a model preset; default: the checkpoint's own architecture.
      adapters: a LoRA run's `adapters.npz`, merged into `checkpoint` (which must be the base it was trained on).
      res: image side; default the preset's / the checkpoint's position embeddings'.
      dtype: "float32" or "bfloat16": cast the weights to it on load and compute in it. Default (None): the
        weights stay as stored (a `.bf16.npz` stays bfloat16: decoding reads 2 bytes per weight) and the model
        computes in `compute_dtype`.
      compute_dtype: the compute dtype when `dtype` is not given (a config's `compute_dtype`); None: bfloat16 on
        GPU/TPU, float32 on CPU (`paligemma_ft.model.precision`).
      kwargs: `max_decode_len`, `sampler`, `prompt_len`, `seed` for the Predictor.

    Raises:
      FileNotFoundError / ValueError: a missing file, or a tokenizer that does not fit the model (named).
    """
    loaded = loading.load_model(
        checkpoint,
        tokenizer,
        preset=preset,
        model_overrides=model_overrides,
        res=res,
        dtype=dtype,
        compute_dtype=compute_dtype,
        adapters=adapters,
    )
    return Predictor(loaded.model, loaded.params, loaded.tok, res=loaded.res, **kwargs)
