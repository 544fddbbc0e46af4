"""Useful model FLOPs and bytes: for MFU, for the bandwidth limit of decoding, and for the memory plan.

Counting rules (the ones the MFU figure uses, written down so that numbers from different runs compare):

* Only matrix products count, 2·m·n·k each: every dense / einsum / patchify convolution, the attention score
  (q·kᵀ) and value (probs·v) products over the full T×T grid the model computes (the prefix-LM mask is applied
  by `where`, so the masked half is computed too; this is PaLM's convention), and the tied vocabulary
  projection only at the `loss_tokens` positions that carry loss. Norms, softmax, GELU, RoPE and the optimizer
  are not counted, nor is rematerialization (recomputed forward passes are not useful work).
* Backward, per product `y = x · W`: `dx = dy · Wᵀ` counts only when `x` depends on some trainable parameter
  (gradients must flow further down), and `dW = xᵀ · dy` only when `W` is trainable. A frozen tower below every
  trainable parameter therefore costs its forward pass alone; a frozen layer above a trainable one costs forward
  plus the activation gradient. Activation-activation products (scores, values) follow the same rule per operand.
* A trainable set is `True`/`False`/`None` (all/none/all), a regex (full match), a predicate over names, or a
  boolean pytree like the parameters (what `paligemma_ft.training.optim.trainable_mask` returns). Names are big_vision's
  (`img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel`, `llm/layers/attn/q_einsum/w`; unscanned layouts
  have `encoderblock_{i}` and `layers/{i}`).
* LoRA (`lora`, a `model.lora.LoraSpec`): an adapted `y = x · W` adds `x · A` [k → r] and `h · B` [r → n], counted
  like any two products (their weights are trainable, so `dW` always counts and `dh` always flows). A quantized
  base weight (`W_q` in a trainable tree) counts as the frozen `W`.

Axes: P image tokens, L text tokens, T = P + L, D LLM width, Dv ViT width, F / Fv MLP dims, N heads, K kv heads,
H head dim, V vocab, S keys attended when decoding.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from paligemma_ft.model.presets import resolve_img_config, resolve_llm_config

Trainable = Any  # bool | None | str (regex) | Callable[[str], bool] | pytree of bools.

# --- Device tables (per chip, dense bf16 matmul peak, HBM bandwidth, HBM bytes) ---------------------------------
# Matched in order against `device.device_kind.lower()` (more specific entries first). Vendor datasheet figures.
_DEVICES: list[tuple[str, float, float, float]] = [
    ("h200", 989.4e12, 4.8e12, 141e9),
    ("h100 pcie", 756.0e12, 2.0e12, 80e9),
    ("h100 nvl", 835.0e12, 3.9e12, 94e9),
    ("h100", 989.4e12, 3.35e12, 80e9),  # SXM: device_kind "NVIDIA H100 80GB HBM3".
    ("a100-sxm4-80gb", 312e12, 2.039e12, 80e9),
    ("a100-pcie-80gb", 312e12, 1.935e12, 80e9),
    ("a100", 312e12, 1.555e12, 40e9),  # 40 GB parts.
    ("t4", 65e12, 0.32e12, 15 * 2**30),  # float16 tensor-core peak (no bfloat16 units: XLA emulates bf16).
    ("tpu v4", 275e12, 1.2288e12, 32 * 2**30),
    ("tpu v5 lite", 197e12, 0.819e12, 16 * 2**30),  # v5e's device_kind.
    ("tpu v5e", 197e12, 0.819e12, 16 * 2**30),
    ("tpu v5p", 459e12, 2.765e12, 95 * 2**30),
    ("tpu v5", 459e12, 2.765e12, 95 * 2**30),  # v5p reports "TPU v5".
    ("tpu v6 lite", 918e12, 1.64e12, 32 * 2**30),  # v6e.
    ("tpu v6e", 918e12, 1.64e12, 32 * 2**30),
]


def _device_kind(device: Any) -> str:
    if device is None:
        import jax  # noqa: PLC0415 - only when asked about the local device.

        device = jax.devices()[0]
    return (device if isinstance(device, str) else getattr(device, "device_kind", str(device))).lower()


def _lookup(device: Any) -> tuple[str, float, float, float] | None:
    kind = _device_kind(device)
    return next((row for row in _DEVICES if row[0] in kind), None)


def peak_flops(device: Any = None) -> float | None:
    """Dense bf16 matmul FLOP/s of one chip: a jax Device, a device-kind string ("H100", "TPU v5 lite") or None
    for `jax.devices()[0]`. None for CPUs and unknown devices."""
    row = _lookup(device)
    return row[1] if row else None


def peak_bandwidth(device: Any = None) -> float | None:
    """HBM bytes/s of one chip (as `peak_flops`); None for CPUs and unknown devices."""
    row = _lookup(device)
    return row[2] if row else None


def device_memory(device: Any = None) -> float | None:
    """Nominal HBM bytes of one chip (as `peak_flops`); None for CPUs and unknown devices. A live device's
    allocator limit (`device.memory_stats()["bytes_limit"]`) is more exact where available."""
    row = _lookup(device)
    return row[3] if row else None


def mfu(
    flops_per_example: float, examples_per_sec: float, device: Any = None, num_devices: int | None = None
) -> float | None:
    """Model FLOPs utilization in [0, 1]: useful FLOP/s over the peak of all `num_devices` chips.

    Args:
      flops_per_example: e.g. `train_flops_per_example(...)`.
      examples_per_sec: global throughput (all devices together).
      device: the chip kind (default: `jax.devices()[0]`); num_devices: default `jax.device_count()`.

    Returns:
      None where the peak is unknown (CPU).
    """
    peak = peak_flops(device)
    if peak is None:
        return None
    if num_devices is None:
        import jax  # noqa: PLC0415

        num_devices = jax.device_count()
    return flops_per_example * examples_per_sec / (peak * num_devices)


# --- Trainable sets ----------------------------------------------------------------------------------------------


def as_predicate(trainable: Trainable) -> Callable[[str], bool]:
    """Any accepted trainable-set form as `name -> bool` (see the module docstring).

    Raises:
      ValueError: (when called) for a name a boolean pytree does not hold, naming it and the layout hint.
    """
    if trainable is None or isinstance(trainable, bool):
        value = trainable is not False
        return lambda name: value
    if isinstance(trainable, str):
        pattern = re.compile(trainable)
        return lambda name: pattern.fullmatch(name) is not None
    if callable(trainable):
        return lambda name: bool(trainable(name))
    from paligemma_ft.utils import tree_flatten_with_names  # noqa: PLC0415 - pulls in jax.

    table = {name: bool(v) for name, v in tree_flatten_with_names(trainable)}

    def lookup(name: str) -> bool:
        if name not in table and name + "_q" in table:  # A quantized (QLoRA) base weight: codes, never trained.
            return table[name + "_q"]
        if name not in table:
            raise ValueError(
                f"The trainable tree has no parameter {name!r} (is it for another model, or the "
                f"other scan layout?); it holds e.g. {sorted(table)[:3]}."
            )
        return table[name]

    return lookup


# --- The walk over the model -----------------------------------------------------------------------------------


class _Count:
    """Walks the model's products in forward order, tracking which activations need gradients."""

    def __init__(self, trainable: Trainable, lora: Any = None):
        self.is_trainable = as_predicate(trainable)
        self.lora = lora
        self.flops: dict[str, float] = collections.defaultdict(float)  # "<part>/<pass>" -> FLOPs.
        self.params: dict[str, int] = collections.defaultdict(int)  # name -> elements (scanned: all layers).

    def param(self, name: str, numel: int) -> bool:
        """Registers a parameter; returns whether it is trainable."""
        self.params[name] += numel
        return self.is_trainable(name)

    def dense(
        self, part: str, live: bool, weight: str, m: int, k: int, n: int, bias: str | None = None, tied: bool = False
    ) -> bool:
        """y[m, n] = x[m, k] · W[k, n] (+ b); returns whether y depends on a trainable parameter.

        `tied`: W was registered already (the output layer reuses the input embedding)."""
        f = 2.0 * m * k * n
        trained = self.is_trainable(weight) if tied else self.param(weight, k * n)
        self.flops[f"{part}/forward"] += f
        if live:
            self.flops[f"{part}/backward_act"] += f
        if trained:
            self.flops[f"{part}/backward_weight"] += f
        if not tied and self.lora is not None and self.lora.adapts(weight):  # x·A then h·B, both A and B trained.
            r = self.lora.rank
            self.flops[f"{part}/forward"] += 2.0 * m * r * (k + n)
            self.flops[f"{part}/backward_weight"] += 2.0 * m * r * (k + n)
            self.flops[f"{part}/backward_act"] += 2.0 * m * r * n + (2.0 * m * k * r if live else 0.0)
            trained = True
        if bias is not None:
            trained |= self.param(bias, n)
        return live or trained

    def product(self, part: str, a_live: bool, b_live: bool, f: float) -> bool:
        """An activation-activation product of `f` forward FLOPs; gradients only to operands that need them."""
        self.flops[f"{part}/forward"] += f
        if a_live or b_live:
            self.flops[f"{part}/backward_act"] += f * (int(a_live) + int(b_live))
        return a_live or b_live

    def norm(self, live: bool, *names_sizes: tuple[str, int]) -> bool:
        for name, n in names_sizes:
            live |= self.param(name, n)
        return live


def _vit(c: _Count, img: Mapping[str, Any], res: int, llm_width: int, part: str = "img") -> bool:
    """SigLIP ViT per image; returns whether its output tokens need gradients."""
    ph, pw = img["patch_size"]
    if res % ph or res % pw:
        raise ValueError(f"resolution {res} is not a multiple of model.img.patch_size {(ph, pw)}.")
    p, dv, fv = (res // ph) * (res // pw), img["width"], img.get("mlp_dim") or 4 * img["width"]
    live = c.dense(part, False, "img/embedding/kernel", p, ph * pw * 3, dv, bias="img/embedding/bias")
    if img.get("posemb", "learn") == "learn":
        live |= c.param("img/pos_embedding", p * dv)
    for i in range(img["depth"]):
        b = "img/Transformer/encoderblock/" if img.get("scan") else f"img/Transformer/encoderblock_{i}/"
        y = c.norm(live, (b + "LayerNorm_0/scale", dv), (b + "LayerNorm_0/bias", dv))
        a = b + "MultiHeadDotProductAttention_0/"
        q, k, v = (
            c.dense(part, y, f"{a}{n}/kernel", p, dv, dv, bias=f"{a}{n}/bias") for n in ("query", "key", "value")
        )
        probs = c.product(part, q, k, 2.0 * p * p * dv)
        att = c.product(part, probs, v, 2.0 * p * p * dv)
        live |= c.dense(part, att, a + "out/kernel", p, dv, dv, bias=a + "out/bias")
        y = c.norm(live, (b + "LayerNorm_1/scale", dv), (b + "LayerNorm_1/bias", dv))
        m = b + "MlpBlock_0/"
        y = c.dense(part, y, m + "Dense_0/kernel", p, dv, fv, bias=m + "Dense_0/bias")
        live |= c.dense(part, y, m + "Dense_1/kernel", p, fv, dv, bias=m + "Dense_1/bias")
    live = c.norm(live, ("img/Transformer/encoder_norm/scale", dv), ("img/Transformer/encoder_norm/bias", dv))
    return c.dense(part, live, "img/head/kernel", p, dv, llm_width, bias="img/head/bias")


def _llm_layers(c: _Count, llm: Mapping[str, Any], live: bool, t: int, part: str = "llm") -> bool:
    """Gemma layers over t tokens; returns whether the final norm's output needs gradients."""
    d, f, n, kv, h = llm["width"], llm["mlp_dim"], llm["num_heads"], llm["num_kv_heads"], llm["head_dim"]
    for i in range(llm["depth"]):
        b = "llm/layers/" if llm.get("scan", True) else f"llm/layers/{i}/"
        y = c.norm(live, (b + "pre_attention_norm/scale", d))
        if kv == n:  # Fused qkv_einsum [3, N, D, H]: one weight, three products.
            q, k, v = (c.dense(part, y, b + "attn/qkv_einsum/w", t, d, n * h) for _ in range(3))
        else:
            q = c.dense(part, y, b + "attn/q_einsum/w", t, d, n * h)
            k, v = (c.dense(part, y, b + "attn/kv_einsum/w", t, d, kv * h) for _ in range(2))
        probs = c.product(part, q, k, 2.0 * t * t * n * h)
        att = c.product(part, probs, v, 2.0 * t * t * n * h)
        out = c.dense(part, att, b + "attn/attn_vec_einsum/w", t, n * h, d)
        if llm.get("post_norms"):
            out = c.norm(out, (b + "post_attention_norm/scale", d))
        live |= out
        y = c.norm(live, (b + "pre_ffw_norm/scale", d))
        gate, up = (c.dense(part, y, b + "mlp/gating_einsum", t, d, f) for _ in range(2))
        out = c.dense(part, gate or up, b + "mlp/linear", t, f, d)
        if llm.get("post_norms"):
            out = c.norm(out, (b + "post_ffw_norm/scale", d))
        live |= out
    return c.norm(live, ("llm/final_norm/scale", d))


def _resolve(model_cfg: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    llm = resolve_llm_config(model_cfg.get("llm"))
    return resolve_img_config(model_cfg.get("img"), llm_width=llm["width"]), llm


def _image_tokens(img: Mapping[str, Any], res: int) -> int:
    ph, pw = img["patch_size"]
    return (res // ph) * (res // pw)


def image_tokens(model_cfg: Mapping[str, Any], res: int) -> int:
    """P: the tokens the ViT makes of one `res` x `res` image."""
    return _image_tokens(_resolve(model_cfg)[0], res)


def _walk_train(
    model_cfg: Mapping[str, Any],
    res: int,
    text_len: int,
    loss_tokens: int | None,
    trainable: Trainable,
    lora: Any = None,
) -> _Count:
    img, llm = _resolve(model_cfg)
    loss_tokens = text_len if loss_tokens is None else int(loss_tokens)
    if not 0 <= loss_tokens <= text_len:
        raise ValueError(f"loss_tokens={loss_tokens} must lie in [0, text_len={text_len}].")
    c = _Count(trainable, lora)
    live = _vit(c, img, res, llm["width"])
    # Text embeddings come from the (tied) table: a gather, no product, but a trainable table makes them live.
    live |= c.param("llm/embedder/input_embedding", llm["vocab_size"] * llm["width"])
    live = _llm_layers(c, llm, live, _image_tokens(img, res) + text_len)
    c.dense("logits", live, "llm/embedder/input_embedding", loss_tokens, llm["width"], llm["vocab_size"], tied=True)
    return c


def train_flops_breakdown(
    model_cfg: Mapping[str, Any],
    res: int,
    text_len: int,
    loss_tokens: int | None = None,
    trainable: Trainable = True,
    lora: Any = None,
) -> dict[str, float]:
    """FLOPs of one training example by part and pass.

    Args:
      model_cfg: `dict(img=..., llm=...)` as `Model(**model_cfg)` / `get_preset(name)[0]`.
      res: image side in pixels; text_len: L, the model's text input length (`config.input.text_len`).
      loss_tokens: positions carrying loss (the suffix tokens); default all L.
      trainable: see the module docstring.
      lora: the model's `LoraSpec` (adapters counted), or None.

    Returns:
      `{"img/forward": f, "img/backward_act": f, "img/backward_weight": f, "llm/...": ..., "logits/...": ...}`
      (absent keys are 0).
    """
    return dict(_walk_train(model_cfg, res, text_len, loss_tokens, trainable, lora).flops)


def train_flops_per_example(
    model_cfg: Mapping[str, Any],
    res: int,
    text_len: int,
    loss_tokens: int | None = None,
    trainable: Trainable = True,
    lora: Any = None,
) -> float:
    """Useful FLOPs of one training example: forward plus the backward products the trainable set needs."""
    return float(sum(train_flops_breakdown(model_cfg, res, text_len, loss_tokens, trainable, lora).values()))


def forward_flops_per_example(
    model_cfg: Mapping[str, Any], res: int, text_len: int, loss_tokens: int | None = None
) -> float:
    """FLOPs of one teacher-forced forward pass (evaluation losses): the training count with nothing trainable."""
    return train_flops_per_example(model_cfg, res, text_len, loss_tokens, trainable=False)


def param_counts(model_cfg: Mapping[str, Any], res: int, trainable: Trainable = True) -> dict[str, int]:
    """`{"total": n, "trainable": n, "img": n, "llm": n}` parameter counts, from the config alone."""
    c = _walk_train(model_cfg, res, 1, 1, trainable)
    out = {"total": 0, "trainable": 0, "img": 0, "llm": 0}
    for name, n in c.params.items():
        out["total"] += n
        out[name.split("/")[0]] += n
        out["trainable"] += n if c.is_trainable(name) else 0
    return out


def parameter_names(model_cfg: Mapping[str, Any], res: int) -> dict[str, int]:
    """Every parameter name the accounting knows, with its element count (for checks against the model)."""
    return dict(_walk_train(model_cfg, res, 1, 1, True).params)


# --- Decoding -------------------------------------------------------------------------------------------------


def decode_flops_per_token(model_cfg: Mapping[str, Any], context_len: int) -> float:
    """FLOPs of one decoded token of one example attending `context_len` keys (image + prompt + generated so
    far, the new token included): every LLM weight once, scores and values over S = context_len, the logits."""
    _, llm = _resolve(model_cfg)
    d, n, h = llm["width"], llm["num_heads"], llm["head_dim"]
    c = _Count(False)
    # One token through the projections and MLPs: the layer walk at t = 1, minus its 1x1 attention ...
    _llm_layers(c, llm, False, 1)
    attn_1x1 = 2 * 2.0 * n * h * llm["depth"]
    # ... plus attention over the context, plus the full vocabulary projection.
    return (
        c.flops["llm/forward"] - attn_1x1 + 2 * 2.0 * context_len * n * h * llm["depth"] + 2.0 * d * llm["vocab_size"]
    )


def _itemsize(dtype: Any) -> int:
    import ml_dtypes  # noqa: F401, PLC0415 - registers bfloat16 with numpy.
    import numpy as np  # noqa: PLC0415

    return np.dtype(dtype).itemsize


def kv_cache_bytes(
    model_cfg: Mapping[str, Any], context_len: int, batch: int = 1, cache_dtype: Any = "bfloat16"
) -> float:
    """Bytes of the K and V caches holding `context_len` positions for `batch` rows."""
    _, llm = _resolve(model_cfg)
    return 2.0 * llm["depth"] * batch * context_len * llm["num_kv_heads"] * llm["head_dim"] * _itemsize(cache_dtype)


def decode_bytes_per_step(
    model_cfg: Mapping[str, Any],
    context_len: int,
    batch: int = 1,
    param_dtype: Any = "bfloat16",
    cache_dtype: Any = "bfloat16",
) -> float:
    """Bytes read from memory by one decode step: every LLM parameter once (the embedding table is read whole
    by the logits) plus the K/V cache of `context_len` positions for each of `batch` rows. The ViT is not read."""
    llm_params = param_counts(model_cfg, _min_res(model_cfg))["llm"]  # The LLM's size does not depend on res.
    return llm_params * _itemsize(param_dtype) + kv_cache_bytes(model_cfg, context_len, batch, cache_dtype)


def _min_res(model_cfg: Mapping[str, Any]) -> int:
    img, _ = _resolve(model_cfg)
    return int(math.lcm(*img["patch_size"]))


def decode_bandwidth_limit(
    model_cfg: Mapping[str, Any],
    context_len: int,
    batch: int = 1,
    device: Any = None,
    param_dtype: Any = "bfloat16",
    cache_dtype: Any = "bfloat16",
) -> float | None:
    """Upper bound on decoded tokens/s (all rows together) set by memory bandwidth; None for CPUs."""
    bw = peak_bandwidth(device)
    if bw is None:
        return None
    return batch * bw / decode_bytes_per_step(model_cfg, context_len, batch, param_dtype, cache_dtype)


# --- Counting a traced function (an independent check of the arithmetic above) -------------------------------


def _sub_jaxprs(params: Mapping[str, Any]):
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(v, "eqns"):  # Jaxpr
                yield v
            elif hasattr(getattr(v, "jaxpr", None), "eqns"):  # ClosedJaxpr
                yield v.jaxpr


def _eqn_flops(eqn: Any) -> float:
    name = eqn.primitive.name
    if name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
    if name == "conv_general_dilated":
        rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...) positions.
        rhs = eqn.invars[1].aval.shape
        per_output = rhs[rhs_spec[1]] * math.prod(rhs[i] for i in rhs_spec[2:])
        return 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
    return 0.0


def jaxpr_matmul_flops(jaxpr: Any) -> float:
    """2·m·n·k summed over every `dot_general` and convolution of a (Closed)Jaxpr, nested calls included and
    scans multiplied by their length: what a traced function actually multiplies (recomputation included).

    Example: `jaxpr_matmul_flops(jax.make_jaxpr(jax.grad(loss))(params))`.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        total += _eqn_flops(eqn)
        inner = sum(jaxpr_matmul_flops(sub) for sub in _sub_jaxprs(eqn.params))
        total += inner * (eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1)
    return total
