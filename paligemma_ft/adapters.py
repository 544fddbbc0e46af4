"""LoRA around the model: the trainer's view of a LoRA config, the base's identity, `adapters.npz`, and a LoRA
run's exports. The adapters themselves live in the model (`model/lora.py`).

* `training_config`: with `config.lora`, only the adapters train (the schedule's rules still set their learning
  rates), so only they carry optimizer state; the frozen base is stored in `config.lora.base_dtype`.
* `quantize_on_load`: the loader's hook (`loading.Derived`) that turns each float base weight of a QLoRA model
  into its codes and block scales as it is read, one weight at a time.
* `base_identity`: the base's name, shapes and a hash of sampled values (rounded to bfloat16, so a float32 and a
  bfloat16 copy of the same checkpoint agree); recorded in `adapters.npz`, checked when adapters are merged.
* `save_adapters` / `load_adapters` / `merge_adapters`: the small adapter-only file, and merging it into a base
  that `loading.load_model` placed on the devices.
* `export_run`: a LoRA run's end: `params.npz` (adapters merged, big_vision's layout), `adapters.npz`, `peft/`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np

from paligemma_ft.checkpoints import fit, loading
from paligemma_ft.checkpoints import npz as ckpt_lib
from paligemma_ft.model import lora as lora_lib
from paligemma_ft.utils import recover_tree, tree_flatten_with_names

PyTree = Any
FORMAT = "paligemma_ft.adapters/1"
_META = "__adapters__"  # The npz member holding the metadata: UTF-8 JSON bytes as a uint8 array (no pickle).
_SAMPLES = 1024  # Values sampled per leaf for the base hash.


def training_config(config: ml_collections.ConfigDict, spec: lora_lib.LoraSpec | None) -> ml_collections.ConfigDict:
    """`config` as the optimizer and dtype logic should see it under LoRA (a copy; the original is untouched).

    Every schedule rule is restricted to adapter names (`..._lora_a|b`) and a final `(".*", None)` freezes the
    rest, so `trainable_mask`, `make_optimizer` and `param_dtypes` need no LoRA knowledge. `lora.base_dtype`
    (when set) becomes `frozen_dtype`.
    """
    if spec is None:
        return config
    plain = config.to_dict()
    schedule = plain["schedule"]
    rules = list(schedule) if isinstance(schedule, (list, tuple)) else [(".*", schedule)]
    only_adapters = rf"(?=.*(?:{lora_lib.ADAPTER_A}|{lora_lib.ADAPTER_B})$)"
    plain["schedule"] = [(only_adapters + f"(?:{pattern})", value) for pattern, value in rules] + [(".*", None)]
    if config.lora.base_dtype:
        plain["frozen_dtype"] = config.lora.base_dtype
    return ml_collections.ConfigDict(plain)


def quantize_on_load(shapes: Mapping[str, Any], spec: lora_lib.LoraSpec) -> dict[str, loading.Derived]:
    """`loading.load_params`' `derived` for a QLoRA model with parameter `shapes` ({name: shape or struct}): each
    quantized weight `W` is read from the checkpoint as float `W` and placed as `W_q` + `W_qscale`."""
    if spec.quant == "none":
        return {}
    plain = {k: tuple(np.shape(v)) for k, v in shapes.items()}
    return {
        name: loading.Derived(
            shape, (codes, scales), functools.partial(lora_lib.quantize_weight, name, mode=spec.quant)
        )
        for name, (shape, codes, scales) in lora_lib.quantized_weights(plain, spec.quant).items()
    }


# --- The base's identity -----------------------------------------------------------------------------------------


def _leaf_digest(name: str, a: Any) -> bytes:
    """sha256 of a leaf's name, shape and up to `_SAMPLES` evenly strided values (sampled where the array lives, so
    a device array sends only the sample to the host)."""
    digest = hashlib.sha256(f"{name}:{tuple(a.shape)};".encode())
    if a.size:
        sample = a.reshape(-1)[:: max(1, a.size // _SAMPLES)][:_SAMPLES]
        digest.update(np.asarray(sample, np.float32).astype(ml_dtypes.bfloat16).tobytes())
    return digest.digest()


def _identity(digests: Mapping[str, bytes], shapes: Mapping[str, Any], name: str, spec: str) -> dict[str, Any]:
    total = hashlib.sha256(b"".join(digests[k] for k in sorted(digests)))
    return {
        "name": name,
        "spec": spec or name,
        "hash": total.hexdigest()[:16],
        "shapes": {k: list(shapes[k]) for k in sorted(shapes)},
    }


def base_identity(flat: Mapping[str, Any], name: str, spec: str = "") -> dict[str, Any]:
    """{"name", "spec", "hash", "shapes"} of a float base {name: host or device array} (adapters excluded).

    `name` is the file it was read from, `spec` the checkpoint spec that names it (`builtin:demo`, a path).
    """
    base = {k: v for k, v in flat.items() if not lora_lib.is_adapter(k)}
    digests = {k: _leaf_digest(k, v) for k, v in base.items()}
    return _identity(digests, {k: v.shape for k, v in base.items()}, name, spec)


def check_base(identity: Mapping[str, Any], flat_base: Mapping[str, Any], *, adapters: str, base: str) -> None:
    """Raises ValueError naming both files when `flat_base` is not the base the adapters were trained on."""
    mine = base_identity(flat_base, base)
    if identity.get("shapes") != mine["shapes"]:
        diff = sorted(set(map(str, identity.get("shapes", {}).items())) ^ set(map(str, mine["shapes"].items())))
        raise ValueError(
            f"{adapters} was trained on base {identity.get('spec')!r} whose parameters differ from {base}'s "
            f"(first differences: {diff[:4]}); load it onto the base it was trained on (at the resolution it was "
            "trained at: another --res resamples img/pos_embedding)."
        )
    if identity.get("hash") != mine["hash"]:
        raise ValueError(
            f"{adapters} was trained on base {identity.get('spec')!r} (hash {identity.get('hash')}), but {base} has "
            f"the same shapes and different weights (hash {mine['hash']}); load it onto the base it was trained on."
        )


# --- adapters.npz -------------------------------------------------------------------------------------------------


def save_adapters(
    path: str | os.PathLike,
    flat_params: Mapping[str, Any],
    spec: lora_lib.LoraSpec,
    identity: Mapping[str, Any],
    model_config: Mapping[str, Any],
) -> None:
    """Writes the adapters of `flat_params` (host arrays) in float32 with the metadata needed to use them."""
    adapters = {k: np.asarray(v, np.float32) for k, v in flat_params.items() if lora_lib.is_adapter(k)}
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
    with ckpt_lib.NpzWriter(path) as writer:  # Atomic: the file appears complete or not at all.
        for name in sorted(adapters):
            writer.write(name, adapters[name])
        writer.write(_META, np.frombuffer(json.dumps(meta).encode(), np.uint8))


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
            meta = json.loads(f[_META].tobytes().decode())
            arrays = {k: f[k] for k in f.files if k != _META}
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"Cannot read adapters file {path}: {e}") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown adapters format {meta.get('format')!r} (expected {FORMAT!r}).")
    return arrays, meta


def recorded_base(path: str | os.PathLike) -> str:
    """The checkpoint spec of the base an `adapters.npz` was trained on (as the run's config named it)."""
    return str(load_adapters(path)[1]["base"]["spec"])


def merge_adapters(params: PyTree, path: str, *, base: str, dtype: Any = None) -> PyTree:
    """`params` (the base, on the devices) with the adapters of `path` merged in: W + alpha / r · A·B computed in
    float32 where W lives and kept in float32 (a 16-bit W would round a small update away; the run's merged
    `params.npz` holds the same), or cast to `dtype` when given. The base's identity is checked first.

    Raises:
      ValueError: `path` is not an adapters file, or was trained on another base (both named).
    """
    adapters, meta = load_adapters(path)
    flat = dict(tree_flatten_with_names(params))
    check_base(meta["base"], flat, adapters=path, base=base)
    scale = float(meta["alpha"]) / int(meta["rank"])
    for name_a in [k for k in adapters if k.endswith(lora_lib.ADAPTER_A)]:
        weight = name_a[: -len(lora_lib.ADAPTER_A)]
        if weight not in flat:
            raise ValueError(f"{path}: adapter {name_a} has no weight {weight} in {base}.")
        w = flat[weight]
        a, b = jnp.asarray(adapters[name_a]), jnp.asarray(adapters[weight + lora_lib.ADAPTER_B])
        delta = lora_lib.merged_delta(a, b, lora_lib.roles_of(weight, w.ndim), scale)
        flat[weight] = (w.astype(jnp.float32) + delta).astype(dtype or jnp.float32)
    return recover_tree(list(flat), list(flat.values()))


# --- A LoRA run's exports -----------------------------------------------------------------------------------------


def _holds(dtype: Any, stored: Any) -> bool:
    """Whether `dtype` holds every value of `stored` exactly (float16 in float32: yes; float32 in bfloat16: no)."""
    if np.dtype(dtype) == np.dtype(stored):
        return True
    try:
        have, need = ml_dtypes.finfo(dtype), ml_dtypes.finfo(stored)
    except ValueError:  # Not both floats.
        return False
    return have.nmant >= need.nmant and have.maxexp >= need.maxexp and have.minexp <= need.minexp


def _merged_base(
    flat: Mapping[str, np.ndarray],
    spec: lora_lib.LoraSpec,
    checkpoint: loading.Checkpoint | None,
    dont_load: tuple[str, ...],
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(name, base, merged) per base parameter, one at a time, in the tree's order.

    Where the run stored a loaded weight lossily (quantized, or cast to a narrower `base_dtype` than the stored
    one), the base is the checkpoint's original, read again (fitted as at the start); a quantized weight the run
    initialised is its dequantized codes; every other base leaf is the run's own (bitwise the loaded one).
    """
    quantized = lora_lib.quantized_weights({k: np.shape(v) for k, v in flat.items()}, spec.quant)
    names = [k for k in flat if not lora_lib.is_adapter(k) and not k.endswith((lora_lib.CODES, lora_lib.SCALE))]
    names = sorted([*names, *quantized], key=lambda n: n.split("/"))  # The order of the base model's tree.
    with contextlib.ExitStack() as stack:
        reread: set[str] = set()
        if checkpoint is not None:
            source = stack.enter_context(loading.open_checkpoint(checkpoint))
            shapes = {n: quantized[n][0] if n in quantized else tuple(np.shape(flat[n])) for n in names}
            plan = fit.plan_fit(source, shapes, dont_load=dont_load, allow_missing=True)  # As the run's start.
            stored = plan.source.specs()
            reread = {n for n in plan.loaded if n in quantized or not _holds(flat[n].dtype, stored[n].dtype)}
        for name in names:
            if name in reread:
                w = plan.read(name)
            elif name in quantized:  # Initialised in the run, not loaded: its codes are all there is.
                _, codes, scales = quantized[name]
                w = lora_lib.dequantize_weight(name, flat[codes], flat[scales], spec.quant)
            else:
                w = flat[name]
            merged = w
            if name + lora_lib.ADAPTER_A in flat:  # float32: a bfloat16 W would round a small update away.
                a, b = flat[name + lora_lib.ADAPTER_A], flat[name + lora_lib.ADAPTER_B]
                delta = lora_lib.merged_delta(a, b, lora_lib.roles_of(name, np.ndim(w)), spec.scale, xp=np)
                merged = np.asarray(w, np.float32) + np.asarray(delta, np.float32)
            yield name, w, merged


def export_run(
    workdir: str | os.PathLike,
    params: PyTree,
    model: Any,
    checkpoint: loading.Checkpoint | None,
    *,
    preset: str = "",
    dont_load: tuple[str, ...] = (),
) -> list[str]:
    """Writes `params.npz` (base + merged adapters, big_vision's layout), `adapters.npz` and `peft/` into
    `workdir`; returns what was written.

    Args:
      params: the run's final parameters on the host (`multihost.to_host`): base, adapters, quantized codes.
      model: the run's `Model` (its `lora` spec).
      checkpoint: the base the run loaded (`model_init`), None for a random init (then named `preset:NAME`).
      dont_load: the run's `config.dont_load` (weights it initialised instead of loading).

    The host holds `params` and one merged parameter at a time: `params.npz` is streamed, and a base the run held
    quantized or in a narrower dtype is merged from the checkpoint's original weights (read again one at a time),
    not from the run's 4/8-bit or bfloat16 copy.
    """
    spec = model.lora
    flat = dict(tree_flatten_with_names(params))
    digests, shapes = {}, {}
    params_path = os.path.join(workdir, "params.npz")
    with ckpt_lib.NpzWriter(params_path) as writer:
        for name, base, merged in _merged_base(flat, spec, checkpoint, dont_load):
            digests[name], shapes[name] = _leaf_digest(name, base), np.shape(base)
            writer.write(name, merged)
    if checkpoint is not None:
        identity = _identity(digests, shapes, checkpoint.path, checkpoint.spec)
    else:
        identity = _identity(digests, shapes, "preset:" + preset, "")
    model_config = {"img": dict(model.img or {}), "llm": dict(model.llm or {})}
    save_adapters(os.path.join(workdir, "adapters.npz"), flat, spec, identity, model_config)
    written = [params_path, os.path.join(workdir, "adapters.npz")]
    try:
        from paligemma_ft.checkpoints import peft  # noqa: PLC0415 - needs safetensors (the hf extra).

        adapters = {k: v for k, v in flat.items() if lora_lib.is_adapter(k)}
        out = peft.export_peft(adapters, shapes, spec, os.path.join(workdir, "peft"), base_model=identity["spec"])
        written.append(out)
    except (ImportError, ValueError) as e:  # The merged file and adapters.npz are written: say what is missing.
        print(f"Skipped the PEFT export ({e}); {workdir}/params.npz and adapters.npz are complete.")
    return written
