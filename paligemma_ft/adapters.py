"""LoRA around the model: training set-up, loading a base with adapters, and the `adapters.npz` file.

* `training_config`: with `config.lora`, only the adapters train (the schedule's rules still set their learning
  rates), so only they carry optimizer state; the frozen base is stored in `config.lora.base_dtype`.
* `load_params`: a checkpoint that holds the base only → the base (quantized on the host when `lora.quant` is
  set), plus adapters initialised by the model's own init (jitted, so XLA computes only the missing leaves).
* `base_identity`: the base's name, shapes and a hash of sampled values (rounded to bfloat16, so a float32 and a
  bfloat16 copy of the same checkpoint agree); recorded in `adapters.npz`, checked when adapters are loaded.
* `save_adapters` / `load_adapters` / `apply_adapters`: the small adapter-only file and merging it into a base.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import ml_dtypes
import numpy as np

from paligemma_ft.checkpoints import npz as ckpt_lib
from paligemma_ft.model import lora as lora_lib
from paligemma_ft.utils import recover_tree, tree_flatten_with_names

PyTree = Any
FORMAT = "paligemma_ft.adapters/1"
_META = "__adapters__"  # The npz member holding the JSON metadata (a 0-d unicode array, no pickle).
_SAMPLES = 1024  # Values sampled per leaf for the base hash.


def _get(config: Any, key: str, default: Any = None) -> Any:
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


def training_config(config: Any, spec: lora_lib.LoraSpec | None) -> Any:
    """`config` as the optimizer and dtype logic should see it under LoRA (a copy; the original is untouched).

    Every schedule rule is restricted to adapter names (`..._lora_a|b`) and a final `(".*", None)` freezes the
    rest, so `trainable_mask`, `make_optimizer` and `param_dtypes` need no LoRA knowledge. `lora.base_dtype`
    becomes `frozen_dtype`.
    """
    if spec is None:  # (spec_from_config refuses quantization without adapters.)
        return config
    plain = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    schedule = plain.get("schedule") or {}
    rules = list(schedule) if isinstance(schedule, (list, tuple)) else [(".*", schedule)]
    only_adapters = rf"(?=.*(?:{lora_lib.ADAPTER_A}|{lora_lib.ADAPTER_B})$)"
    plain["schedule"] = [(only_adapters + f"(?:{pattern})", value) for pattern, value in rules] + [(".*", None)]
    if dt := _get(plain.get("lora") or {}, "base_dtype"):
        plain["frozen_dtype"] = dt
    return ml_collections.ConfigDict(plain)


# --- The base's identity -----------------------------------------------------------------------------------------


def base_identity(flat: Mapping[str, Any], name: str, spec: str = "") -> dict[str, Any]:
    """{"name", "spec", "hash", "shapes"} of a float base {name: host array} (adapters excluded). `name` is the
    file it was read from, `spec` the checkpoint spec that names it (`builtin:demo`, `kaggle:...`, a path)."""
    digest = hashlib.sha256()
    shapes = {}
    for key in sorted(flat):
        if lora_lib.is_adapter(key):
            continue
        a = np.asarray(flat[key])
        shapes[key] = list(a.shape)
        digest.update(f"{key}:{a.shape};".encode())
        if a.size:
            sample = a.reshape(-1)[:: max(1, a.size // _SAMPLES)][:_SAMPLES]
            digest.update(np.asarray(sample, np.float32).astype(ml_dtypes.bfloat16).tobytes())
    return {"name": name, "spec": spec or name, "hash": digest.hexdigest()[:16], "shapes": shapes}


def check_base(identity: Mapping[str, Any], flat_base: Mapping[str, Any], *, adapters: str, base: str) -> None:
    """Raises ValueError naming both files when `flat_base` is not the base the adapters were trained on."""
    mine = base_identity(flat_base, base)
    if identity.get("shapes") != mine["shapes"]:
        diff = sorted(set(map(str, identity.get("shapes", {}).items())) ^ set(map(str, mine["shapes"].items())))
        raise ValueError(
            f"{adapters} was trained on base {identity.get('name')!r} whose parameters differ from {base}'s "
            f"(first differences: {diff[:4]}); load it onto the base it was trained on."
        )
    if identity.get("hash") != mine["hash"]:
        raise ValueError(
            f"{adapters} was trained on base {identity.get('name')!r} (hash {identity.get('hash')}), but {base} has "
            f"the same shapes and different weights (hash {mine['hash']}); load it onto the base it was trained on."
        )


# --- Loading a base and initialising adapters ----------------------------------------------------------------


def load_params(
    path: str,
    model: Any,
    base_model: Any,
    spec: lora_lib.LoraSpec,
    shardings: PyTree,
    dtypes: PyTree,
    init_args: tuple,
    seed: int,
    checkpoint_spec: str = "",
) -> tuple[PyTree, dict[str, Any]]:
    """The checkpoint at `path` (base only) placed on the devices, quantized as `spec` says, with adapters.

    Args:
      model, base_model: the model with `lora=spec` and the same model without it (whose init shapes the
        checkpoint must fit).
      shardings, dtypes: trees for `model`'s parameters.
      init_args: example inputs for `model.init` (image, text, mask_ar).
      checkpoint_spec: how the config names the base (`model_init`), recorded in the identity.

    Returns:
      (params, base identity of the checkpoint's float weights).
    """
    base_shapes = jax.eval_shape(lambda: base_model.init(jax.random.PRNGKey(0), *init_args)["params"])
    host = dict(tree_flatten_with_names(ckpt_lib.load_for_model(path, base_shapes)))
    identity = base_identity(host, path, checkpoint_spec)
    if spec.quant != "none":
        host = lora_lib.quantize_flat(host, spec)
    shard_flat, dtype_flat = dict(tree_flatten_with_names(shardings)), dict(tree_flatten_with_names(dtypes))
    missing = [k for k in shard_flat if k not in host]
    unknown = sorted(set(host) - set(shard_flat))
    if unknown or any(not lora_lib.is_adapter(k) for k in missing):
        raise ValueError(f"{path}: cannot fit the LoRA model (unexpected {unknown[:4]}, missing {missing[:4]}).")

    def init_missing():  # XLA keeps only what these leaves need of the full init.
        p = dict(tree_flatten_with_names(model.init(jax.random.PRNGKey(seed), *init_args)["params"]))
        return {k: p[k].astype(dtype_flat[k]) for k in missing}

    fresh = jax.jit(init_missing, out_shardings={k: shard_flat[k] for k in missing})()
    tree = recover_tree(list(host), list(host.values()))
    del host
    placed = ckpt_lib.place_params(tree, shard_flat.__getitem__, lambda k: np.dtype(dtype_flat[k]))
    both = {**dict(tree_flatten_with_names(placed)), **fresh}
    names = list(shard_flat)
    return recover_tree(names, [both[k] for k in names]), identity


# --- adapters.npz -------------------------------------------------------------------------------------------------


def save_adapters(
    path: str | os.PathLike,
    flat_params: Mapping[str, Any],
    spec: lora_lib.LoraSpec,
    identity: Mapping[str, Any],
    model_config: Mapping[str, Any],
) -> None:
    """Writes the adapters of `flat_params` (host or device arrays) with the metadata needed to use them."""
    adapters = {k: np.asarray(jax.device_get(v), np.float32) for k, v in flat_params.items() if lora_lib.is_adapter(k)}
    meta = {
        "format": FORMAT,
        "rank": spec.rank,
        "alpha": spec.alpha,
        "dropout": spec.dropout,
        "targets": [list(t) for t in spec.targets],
        "quant": spec.quant,
        "base": dict(identity),
        "model": json.loads(json.dumps(model_config, default=list)),
    }
    ckpt_lib.save_params(path, recover_tree(list(adapters), list(adapters.values())))
    with zipfile.ZipFile(path, "a") as zf, zf.open(_META + ".npy", "w") as member:
        np.lib.format.write_array(member, np.array(json.dumps(meta)), allow_pickle=False)


def is_adapters_file(path: str | os.PathLike) -> bool:
    """Whether `path` is an `adapters.npz` (it holds the metadata record)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return _META + ".npy" in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def load_adapters(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(flat adapters, metadata) of an `adapters.npz`. Raises ValueError for a file that is not one."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            if _META not in f.files:
                raise ValueError(
                    f"{path} is not an adapters file (no {_META} record): pass the adapters.npz a LoRA run wrote, "
                    "or use a merged params.npz as the checkpoint instead."
                )
            meta = json.loads(str(f[_META]))
            arrays = {k: f[k] for k in f.files if k != _META}
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"Cannot read adapters file {path}: {e}") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown adapters format {meta.get('format')!r} (expected {FORMAT!r}).")
    return arrays, meta


def apply_adapters(flat_base: Mapping[str, Any], path: str, *, base: str) -> dict[str, Any]:
    """The base {name: array} with the adapters of `path` merged in, after checking the base is theirs."""
    adapters, meta = load_adapters(path)
    check_base(meta["base"], flat_base, adapters=path, base=base)
    for k in adapters:
        if k.rsplit("_lora_", 1)[0] not in flat_base:
            raise ValueError(f"{path}: adapter {k} has no weight {k.rsplit('_lora_', 1)[0]} in {base}.")
    scale = float(meta["alpha"]) / int(meta["rank"])
    return lora_lib.merge({**flat_base, **adapters}, scale, xp=np)


# --- A LoRA run's exports -----------------------------------------------------------------------------------------

IDENTITY_FILE = "base_identity.json"


def write_identity(workdir: str | os.PathLike, identity: Mapping[str, Any]) -> None:
    """Keeps the base's identity in the workdir (a resumed run exports it without re-reading the base)."""
    with open(os.path.join(workdir, IDENTITY_FILE), "w") as f:
        json.dump(dict(identity), f)


def identity_of_params(params: PyTree, model: Any, config: Any) -> dict[str, Any]:
    """The identity of a randomly initialised base (no checkpoint): its dequantized weights, named by preset."""
    flat = dict(tree_flatten_with_names(jax.device_get(params)))
    base = lora_lib.merge(flat, 0.0, model.lora.quant, xp=np)
    return base_identity(base, "preset:" + str(_get(config, "model_name_or_preset", "")))


def export_run(workdir: str | os.PathLike, params: PyTree, model: Any, path: str | None, res: int) -> None:
    """Writes `params.npz` (base + merged adapters, big_vision layout), `adapters.npz` and `peft/` into `workdir`.

    A quantized base is merged from the original checkpoint's weights (`path`), not from its 4/8-bit copy, when
    the run started from a checkpoint.
    """
    spec = model.lora
    flat = dict(tree_flatten_with_names(jax.device_get(params)))
    with open(os.path.join(workdir, IDENTITY_FILE)) as f:
        identity = json.load(f)
    model_config = {"img": dict(model.img or {}), "llm": dict(model.llm or {})}
    save_adapters(os.path.join(workdir, "adapters.npz"), flat, spec, identity, model_config)
    if spec.quant != "none" and path is not None:
        from paligemma_ft.model import Model  # noqa: PLC0415 - avoid a model import at module load.
        from paligemma_ft.predictor import init_shapes  # noqa: PLC0415

        shapes = init_shapes(Model(img=model.img, llm=model.llm), res, 8)
        base = dict(tree_flatten_with_names(ckpt_lib.load_for_model(path, shapes)))
        flat = {**base, **{k: v for k, v in flat.items() if lora_lib.is_adapter(k)}}
    merged = lora_lib.merge(flat, spec.scale, spec.quant, xp=np)
    ckpt_lib.save_params(os.path.join(workdir, "params.npz"), recover_tree(list(merged), list(merged.values())))
    try:
        from paligemma_ft.checkpoints import peft  # noqa: PLC0415 - needs safetensors (the hf extra).

        adapters = {k: v for k, v in flat.items() if lora_lib.is_adapter(k)}
        shapes = {k: np.shape(v) for k, v in merged.items()}
        peft.export_peft(
            adapters, shapes, spec, os.path.join(workdir, "peft"), base_model_name_or_path=identity["name"]
        )
    except ImportError as e:
        print(f"Skipped the PEFT export ({e}); pip install 'paligemma-ft[hf]' to get {workdir}/peft.")
