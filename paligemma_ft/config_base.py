"""The declared config: every key the library reads, with its default and meaning (big_vision's key names).

A config file (`configs/*.py`) sets the keys its experiment needs; `load_config` lays it over `base_config()`:
keys the file sets win, keys it lacks come from here. A key that is declared nowhere fails, in a file as in a
`--config.x=y` override, naming the key and the closest declared ones. So this file is where to look for what a
config can say.

Some groups are open: their keys belong to someone else and are checked there. `model.img` / `model.llm` (the
towers' big_vision keys, checked by `model.presets`), `input.data` (the data source, `data.sources`), `evals`
(evaluator name -> its settings, `evaluate.evaluators`), `optax` (the optimizer's arguments), `schedule` (one
dict or `(regex, dict | None)` rules, `training.optim`) and `wandb` (arguments of `wandb.init`). Overrides may
add keys inside them (`--config.model.llm.remat_policy=full`).

The `input.*` keys are the fields of `data.pipeline.InputConfig` (the typed view the data pipeline uses), so
they are declared once, there.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections

# Dotted paths whose keys are not declared here (see the module docstring).
OPEN_GROUPS = frozenset({"model.img", "model.llm", "input.data", "evals", "optax", "schedule", "wandb"})
LOSS_REDUCTIONS = ("example_mean", "token_mean")  # Scalar reductions of `training.optim.chunked_softmax_xent`.
LORA_QUANT = ("none", "int8", "nf4")


def _input_defaults() -> dict[str, Any]:
    """`input.*`: the fields of `InputConfig` with their defaults (`data` is an open group, empty here)."""
    from paligemma_ft.data.pipeline import InputConfig  # noqa: PLC0415 - the data stack loads only when needed.

    out: dict[str, Any] = {}
    for f in dataclasses.fields(InputConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:  # `data`: required, declared per config (source-specific keys).
            out[f.name] = {}
    return out


def base_config() -> ml_collections.ConfigDict:
    """Every key the library reads, with its default. A fresh, unlocked ConfigDict each call."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # Seeds the random init, dropout and the training RNG.
    c.local_keys = ()  # Top-level keys a config file adds for its own use (e.g. file names its paths follow).

    # --- Model ----------------------------------------------------------------------------------------------
    c.model_name_or_preset = ""  # Architecture (paligemma_ft.model.presets); "" = inferred from model_init's shapes.
    c.model = dict(img={}, llm={})  # Per-tower overrides of the preset, big_vision keys (open groups).
    c.model.model_class = ""  # A `Model` subclass as "package.module:Name" (new heads, test adapters); "" = Model.
    c.model_init = ""  # Weights: builtin:NAME, kaggle:HANDLE, hf:REPO[@REV], an HF folder, a run's workdir, .npz[:sub].
    c.dont_load = ()  # Regexes of parameters initialised instead of loaded from model_init (big_vision's dont_load).
    c.tokenizer = ""  # SentencePiece .model path or builtin:tiny; "" = the Kaggle bundle's, else builtin:tiny.
    c.compute_dtype = None  # Activation dtype; None = auto: bfloat16 on GPU/TPU, float32 on CPU.

    # --- Data -----------------------------------------------------------------------------------------------
    # The folder a config builds its data paths from (configs that read user data require it); None = not set.
    c.data_dir = None
    c.input = _input_defaults()  # Training input pipeline: see data.pipeline.InputConfig for each key.

    # --- Optimization ---------------------------------------------------------------------------------------
    c.total_steps = None  # Training steps (required; 0 only evaluates).
    c.optax_name = "scale_by_adam"  # big_vision.sgd, momentum, adafactor, or any optax.scale_by_* name.
    c.optax = {}  # Arguments of the optimizer, e.g. dict(b2=0.999) (open group).
    c.lr = 1.0  # Peak learning rate (multiplied by the schedule).
    c.lr_mults = None  # Ordered (regex, multiplier > 0) rules scaling the lr of matching parameters; None = none.
    c.wd = 0.0  # Decoupled weight decay (multiplied by the schedule, not the lr).
    c.wd_mults = [(".*/kernel$", 1.0)]  # (regex, multiplier) rules: which parameters decay (Gemma has no kernels).
    c.grad_clip_norm = None  # Clip the global norm of trainable gradients; None = no clipping.
    c.label_smoothing = 0.0  # Fraction of target probability spread over the vocabulary, in [0, 1).
    c.loss_reduction = "example_mean"  # big_vision's per-example mean, or "token_mean" over all loss tokens.
    c.grad_accum_steps = 1  # Micro-batches per step: the same update with 1/n of the activation memory.
    c.schedule = {}  # One schedule dict, or ordered (regex, dict | None) rules; None freezes (open).
    c.schedule_step_offset = 0  # Update count c uses the schedule at c + offset (the colab's: 1).
    c.trainable_dtype = "float32"  # Storage dtype of trained parameters.
    c.frozen_dtype = None  # Storage dtype of frozen parameters; None = the checkpoint's dtype.

    # --- LoRA adapters --------------------------------------------------------------------------------------
    c.lora = dict(
        rank=0,  # Adapter rank r; 0 = no LoRA (the whole config.schedule applies as without this group).
        alpha=None,  # Scale numerator (update = alpha / rank * A B, PEFT's lora_alpha); None = rank (scale 1).
        dropout=0.0,  # Dropout on the adapters' input in training, in [0, 1) (PEFT's lora_dropout).
        # Ordered regexes (or (regex, False) to exclude) over `/`-joined weight names; the first full match decides.
        targets=["llm/layers/attn/.*"],
        base_dtype=None,  # Storage dtype of the frozen base (e.g. "bfloat16"); None = frozen_dtype.
        quant="none",  # Frozen adaptable weights stored as "int8" or "nf4" blocks (QLoRA; needs rank >= 1).
    )

    # --- Devices, processes, compilation --------------------------------------------------------------------
    c.mesh = [("data", -1)]  # (axis name, size) pairs over the devices; one size may be -1 (the rest).
    c.sharding_strategy = [(".*", 'fsdp(axis="data")')]  # Ordered (regex, tactic) rules for parameters.
    c.num_devices = None  # Use only the first n devices (tests, a shared host); None = all.
    c.distributed = dict(
        enabled=None,  # jax.distributed.initialize(): None = when a multi-host environment is detected.
        coordinator_address=None,  # "host:port" of process 0; None = auto-detected.
        num_processes=None,  # Processes in the job; None = auto-detected.
        process_id=None,  # This process's index; None = auto-detected.
        local_device_ids=None,  # Devices this process uses, e.g. [0, 1]; None = all visible.
    )
    c.compilation_cache_dir = ""  # Persistent XLA cache folder (reuses compiled steps across runs); "" = off.

    # --- Checkpoints, evaluation, logging -------------------------------------------------------------------
    c.ckpt_steps = 0  # Resumable checkpoint every n steps (and always at the end); 0 = at the end only.
    c.keep_ckpts = 2  # Checkpoints kept on disk, the latest ones (>= 1).
    c.allow_config_change = False  # Resume a workdir whose saved config differs in keys that keep shapes.
    c.evals = {}  # Evaluator name -> dict(type=..., data=..., batch_size, max_decode_len, ...) (open group).
    c.quiet = False  # No progress bar, overview or summary on the console.
    c.show_predictions = 3  # Predictions per evaluator in the end-of-run console summary.
    c.wandb = {}  # Arguments of wandb.init (project, entity, name, ...); empty = no Weights & Biases.
    return c


# --- Completing and checking a config against the base ---------------------------------------------------------


def _is_open(path: str) -> bool:
    return any(path == g or path.startswith(g + ".") for g in OPEN_GROUPS)


def is_open(path: str) -> bool:
    """Whether `path` (dotted, e.g. "model.llm.dropout") lies in a group whose keys are not declared here."""
    return _is_open(path)


def close_matches(word: str, keys: list[str]) -> str:
    """`did you mean 'a' or 'b'? ` for the declared keys closest to `word` (empty when none is close)."""
    found = difflib.get_close_matches(word, keys, n=3, cutoff=0.5)
    return f"did you mean {' or '.join(repr(k) for k in found)}? " if found else ""


def _fill(node: ml_collections.ConfigDict, base: ml_collections.ConfigDict, path: str, origin: str, local: set):
    for key in list(node.keys()):
        full = f"{path}.{key}" if path else key
        if key not in base and not (not path and key in local):
            keys = sorted(str(k) for k in base.keys())
            raise ValueError(
                f"{origin}: config.{full} is not a declared key. {close_matches(str(key), keys)}"
                f"Declared keys{' in config.' + path if path else ''}: {', '.join(keys)} "
                "(every key and its meaning: paligemma_ft/config_base.py)"
            )
    for key in base.keys():
        full = f"{path}.{key}" if path else key
        default = base[key]
        if key not in node:
            node[key] = default
        elif isinstance(default, ml_collections.ConfigDict) and not _is_open(full):
            value = node[key]
            if not isinstance(value, ml_collections.ConfigDict):
                raise ValueError(
                    f"{origin}: config.{full} must be a group of keys ({', '.join(sorted(default.keys()))}), "
                    f"got {value!r}"
                )
            _fill(value, default, full, origin, local)


def complete(
    config: ml_collections.ConfigDict | Mapping[str, Any], origin: str = "the config"
) -> ml_collections.ConfigDict:
    """`config` with every declared key: a ConfigDict is completed in place (references kept), a dict is copied.

    Args:
      config: a config as a file or code builds it (any subset of the declared keys).
      origin: what to name in errors (a config file's path).

    Raises:
      ValueError: a key that is not declared (naming it, `origin` and the closest declared keys), or a value
        where a group of keys is declared.
    """
    if not isinstance(config, ml_collections.ConfigDict):
        config = ml_collections.ConfigDict(dict(config))
    with config.unlocked():
        _fill(config, base_config(), "", origin, {"local_keys", *(config.get("local_keys") or ())})
    return config


# --- Validation before compute ---------------------------------------------------------------------------------


def _problems(config: ml_collections.ConfigDict, training: bool) -> Iterator[str]:
    def num(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    total = config.total_steps
    if total is None:
        if training:
            yield "config.total_steps is not set: pass --config.total_steps=N"
    elif not isinstance(total, int) or isinstance(total, bool) or total < 0:
        yield f"config.total_steps={total!r}: must be an integer >= 0"
    accum = config.grad_accum_steps
    if not isinstance(accum, int) or isinstance(accum, bool) or accum < 1:
        yield f"config.grad_accum_steps={accum!r}: must be an integer >= 1"
    ls = config.label_smoothing
    if not num(ls) or not 0.0 <= ls < 1.0:
        yield f"config.label_smoothing={ls!r}: must be in [0, 1)"
    if not num(config.wd) or not config.wd >= 0:
        yield f"config.wd={config.wd!r}: must be >= 0"
    keep = config.keep_ckpts
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        yield f"config.keep_ckpts={keep!r}: must be an integer >= 1 (0 would delete every checkpoint)"
    if config.loss_reduction not in LOSS_REDUCTIONS:
        yield f"config.loss_reduction={config.loss_reduction!r}: must be one of {', '.join(LOSS_REDUCTIONS)}"
    yield from _lora_problems(config.lora)
    for name, ecfg in (config.evals or {}).items():
        if not hasattr(ecfg, "get"):
            yield f"config.evals.{name} must be a dict of evaluator settings, got {ecfg!r}"
            continue
        for key in ("batch_size", "max_decode_len"):
            value = ecfg.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                yield f"config.evals.{name}.{key}={value!r}: must be an integer >= 1"


def _lora_problems(lora: ml_collections.ConfigDict) -> Iterator[str]:
    rank = lora.rank
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        yield f"config.lora.rank={rank!r}: must be an integer >= 0 (0 = no adapters)"
        return
    if lora.quant not in LORA_QUANT:
        yield f"config.lora.quant={lora.quant!r}: must be one of {', '.join(LORA_QUANT)}"
    elif lora.quant != "none" and not rank:
        yield f"config.lora.quant={lora.quant!r} needs config.lora.rank >= 1 (QLoRA trains adapters on the base)"
    if not rank:
        return
    if not isinstance(lora.dropout, (int, float)) or not 0.0 <= lora.dropout < 1.0:
        yield f"config.lora.dropout={lora.dropout!r}: must be in [0, 1)"
    if lora.alpha is not None and (not isinstance(lora.alpha, (int, float)) or lora.alpha <= 0):
        yield f"config.lora.alpha={lora.alpha!r}: must be > 0, or None (= rank)"
    from paligemma_ft.model import lora as lora_lib  # noqa: PLC0415 - the model stack loads only when needed.

    try:
        if not lora_lib.parse_targets(lora.targets):
            yield "config.lora.targets is empty: name the weights to adapt, e.g. ['llm/layers/.*']"
        lora_lib.LoraSpec(rank=rank, targets=lora_lib.parse_targets(lora.targets))  # Compiles the regexes.
    except ValueError as e:
        yield str(e)


def validate(config: ml_collections.ConfigDict | Mapping[str, Any], *, training: bool = True) -> None:
    """Checks the values that are wrong whatever the data and model (train, plan and evaluate call it first).

    `training=False` (evaluate) does not require `total_steps`.

    Raises:
      ValueError: every problem found, each naming its key, e.g. `config.grad_accum_steps=0: must be >= 1`.
    """
    problems = list(_problems(complete(config), training))
    if problems:
        raise ValueError("; ".join(problems))


def check_resolution(res: int, img: Mapping[str, Any] | None) -> None:
    """`input.res` must be a multiple of the ViT's patch size (else patches would silently drop pixels).

    Args:
      res: the image side the data pipeline produces (`input.res`).
      img: the model's resolved `img` config (preset or checkpoint shapes, with `model.img` overrides).

    Raises:
      ValueError: naming `config.input.res`, the patch size and the nearest valid sides.
    """
    from paligemma_ft.model import presets  # noqa: PLC0415 - the model stack loads only when needed.

    patch = presets.resolve_img_config(img, llm_width=1).get("patch_size", (16, 16))  # ViT's default patch.
    ph, pw = (int(p) for p in patch)
    if res % ph or res % pw:
        lower, upper = res // ph * ph, (res // ph + 1) * ph
        raise ValueError(
            f"config.input.res={res}: must be a multiple of the model's patch size {ph}x{pw} "
            f"(e.g. {lower or upper} or {upper})"
        )


_PATH_KEYS = ("path", "annotations", "image_dir")  # Data keys configs build from `data_dir`.


def check_data_paths(config: ml_collections.ConfigDict, *, train: bool = True, evals: bool = True) -> None:
    """Before data is read: a path built from an unset `data_dir` (a placeholder) is None, or names no file.

    Raises:
      ValueError: `config.data_dir is not set: pass --config.data_dir=DIR ...`, or the data key that is None.
      FileNotFoundError: a local data path that does not exist, named with its key (before any model is loaded).
    """
    groups = [("input.data", config.input.data)] if train else []
    if evals:
        groups += [(f"evals.{n}.data", e.get("data")) for n, e in (config.evals or {}).items() if hasattr(e, "get")]
    for where, data in groups:
        if not hasattr(data, "get"):
            continue
        for key in _PATH_KEYS:
            if key in data and data.get(key) is None:
                if config.data_dir is None:
                    raise ValueError(
                        "config.data_dir is not set: pass --config.data_dir=DIR (the config file's docstring shows "
                        f"the folder layout it expects; config.{where}.{key} is built from it)"
                    )
                raise ValueError(f"config.{where}.{key} is not set")
            value = data.get(key)
            if isinstance(value, str) and "://" not in value and not os.path.exists(os.path.expanduser(value)):
                hint = f" (built from config.data_dir={config.data_dir})" if config.data_dir else ""
                raise FileNotFoundError(f"config.{where}.{key}: {value} does not exist{hint}")
