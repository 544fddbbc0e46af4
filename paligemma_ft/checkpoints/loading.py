"""The one loading path: checkpoint spec + tokenizer -> model + parameters, for train, evaluate, predict, plan, the
app and the notebook alike.

Checkpoint specs (`model_init` in configs, `--checkpoint` on the command line):
  `builtin:NAME`        a model shipped in the package (`builtin:demo`, `paligemma_ft/assets/demo.npz`)
  `kaggle:HANDLE`       a released checkpoint, from the kagglehub cache or downloaded (`checkpoints/kaggle.py`)
  `hf:REPO_ID[@REV]`    a Hugging Face PaliGemma, read offline from the HF cache (`checkpoints/hf_files.py`)
  `DIR`                 a run's workdir (its exported `params.npz`) or a Hugging Face PaliGemma folder
  `FILE.npz[:SUB]`      a big_vision `.npz`; `:img` / `:llm` loads only that tower (the other is initialised)

What happens, in order (big_vision's `load(init_params, init_file, model_cfg, dont_load)`):
1. `model_config`: the architecture from a preset name, else from the checkpoint (a run's own config, an HF
   `config.json`, or the `.npz` shapes read from its headers), then the config's `model` overrides.
2. `resolve_tokenizer`: the configured tokenizer, else one found with the checkpoint (inside a Kaggle bundle, an
   HF folder, the run's config), else the builtin tiny one when the vocabulary is the tiny one's. Same rule for
   every command.
3. `load_params`: every model parameter is planned from names and shapes before any data is read
   (`checkpoints/fit.py`): loaded as stored, fitted by its tower's adapter (position embeddings resampled by the
   ViT, vocabulary resized by Gemma), or initialised when the checkpoint lacks it or `dont_load` names it. The
   initialised ones are named in the log. Loaded leaves go one at a time onto their shardings; the initialised
   ones come from the model's init jitted with `out_shardings`, so parameters are born sharded and new ones
   (adapters, heads) need no change in the trainer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.resources
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from paligemma_ft import tokenizer as tokenizer_lib
from paligemma_ft.checkpoints import fit, npz, placement
from paligemma_ft.checkpoints.kaggle import TOKENIZER_NAMES, TOKENIZER_URL  # Looked for next to a checkpoint.
from paligemma_ft.model import Model, get_preset, infer_config_from_shapes, precision
from paligemma_ft.model.lora import LoraSpec, spec_from_config
from paligemma_ft.model.presets import TINY_VOCAB, resolve_img_config
from paligemma_ft.utils import PyTree, tree_flatten_with_names

_LOG = logging.getLogger(__name__)
BUILTIN_MODELS = ("demo",)


class TokenizerNotFoundError(ValueError):
    """No tokenizer is configured and none sits with the checkpoint."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint spec.

    Attributes:
      spec: as the user wrote it.
      kind: "builtin", "kaggle", "workdir", "npz" or "hf".
      path: what is opened: a `.npz[:subtree]` path, or a Hugging Face folder.
      run_config: a workdir's `config.json` (its tokenizer and model), else None.
    """

    spec: str
    kind: str
    path: str
    run_config: Mapping[str, Any] | None = None

    @property
    def file(self) -> str:
        """The file or folder on disk (without a `:subtree` selector)."""
        return npz.split_selector(self.path)[0] if self.kind != "hf" else self.path

    def __str__(self) -> str:
        return self.spec if self.spec == self.path else f"{self.spec} ({self.path})"


# ------------------------------------------------------------------------------------------------- specs


def _is_hf_folder(path: str) -> bool:
    """Safetensors weights with a config, or any transformers `config.json` (its errors then say what is missing)."""
    from paligemma_ft.checkpoints import hf_files  # noqa: PLC0415 - the HF bridge is imported when used.

    return hf_files.is_hf_folder(path) or "model_type" in (hf_files.read_config(path) or {})


def resolve_checkpoint(spec: str) -> Checkpoint:
    """Resolves a checkpoint spec (module docstring) to local files; nothing is read but small configs.

    Raises:
      FileNotFoundError: the file, builtin model, workdir export or HF cache entry does not exist (named).
    """
    spec = str(spec)
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        path = str(importlib.resources.files("paligemma_ft") / "assets" / f"{name}.npz")
        if name not in BUILTIN_MODELS or not os.path.exists(path):
            raise FileNotFoundError(
                f"checkpoint {spec!r}: no such builtin model (known: "
                f"{', '.join('builtin:' + n for n in BUILTIN_MODELS)}); looked for {path}"
            )
        return Checkpoint(spec, "builtin", path)
    if spec.startswith("kaggle:"):
        from paligemma_ft.checkpoints import kaggle  # noqa: PLC0415 - kagglehub is imported only when needed.

        return Checkpoint(spec, "kaggle", str(kaggle.resolve_model_init(spec)))
    if spec.startswith("hf:"):
        from paligemma_ft.checkpoints import hf_files  # noqa: PLC0415

        return Checkpoint(spec, "hf", str(hf_files.cached_snapshot(spec.removeprefix("hf:"))))
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        export = os.path.join(path, "params.npz")
        if _is_hf_folder(path):  # A run's workdir has a config.json too, but no "model_type" in it.
            return Checkpoint(spec, "hf", path)
        if not os.path.exists(export):
            hint = (
                "; `paligemma-ft convert DIR --step N OUT.npz` exports one of its orbax checkpoints"
                if os.path.isdir(os.path.join(path, "checkpoints"))
                else ""
            )
            raise FileNotFoundError(
                f"checkpoint {spec!r} is a folder without params.npz (a run writes it at the end of training) "
                f"and not a Hugging Face PaliGemma folder (config.json + *.safetensors){hint}"
            )
        return Checkpoint(spec, "workdir", export, _run_config(path))
    if not os.path.exists(npz.split_selector(path)[0]):
        raise FileNotFoundError(f"checkpoint {spec!r}: {npz.split_selector(path)[0]} does not exist")
    return Checkpoint(spec, "npz", path)


def checkpoint_path(spec: str) -> str:
    """The local `.npz[:subtree]` path (or HF folder) that a checkpoint spec names."""
    return resolve_checkpoint(spec).path


def _run_config(workdir: str) -> dict[str, Any] | None:
    """A run's saved `config.json` (see `config.save_config`), or None when absent or unreadable."""
    try:
        with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


@contextlib.contextmanager
def open_checkpoint(checkpoint: Checkpoint) -> Iterator[fit.ParamSource]:
    """The checkpoint as a `ParamSource` (headers read, no data), closed on exit."""
    if checkpoint.kind == "hf":
        from paligemma_ft.checkpoints import hf_import  # noqa: PLC0415

        with hf_import.HFSource(checkpoint.path) as source:
            yield source
    else:
        with npz.NpzReader(checkpoint.path, keep_selector=True) as reader:
            yield reader


# ------------------------------------------------------------------------------------------------- model


def _plain(tree: Any) -> dict:
    if tree is None:
        return {}
    return tree.to_dict() if hasattr(tree, "to_dict") else dict(tree)


def model_config(
    preset: str | None, checkpoint: Checkpoint | None, overrides: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], int | None]:
    """`(model config, resolution)`: a preset, else the checkpoint's own, then `overrides` (the config's `model`).

    A run's workdir brings its own preset and overrides; an HF folder its `config.json`; a `.npz` its shapes
    (from the headers). `overrides` may hold `img`, `llm` (merged per tower) and `model_class` (see
    `build_model`).
    """
    run_overrides: dict[str, Any] = {}
    if checkpoint is not None and checkpoint.run_config and not preset:
        preset = checkpoint.run_config.get("model_name_or_preset") or None
        run_overrides = _plain(checkpoint.run_config.get("model"))
    if preset:
        cfg, res = get_preset(preset)
    elif checkpoint is not None and checkpoint.kind == "hf":
        from paligemma_ft.checkpoints import hf_import  # noqa: PLC0415

        cfg, res = hf_import.model_config_from_folder(checkpoint.path)
    elif checkpoint is not None:
        specs = npz.read_specs(checkpoint.file)  # The whole file's shapes, even for a `:img` selector.
        cfg, res = infer_config_from_shapes({n: s.shape for n, s in specs.items()})
    else:
        raise ValueError(
            "the model is undefined: set config.model_name_or_preset (e.g. 'tiny_pg1') or "
            "config.model_init (a checkpoint whose shapes define the model)"
        )
    out: dict[str, Any] = {tower: dict(cfg.get(tower, {})) for tower in ("img", "llm")}
    for extra in (run_overrides, _plain(overrides)):
        unknown = set(extra) - {"img", "llm", "model_class"}
        if unknown:
            raise ValueError(f"config.model: unknown keys {sorted(unknown)}; expected 'img', 'llm', 'model_class'")
        for tower in ("img", "llm"):
            out[tower].update(_plain(extra.get(tower)))
        if extra.get("model_class"):
            out["model_class"] = extra["model_class"]
    return out, res


def build_model(cfg: Mapping[str, Any], lora: LoraSpec | None = None) -> Model:
    """The Flax model for a config from `model_config`, with LoRA adapters / a quantized base when `lora` is given
    (`model/lora.py`; its adapters are new parameters, initialised by `load_params`).

    `cfg["model_class"]`, when given, is a `"package.module:Name"` import path of a `Model` subclass that takes
    the same `img` / `llm` / `lora` fields (another head, say); its new parameters are initialised by
    `load_params` when the checkpoint lacks them.
    """
    cls: Any = Model
    if path := cfg.get("model_class"):
        module, _, name = str(path).partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as e:
            raise ValueError(
                f"config.model.model_class={path!r} cannot be imported ({e}); use 'package.module:Name'"
            ) from e
        if not (isinstance(cls, type) and issubclass(cls, Model)):
            raise ValueError(f"config.model.model_class={path!r} is not a subclass of paligemma_ft.model.Model")
    return cls(img=cfg.get("img"), llm=cfg.get("llm"), lora=lora)


def init_shapes(model: Model, res: int, text_len: int) -> PyTree:
    """The parameters' `jax.ShapeDtypeStruct`s for images `res x res` and `text_len` tokens (nothing computed)."""
    image, text = jnp.zeros((1, res, res, 3)), jnp.zeros((1, text_len), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), image, text, text)["params"])


def vocab_size(shapes: PyTree) -> int:
    """Rows of the model's embedding table."""
    return int(shapes["llm"]["embedder"]["input_embedding"].shape[0])


# --------------------------------------------------------------------------------------------- tokenizer


def _tokenizer_next_to(checkpoint: Checkpoint) -> str | None:
    """A tokenizer that sits with the checkpoint, by the same rule for every command."""
    if checkpoint.kind == "builtin":
        return "builtin:tiny"
    if checkpoint.run_config is not None:  # A run's workdir: the tokenizer it trained with.
        if configured := checkpoint.run_config.get("tokenizer"):
            return str(configured)
        init = checkpoint.run_config.get("model_init")
        if init and init != checkpoint.spec:
            with contextlib.suppress(Exception):  # Its source may be gone: then the fallback below decides.
                return _tokenizer_next_to(resolve_checkpoint(str(init)))
        return None
    folder = Path(checkpoint.file)
    folder = folder if folder.is_dir() else folder.parent
    if checkpoint.kind == "kaggle":  # A downloaded bundle: anywhere inside it.
        from paligemma_ft.checkpoints import kaggle  # noqa: PLC0415

        found = kaggle.find_tokenizer(folder)
        return str(found) if found else None
    for name in TOKENIZER_NAMES:  # A plain file or an HF folder: only next to it.
        if (folder / name).is_file():
            return str(folder / name)
    return None


def resolve_tokenizer(configured: str | None, checkpoint: Checkpoint | None, model_vocab: int) -> str:
    """The tokenizer spec to use: `configured`, else the one with the checkpoint, else `builtin:tiny` for a model
    of the tiny vocabulary.

    Raises:
      TokenizerNotFoundError: none of these applies; the message says where it looked and what to pass.
    """
    if configured:
        return str(configured)
    found = _tokenizer_next_to(checkpoint) if checkpoint is not None else None
    if found:
        _LOG.info("Using the tokenizer %s found with checkpoint %s.", found, checkpoint)
        return found
    if model_vocab == TINY_VOCAB:
        return "builtin:tiny"
    where = f"checkpoint {checkpoint.spec!r}" if checkpoint is not None else "the model"
    looked = f" and none of {', '.join(TOKENIZER_NAMES)} sits next to {checkpoint.file}" if checkpoint else ""
    raise TokenizerNotFoundError(
        f"{where} needs a tokenizer: none is configured{looked}. Pass --tokenizer PATH (or set config.tokenizer) "
        f"to PaliGemma's paligemma_tokenizer.model (download it from {TOKENIZER_URL}), or builtin:tiny for the "
        "tiny test models."
    )


def load_tokenizer(
    configured: str | None, checkpoint: Checkpoint | None, model_vocab: int, *, source: str
) -> tokenizer_lib.Tokenizer:
    """`resolve_tokenizer`, loaded and checked against the model's vocabulary (`tokenizer.check_vocab`)."""
    tok = tokenizer_lib.Tokenizer.from_spec(resolve_tokenizer(configured, checkpoint, model_vocab))
    tokenizer_lib.check_vocab(tok, model_vocab, source=source)
    return tok


# -------------------------------------------------------------------------------------------- parameters


@dataclasses.dataclass(frozen=True)
class Derived:
    """Model parameters computed on the host from one stored parameter, as it is loaded.

    A QLoRA base is the example: the checkpoint holds `.../w` (float); the model holds `.../w_q` and
    `.../w_qscale` (codes and block scales). Only one stored array is on the host at a time.

    Attributes:
      shape: the stored parameter's shape (what the checkpoint must provide, fitted like any parameter).
      targets: the model parameters it gives, in the order `fn` returns them.
      fn: `stored array -> arrays for targets` (numpy, on the host).
    """

    shape: tuple[int, ...]
    targets: tuple[str, ...]
    fn: Callable[[Any], Sequence[Any]]


def load_params(
    checkpoint: Checkpoint | None,
    abstract: PyTree,
    shardings: PyTree,
    *,
    init_fn: Callable[[], PyTree] | None = None,
    dont_load: Sequence[str] = (),
    allow_missing: bool = True,
    keep_stored_dtype: bool = False,
    rng_seed: int = 0,
    derived: Mapping[str, Derived] | None = None,
    log: logging.Logger = _LOG,
) -> PyTree:
    """Parameters born sharded: what the checkpoint holds is loaded, what it lacks is initialised.

    Args:
      checkpoint: None initialises everything.
      abstract: the model's parameters as `jax.ShapeDtypeStruct`s in their target dtypes (loaded leaves are
        cast to them on the devices).
      shardings: a tree of `jax.sharding.Sharding` like `abstract`.
      init_fn: `() -> params` (the model's init, already cast to the target dtypes); jitted with
        `out_shardings` for the parameters to initialise, so only those are computed.
      dont_load: regexes of model parameters that keep their initial value (and stored ones to ignore).
      allow_missing: initialise what the checkpoint lacks; False refuses (inference).
      keep_stored_dtype: loaded leaves keep the checkpoint's dtype (inference: a bfloat16 file stays bfloat16)
        instead of `abstract`'s.
      rng_seed: seed of new vocabulary rows.
      derived: `{stored name: Derived}`: model parameters computed from a stored one as it is read (see
        `Derived`); the checkpoint is fitted to the stored names, and when it lacks one (or `dont_load` names
        it) its targets are initialised.

    Raises:
      CheckpointMismatchError: every name or shape that cannot be reconciled, before anything is placed.
      CheckpointError: the file cannot be read. ValueError: parameters to initialise but no `init_fn`.
    """
    flat_abstract = dict(tree_flatten_with_names(abstract))
    flat_shard = dict(tree_flatten_with_names(shardings))
    derived = dict(derived or {})
    targets_of = {stored: d.targets for stored, d in derived.items()}
    replaced = {t for d in derived.values() for t in d.targets}
    stored_shapes = {n: tuple(a.shape) for n, a in flat_abstract.items() if n not in replaced}
    stored_shapes.update({stored: tuple(d.shape) for stored, d in derived.items()})
    out: dict[str, Any] = {}

    def place(name: str, array: Any) -> None:
        dtype = None if keep_stored_dtype else flat_abstract[name].dtype
        out[name] = placement.place_leaf(name, array, flat_shard[name], dtype)

    to_init = list(stored_shapes)
    if checkpoint is not None:
        with open_checkpoint(checkpoint) as source:
            plan = fit.plan_fit(
                source, stored_shapes, dont_load=dont_load, allow_missing=allow_missing, rng_seed=rng_seed, log=log
            )
            plan.log(log)
            for name in plan.loaded:
                if name in derived:  # One stored array -> its model parameters; the stored one is dropped.
                    for target, array in zip(derived[name].targets, derived[name].fn(plan.read(name)), strict=True):
                        place(target, array)
                else:
                    place(name, plan.read(name))
            to_init = plan.initialised
            log.info("Loaded %d parameter(s) from %s.", len(plan.loaded), checkpoint)
    to_init = [t for n in to_init for t in targets_of.get(n, (n,))]
    if to_init:
        if init_fn is None:
            raise ValueError(f"{len(to_init)} parameter(s) need initialising but no init function was given.")

        def init_some() -> dict[str, Any]:
            flat = dict(tree_flatten_with_names(init_fn()))
            return {n: flat[n].astype(flat_abstract[n].dtype) for n in to_init}

        out.update(jax.jit(init_some, out_shardings={n: flat_shard[n] for n in to_init})())
    return jax.tree.unflatten(jax.tree.structure(abstract), [out[n] for n in flat_abstract])


# ------------------------------------------------------------------------------------------- entry points


def make_model(config: Any, *, shapes_only: bool = False) -> tuple[Model, int | None, Checkpoint | None]:
    """`(model, resolution, checkpoint)` from `model_name_or_preset`, `model` (overrides), `model_init` and `lora`
    (adapters and a quantized base are part of the model; the checkpoint holds the base).

    Checks that `input.res` is a multiple of the model's patch size. With `shapes_only` and a preset, `model_init`
    is not resolved (no download, no file: `plan` needs only shapes) and the checkpoint is None.
    """
    from paligemma_ft import config_base  # noqa: PLC0415 - config_base imports the data package.

    config = config_base.complete(config)
    init, preset = config.model_init, config.model_name_or_preset
    checkpoint = resolve_checkpoint(init) if init and not (shapes_only and preset) else None
    cfg, res = model_config(preset or None, checkpoint, config.model)
    config_base.check_resolution(int(config.input.res), cfg["img"])
    # float32 | bfloat16; None = bfloat16 on GPU/TPU, float32 on CPU (`paligemma_ft.model.precision`).
    cfg = precision.apply_compute_dtype(cfg, precision.resolve_compute_dtype(config.compute_dtype))
    if checkpoint is not None and checkpoint.kind == "hf":  # big_vision has no sliding window: compare lengths.
        from paligemma_ft.checkpoints import hf_import  # noqa: PLC0415

        patch = resolve_img_config(cfg["img"], llm_width=0)["patch_size"][0]
        n_img = (int(config.input.res) // int(patch)) ** 2
        hf_import.check_sliding_window(checkpoint.path, n_img, int(config.input.text_len), "config.input.text_len")
    return build_model(cfg, spec_from_config(config)), res, checkpoint


@dataclasses.dataclass
class Loaded:
    """A model ready for inference: `model`, `params` (on `sharding`), `tok`, image side `res`, `checkpoint`."""

    model: Model
    params: PyTree
    tok: tokenizer_lib.Tokenizer
    res: int
    checkpoint: Checkpoint


def load_model(
    checkpoint: str,
    tokenizer: str | None = None,
    *,
    preset: str | None = None,
    model_overrides: Mapping[str, Any] | None = None,
    res: int | None = None,
    dtype: str | None = None,
    compute_dtype: str | None = None,
    sharding: jax.sharding.Sharding | None = None,
    adapters: str | os.PathLike | None = None,
) -> Loaded:
    """Model, parameters and tokenizer for inference (predict, evaluate, the app, the notebook).

    Args:
      checkpoint: a checkpoint spec (module docstring), or a LoRA run's `adapters.npz` alone (its base is the
        checkpoint spec it records).
      tokenizer: a tokenizer spec; default: found with the checkpoint (`resolve_tokenizer`).
      preset: a model preset; default: the checkpoint's own architecture.
      res: image side; default the preset's / the checkpoint's position embeddings'.
      dtype: cast the weights to this dtype on load and compute in it (`--dtype`); None keeps each weight as
        stored (a `.bf16.npz` stays bfloat16: decoding reads 2 bytes per weight) and computes in `compute_dtype`.
      compute_dtype: the activations' dtype when `dtype` is None (a config's `compute_dtype`); None = auto:
        bfloat16 on GPU/TPU, float32 on CPU (`paligemma_ft.model.precision`).
      sharding: where the parameters go (default: replicated on the first device).
      adapters: a LoRA run's `adapters.npz`, merged into the loaded base on the devices once its identity is
        checked (`paligemma_ft.adapters.merge_adapters`): inference then runs the plain model. The merged weights
        are float32 (as in the run's merged `params.npz`), or `dtype` when given.

    Raises:
      FileNotFoundError / ValueError: a missing file or tokenizer, a checkpoint that does not fit (named), adapters
        trained on another base.
    """
    if adapters is None and str(checkpoint).endswith(".npz"):
        from paligemma_ft import adapters as adapters_lib  # noqa: PLC0415 - LoRA only.

        if adapters_lib.is_adapters_file(checkpoint):  # Adapters alone: they name their base.
            checkpoint, adapters = adapters_lib.recorded_base(checkpoint), checkpoint
    ckpt = resolve_checkpoint(checkpoint)
    cfg, ckpt_res = model_config(preset, ckpt, model_overrides)
    if dtype is not None:
        compute = precision.resolve_compute_dtype(dtype, key="--dtype")
    else:
        compute = precision.resolve_compute_dtype(compute_dtype)
    model = build_model(precision.apply_compute_dtype(cfg, compute))
    res = int(res or ckpt_res or 224)
    shapes = init_shapes(model, res, 8)
    tok = load_tokenizer(tokenizer, ckpt, vocab_size(shapes), source=ckpt.path)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype or s.dtype), shapes)
    shardings = jax.tree.map(lambda _: sharding, shapes)
    params = load_params(ckpt, abstract, shardings, allow_missing=False, keep_stored_dtype=dtype is None)
    if adapters is not None:
        from paligemma_ft import adapters as adapters_lib  # noqa: PLC0415 - LoRA only.

        params = adapters_lib.merge_adapters(params, os.fspath(adapters), base=str(ckpt), dtype=dtype)
    return Loaded(model, params, tok, res, ckpt)
