"""PEFT export of our LoRA adapters: a folder `peft.PeftModel.from_pretrained` loads onto our HF export of the base.

Our adapters map one to one onto PEFT's `lora_A` [r, in] / `lora_B` [out, r] of HF's `nn.Linear` modules, because
model/lora.py gives every independent matrix its own pair (k and v, gate and up) and keeps input and output axes
apart: A [S.., I.., r] flattens its input axes the way HF flattens the weight (heads major, as `hf.py`'s
`_heads_in` and `o_proj`), B [S.., r, O..] likewise. The scale alpha / r is PEFT's `lora_alpha / r`.

Files: `adapter_config.json` (a LoRA config with `target_modules` = the exact HF module names) and
`adapter_model.safetensors` (float32, PEFT's key layout `base_model.model.<module>.lora_A.weight`). Module names
are transformers 5.x's in-memory names, the ones `hf.to_hf_state_dict` writes (`model.language_model.layers.{i}.
self_attn.q_proj`, `model.vision_tower.encoder.layers.{i}.mlp.fc1`, `model.multi_modal_projector.linear`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from paligemma_ft.model import lora as lora_lib

_PREFIX = "base_model.model."
# Our weight (end of the name, without layer) -> HF module per stack index, under the layer's HF prefix.
_LLM = {
    "attn/q_einsum/w": ["self_attn.q_proj"],
    "attn/kv_einsum/w": ["self_attn.k_proj", "self_attn.v_proj"],
    "attn/qkv_einsum/w": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "attn/attn_vec_einsum/w": ["self_attn.o_proj"],
    "mlp/gating_einsum": ["mlp.gate_proj", "mlp.up_proj"],
    "mlp/linear": ["mlp.down_proj"],
}
_VIT = {
    "MultiHeadDotProductAttention_0/query/kernel": ["self_attn.q_proj"],
    "MultiHeadDotProductAttention_0/key/kernel": ["self_attn.k_proj"],
    "MultiHeadDotProductAttention_0/value/kernel": ["self_attn.v_proj"],
    "MultiHeadDotProductAttention_0/out/kernel": ["self_attn.out_proj"],
    "MlpBlock_0/Dense_0/kernel": ["mlp.fc1"],
    "MlpBlock_0/Dense_1/kernel": ["mlp.fc2"],
}


def _modules(weight: str) -> tuple[list[str], bool]:
    """(HF modules of one layer per stack index, with `{i}` for the layer; whether the layers are scanned)."""
    if weight == "img/head/kernel":
        return ["model.multi_modal_projector.linear"], False
    if m := re.fullmatch(r"llm/layers/(?:(\d+)/)?(.+)", weight):
        pre, table, rest = "model.language_model.layers.{i}.", _LLM, m.group(2)
        layer = m.group(1)
    elif m := re.fullmatch(r"img/Transformer/encoderblock(?:_(\d+))?/(.+)", weight):
        pre, table, rest = "model.vision_tower.encoder.layers.{i}.", _VIT, m.group(2)
        layer = m.group(1)
    else:
        raise ValueError(f"No PEFT (HF) module for adapted weight {weight!r}.")
    if rest not in table:
        raise ValueError(f"No PEFT (HF) module for adapted weight {weight!r}.")
    if layer is not None:
        pre = pre.replace("{i}", layer)
    return [pre + t for t in table[rest]], layer is None


def to_peft(adapters: Mapping[str, Any], base_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """{PEFT key: float32 array} from our flat adapters and the base weights' shapes (names without `_lora_*`)."""
    out: dict[str, np.ndarray] = {}
    for name_a in sorted(k for k in adapters if k.endswith(lora_lib.ADAPTER_A)):
        weight = name_a[: -len(lora_lib.ADAPTER_A)]
        a = np.asarray(adapters[name_a], np.float32)
        b = np.asarray(adapters[weight + lora_lib.ADAPTER_B], np.float32)
        roles = lora_lib.roles_of(weight, len(base_shapes[weight]))
        modules, scanned = _modules(weight)
        n_layer_axes = int(scanned)
        n_stack = roles.count("s") - n_layer_axes  # Stack axes of one layer (k/v, gate/up, q/k/v).
        if len(modules) != (a.shape[n_layer_axes] if n_stack else 1) or n_stack > 1:
            raise ValueError(f"{weight}: adapter stack {a.shape} does not fit HF modules {modules}.")
        rank = a.shape[-1]
        lead = a.shape[: n_layer_axes + n_stack]  # [layers?, stack?]
        a = a.reshape(*lead, -1, rank)  # [.., in, r]
        b = b.reshape(*lead, rank, -1)  # [.., r, out]
        for idx in np.ndindex(*lead):
            layer = idx[0] if scanned else None
            module = modules[idx[-1] if n_stack else 0]
            if layer is not None:
                module = module.replace("{i}", str(layer))
            out[f"{_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a[idx].T)  # [r, in]
            out[f"{_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b[idx].T)  # [out, r]
    return out


def export_peft(
    adapters: Mapping[str, Any],
    base_shapes: Mapping[str, tuple[int, ...]],
    spec: lora_lib.LoraSpec,
    outdir: str | os.PathLike,
    *,
    base_model_name_or_path: str = "",
) -> str:
    """Writes `adapter_config.json` + `adapter_model.safetensors` to `outdir`; returns it.

    Load with `peft.PeftModel.from_pretrained(hf_model, outdir)`, where `hf_model` is our HF export of the base
    (`paligemma_ft.checkpoints.hf.export_hf` / `to_hf_model`). Needs the `safetensors` package.
    """
    from safetensors.numpy import save_file  # noqa: PLC0415 - optional (the hf extra).

    tensors = to_peft(adapters, base_shapes)
    modules = sorted({k[len(_PREFIX) :].rsplit(".lora_", 1)[0] for k in tensors})
    ranks = {t.shape[0] for k, t in tensors.items() if ".lora_A." in k}
    if ranks != {spec.rank}:
        raise ValueError(f"Adapter ranks {sorted(ranks)} differ from config.lora.rank={spec.rank}.")
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path or None,
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
    n = sum(math.prod(t.shape) for t in tensors.values())
    assert n == sum(math.prod(np.shape(v)) for v in adapters.values()), "every adapter entry exported once"
    return outdir
