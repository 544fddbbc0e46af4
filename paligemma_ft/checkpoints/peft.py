"""PEFT export of our LoRA adapters: a folder `peft.PeftModel.from_pretrained` loads onto our Hugging Face export of
the base (`paligemma-ft convert BASE DIR`, `checkpoints/hf_export.py`).

Our adapters map one to one onto PEFT's `lora_A` [r, in] / `lora_B` [out, r] of HF's `nn.Linear` modules, because
model/lora.py gives every independent matrix its own pair (k and v, gate and up) and keeps input and output axes
apart (A [S.., I.., r], B [S.., r, O..]). Which HF tensor, and which of its rows and columns, each of our weight's
entries becomes is not restated here: it is read off the HF export's own rules (`hf_names.Rule.to_hf`) applied to
the entry indices of a small probe weight, so the adapters follow every transpose, head flattening and k/v or
gate/up split the base's export makes. The scale alpha / r is PEFT's `lora_alpha / r`.

Files: `adapter_config.json` (a LoRA config with `target_modules` = the exact HF module names) and
`adapter_model.safetensors` (float32, PEFT's key layout `base_model.model.<module>.lora_A.weight`, modules named
as transformers holds them in memory: `hf_names.MEMORY`, e.g. `model.language_model.layers.0.self_attn.q_proj`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from paligemma_ft.checkpoints import fit, hf_names
from paligemma_ft.checkpoints.npz import ArraySpec
from paligemma_ft.model import lora as lora_lib

_PREFIX = "base_model.model."


def _per_layer(weight: str, shape: tuple[int, ...], a: np.ndarray, b: np.ndarray) -> Iterator[tuple[str, Any, Any]]:
    """(per-layer weight name, A, B) of one adapted weight; a scan-stacked one is sliced along its layer axis
    (the layouts of `fit.LAYOUTS`, as the HF export reads a stacked checkpoint)."""
    for layout in fit.LAYOUTS:
        if m := layout.stacked.fullmatch(weight):
            for i in range(shape[0]):
                yield layout.unstacked_fmt.format(pre=m["pre"], i=i, rest=m["rest"]), a[i], b[i]
            return
    yield weight, a, b


_PROBE_SIZES = (2, 3, 5, 7, 11)  # Distinct sizes, so that the order of axes merged into one HF axis shows.


def _order(axes: list[int], line: tuple[np.ndarray, ...], sizes: list[int], what: str) -> list[int]:
    """Our `axes` that one HF axis enumerates, major first, read from our coordinates `line[k]` along it."""
    first_change = {k: next((j for j in range(1, len(line[k])) if line[k][j] != line[k][0]), 0) for k in axes}
    order = sorted(axes, key=lambda k: -first_change[k])
    expect = np.ravel_multi_index([line[k] for k in order], [sizes[k] for k in order]) if order else [0]
    if len(line[0]) != max(1, math.prod(sizes[k] for k in axes)) or not np.array_equal(expect, np.arange(len(line[0]))):
        raise ValueError(f"{what} does not enumerate our weight's axes {axes} in order; no PEFT module.")
    return order


def _to_modules(rule: hf_names.Rule, shape: tuple[int, ...], a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """PEFT tensors of one per-layer weight `rule.ours` [shape] with adapters A [S.., I.., r], B [S.., r, O..].

    `rule.to_hf` applied to the entry indices of a small probe weight (the same axes, small distinct sizes) tells,
    for each HF tensor [out, in], which of our stack positions it is and in which order its columns enumerate our
    input axes and its rows our output axes; the adapters' rows are then gathered in that order at full size.
    """
    roles = lora_lib.roles_of(rule.ours, len(shape))
    axes = {kind: [i for i, k in enumerate(roles) if k == kind] for kind in "sio"}
    sizes = iter(_PROBE_SIZES)
    probe = [n if k == "s" else next(sizes) for n, k in zip(shape, roles)]
    out = {}
    for hf_name, index in zip(rule.hf, rule.to_hf(np.arange(math.prod(probe)).reshape(probe))):
        if index.ndim != 2:
            raise ValueError(f"{rule.ours}: HF tensor {hf_name} is not a matrix; no PEFT module.")
        coords = np.unravel_index(np.asarray(index), probe)  # Our coordinate on every axis, each [out, in].
        if any((coords[k] != coords[k].flat[0]).any() for k in axes["s"]):
            raise ValueError(f"{rule.ours}: HF tensor {hf_name} mixes our stacked matrices; no PEFT module.")
        stack = tuple(int(coords[k].flat[0]) for k in axes["s"])
        gathered = []
        for kind, line in (("i", tuple(c[0, :] for c in coords)), ("o", tuple(c[:, 0] for c in coords))):
            order = _order(axes[kind], line, probe, f"{rule.ours} -> {hf_name}")
            full = np.unravel_index(np.arange(math.prod(shape[k] for k in order)), [shape[k] for k in order])
            by_axis = dict(zip(order, full))
            gathered.append(tuple(by_axis[k] for k in axes[kind]))  # In our axis order, as A and B hold them.
        cols, rows = gathered
        lora_a = a[stack][cols]  # [in, r]
        lora_b = np.moveaxis(b[stack], 0, -1)[rows]  # [out, r]
        module = hf_names.in_layout(hf_name, hf_names.MEMORY).removesuffix(".weight")
        out[f"{_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(lora_a.T, np.float32)  # [r, in]
        out[f"{_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(lora_b, np.float32)  # [out, r]
    return out


def to_peft(adapters: Mapping[str, Any], base_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """{PEFT key: float32 array} from our flat adapters and the base weights' shapes (every base parameter, names
    without `_lora_*`, scan or per-layer layout as the run had them).

    Raises:
      ValueError: an adapted weight the HF export has no module for.
    """
    specs = {n: ArraySpec(tuple(s), np.dtype(np.float32)) for n, s in base_shapes.items()}
    rules = {r.ours: r for r in hf_names.rules_from_names(list(fit.per_layer(specs)))}
    out: dict[str, np.ndarray] = {}
    for name_a in sorted(k for k in adapters if k.endswith(lora_lib.ADAPTER_A)):
        weight = name_a[: -len(lora_lib.ADAPTER_A)]
        a = np.asarray(adapters[name_a], np.float32)
        b = np.asarray(adapters[weight + lora_lib.ADAPTER_B], np.float32)
        shape = tuple(base_shapes[weight])
        for layer_weight, a_i, b_i in _per_layer(weight, shape, a, b):
            if layer_weight not in rules:
                raise ValueError(f"No Hugging Face module for adapted weight {layer_weight!r}: no PEFT export.")
            layer_shape = shape[1:] if layer_weight != weight else shape
            out.update(_to_modules(rules[layer_weight], layer_shape, a_i, b_i))
    return out


def export_peft(
    adapters: Mapping[str, Any],
    base_shapes: Mapping[str, tuple[int, ...]],
    spec: lora_lib.LoraSpec,
    outdir: str | os.PathLike,
    *,
    base_model: str = "",
) -> str:
    """Writes `adapter_config.json` + `adapter_model.safetensors` to `outdir`; returns it.

    Load with `peft.PeftModel.from_pretrained(hf_model, outdir)`, where `hf_model` is the Hugging Face export of
    the base (`paligemma-ft convert BASE DIR`). `base_model` is recorded as `base_model_name_or_path`. Needs the
    `safetensors` package (the `hf` extra).
    """
    from safetensors.numpy import save_file  # noqa: PLC0415 - optional (the hf extra).

    tensors = to_peft(adapters, base_shapes)
    n = sum(math.prod(t.shape) for t in tensors.values())
    if n != sum(math.prod(np.shape(v)) for v in adapters.values()):
        raise ValueError(
            f"The PEFT tensors hold {n} entries, the adapters {sum(np.size(v) for v in adapters.values())}."
        )
    modules = sorted({k[len(_PREFIX) :].rsplit(".lora_", 1)[0] for k in tensors})
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model or None,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    outdir = os.fspath(outdir)
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(outdir, "adapter_model.safetensors"), metadata={"format": "pt"})
    return outdir
