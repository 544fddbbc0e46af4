"""A model, its parameters and its tokenizer, ready to caption images: what `predict`, `evaluate`, the app, the
notebook and the trainer's evaluations share.

    from paligemma_ft.predictor import load_predictor
    p = load_predictor("builtin:demo")                # or a .npz, a run's workdir, kaggle:<handle>
    p.predict_images(["a.jpg"], "caption en")          # -> ["a red circle and a blue square"]

Checkpoint specs (`model_init` in configs):
  `builtin:NAME`     a model shipped in the package (`builtin:demo`, `paligemma_ft/assets/demo.npz`)
  `kaggle:HANDLE`    a released checkpoint, fetched with kagglehub or read from its cache
                     (`paligemma_ft.checkpoints.kaggle`)
  `DIR`              another run's workdir: its exported `DIR/params.npz`
  `FILE.npz[:sub]`   a big_vision `.npz`, optionally one subtree (`:img`, `:llm`)
The architecture comes from a preset name when given, otherwise it is inferred from the parameter shapes.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paligemma_ft import decode as decode_lib
from paligemma_ft import tokenizer as tokenizer_lib
from paligemma_ft.checkpoints import npz as ckpt_lib
from paligemma_ft.data import transforms
from paligemma_ft.model import Model, get_preset, infer_config_from_shapes, precision

PyTree = Any
ImageLike = Any  # A path, encoded bytes, a PIL image or a uint8[H, W, 3] array.
BUILTIN_MODELS = ("demo",)


def resolve_checkpoint(spec: str) -> str:
    """The local `.npz` path (with an optional `:subtree` selector) that a checkpoint spec names.

    Raises:
      FileNotFoundError: the file, builtin model or workdir export does not exist (the message names it).
    """
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        path = str(importlib.resources.files("paligemma_ft") / "assets" / f"{name}.npz")
        if name not in BUILTIN_MODELS or not os.path.exists(path):
            raise FileNotFoundError(
                f"checkpoint {spec!r}: no such builtin model (known: "
                f"{', '.join('builtin:' + n for n in BUILTIN_MODELS)}); looked for {path}"
            )
        return path
    if spec.startswith("kaggle:"):
        from paligemma_ft.checkpoints import kaggle  # noqa: PLC0415 - kagglehub is imported only when needed.

        return str(kaggle.resolve_model_init(spec))
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        export = os.path.join(path, "params.npz")
        if not os.path.exists(export):
            raise FileNotFoundError(
                f"checkpoint {spec!r} is a folder without params.npz; a run writes it at the "
                "end of training (its orbax checkpoints in checkpoints/ are resumed by "
                "`paligemma-ft train`, not read here)"
            )
        return export
    if not os.path.exists(ckpt_lib.split_selector(path)[0]):
        raise FileNotFoundError(f"checkpoint {spec!r}: {ckpt_lib.split_selector(path)[0]} does not exist")
    return path


def _plain(tree: Any) -> dict:
    if tree is None:
        return {}
    return tree.to_dict() if hasattr(tree, "to_dict") else dict(tree)


def model_config(
    preset: str | None, path: str | None, overrides: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], int | None]:
    """`(Model kwargs, resolution)` from a preset name, else the checkpoint's shapes; `overrides` per tower."""
    if preset:
        cfg, res = get_preset(preset)
    elif path is not None:
        cfg, res = infer_config_from_shapes(ckpt_lib.names_and_shapes(ckpt_lib.load_params(path)))
    else:
        raise ValueError(
            "the model is undefined: set config.model_name_or_preset (e.g. 'tiny_pg1') or "
            "config.model_init (a checkpoint whose shapes define the model)"
        )
    extra = _plain(overrides)
    unknown = set(extra) - {"img", "llm"}
    if unknown:
        raise ValueError(f"config.model: unknown keys {sorted(unknown)}; expected 'img' and/or 'llm'")
    cfg = {tower: {**cfg.get(tower, {}), **_plain(extra.get(tower))} for tower in ("img", "llm")}
    return cfg, res


def init_shapes(model: Model, res: int, text_len: int) -> PyTree:
    """The parameters' `jax.ShapeDtypeStruct`s for images `res x res` and `text_len` tokens (nothing computed)."""
    image, text = jnp.zeros((1, res, res, 3)), jnp.zeros((1, text_len), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), image, text, text)["params"])


def _per_example_loss(model: Model, params: PyTree, batch: dict) -> jax.Array:
    """f32[B]: mean next-token loss over `mask_loss[:, 1:]` positions of each row."""
    text = batch["text"]
    pre_logits, _ = model.apply(
        {"params": params}, batch["image"], text[:, :-1], batch["mask_ar"][:, :-1], method=model.prelogits
    )
    logits = model.apply({"params": params}, pre_logits, method=model.compute_logits)
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


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


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

    def generate(
        self, batch: Mapping[str, Any], *, max_decode_len: int | None = None, sampler: str | None = None
    ) -> list[str]:
        """One string per row of `batch` (`image f32[B, R, R, 3]`, `text, mask_ar, mask_input i32[B, L]`, optional
        `_mask bool[B]`: padding rows, False, do not keep the decode loop running)."""
        keys = ("image", "text", "mask_ar", "mask_input", "_mask")
        arrays = {k: jnp.asarray(batch[k]) for k in keys if k in batch}
        self._rng, rng = jax.random.split(self._rng)
        tokens = decode_lib.decode(
            self.model,
            self.params,
            arrays,
            rng=rng,
            max_decode_len=max_decode_len or self.max_decode_len,
            sampler=sampler or self.sampler,
        )
        return [self.tok.decode(until_eos(row)) for row in np.asarray(tokens)]

    def losses(self, batch: Mapping[str, Any]) -> np.ndarray:
        """f32[B]: per-example teacher-forced loss of a training-style batch (`text, mask_ar, mask_loss`)."""
        arrays = {k: jnp.asarray(batch[k]) for k in ("image", "text", "mask_ar", "mask_loss")}
        return np.asarray(_loss_fn(self.model)(self.params, arrays))

    def prepare_image(self, image: ImageLike) -> np.ndarray:
        """f32[res, res, 3] in [-1, 1] from a path, bytes, PIL image or uint8 array (decode errors raise)."""
        if isinstance(image, (str, os.PathLike)):
            with open(image, "rb") as f:
                image = f.read()
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
    **kwargs: Any,
) -> Predictor:
    """A `Predictor` for a checkpoint spec (see the module docstring) on the default device.

    Args:
      checkpoint: `builtin:demo`, a `.npz`, a run's workdir or `kaggle:<handle>`.
      tokenizer: a tokenizer spec; default `builtin:tiny` for builtin models, otherwise required.
      preset: a model preset; default: inferred from the checkpoint's shapes.
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
    path = resolve_checkpoint(checkpoint)
    if tokenizer is None:
        if not checkpoint.startswith("builtin:"):
            raise ValueError(
                f"checkpoint {checkpoint!r} needs a tokenizer: pass a SentencePiece .model path "
                "(paligemma_tokenizer.model) or builtin:tiny"
            )
        tokenizer = "builtin:tiny"
    tok = tokenizer_lib.Tokenizer.from_spec(tokenizer)
    if dtype is not None:
        compute = precision.resolve_compute_dtype(dtype, key="--dtype")
    else:
        compute = precision.resolve_compute_dtype(compute_dtype)
    cfg, ckpt_res = model_config(preset, path, model_overrides)
    model = Model(**precision.apply_compute_dtype(cfg, compute))
    res = int(res or ckpt_res or 224)
    shapes = init_shapes(model, res, 8)
    tokenizer_lib.check_vocab(tok, shapes["llm"]["embedder"]["input_embedding"].shape[0], source=path)
    params = ckpt_lib.load_for_model(path, shapes)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype if dtype and _is_float(x) else None), params)
    return Predictor(model, params, tok, res=res, **kwargs)
