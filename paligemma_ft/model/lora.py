"""LoRA and QLoRA inside the model: low-rank adapters and quantized frozen weights, under our own parameter names.

Every weight that LoRA may adapt is read through `weight()` by the layer that owns it (Gemma's `Einsum`s and MLP,
the ViT's `Dense` and attention projections in `model/layers.py`), and the layer adds `delta()` to its output:

    y = x · W  +  (alpha / rank) · (dropout(x) · A) · B          A: f32[S.., I.., r]   B: f32[S.., r, O..]

where the weight's axes are sorted into roles (`ROLES`): S stack axes index independent matrices (k and v in
`kv_einsum` [2, K, D, H], gate and up in `gating_einsum` [2, D, F], the scanned layer axis), I input axes are
contracted with x, O output axes are produced. So an attention weight keeps its head layout: `q_einsum/w`
[N, D, H] gets A [D, r] and B [r, N, H]; `attn_vec_einsum/w` [N, H, D] gets A [N, H, r] and B [r, D]; k and v
get separate adapters, exactly as PEFT's `k_proj`/`v_proj` (which is what makes the PEFT export exact).

Names: the adapters of `.../q_einsum/w` are `.../q_einsum/w_lora_a` and `.../q_einsum/w_lora_b`, next to the
weight (qwix's convention); a quantized base stores `.../w_q` (codes) and `.../w_qscale` (block absmax) in place
of `.../w`. So sharding rules, trainable masks, logs and the parameter overview use the same names as always.

B starts at zero, so at step 0 the model computes exactly the base model's outputs. Why not qwix: see
docs/design.md ("LoRA: why qwix / why our own").

Axes: S stack, I input, O output, r rank; B batch, T tokens.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from paligemma_ft.model import precision, quant

ADAPTER_A, ADAPTER_B = "_lora_a", "_lora_b"
CODES, SCALE = "_q", "_qscale"

# Axis roles of every weight LoRA can adapt, by the end of its name: one letter per axis of ONE layer's weight
# (s stack, i input, o output). A scanned stack adds a leading "s" (see `roles_of`).
ROLES: tuple[tuple[str, str], ...] = (
    (r"attn/qkv_einsum/w", "soio"),  # [3, N, D, H]: q, k, v when kv heads == heads.
    (r"attn/q_einsum/w", "oio"),  # [N, D, H]
    (r"attn/kv_einsum/w", "soio"),  # [2, K, D, H]: k, v.
    (r"attn/attn_vec_einsum/w", "iio"),  # [N, H, D]
    (r"mlp/gating_einsum", "sio"),  # [2, D, F]: GELU gate, linear up.
    (r"mlp/linear", "io"),  # [F, D]
    (r"MultiHeadDotProductAttention_0/(query|key|value)/kernel", "ioo"),  # [D, N, H]
    (r"MultiHeadDotProductAttention_0/out/kernel", "iio"),  # [N, H, D]
    (r"MlpBlock_0/Dense_\d+/kernel", "io"),  # [D, F], [F, D]
    (r"img/head/kernel", "io"),  # [D_img, D_llm]: PaliGemma's projection into the LLM.
)


def layer_roles(name: str) -> str | None:
    """The roles of one layer's weight `name` (e.g. "oio" for `llm/layers/attn/q_einsum/w`); None if not adaptable."""
    for pattern, roles in ROLES:
        if re.search(rf"(^|/){pattern}$", name):
            return roles
    return None


def roles_of(name: str, ndim: int) -> str:
    """Roles of the stored weight `name` with `ndim` axes: extra leading axes (nn.scan's layers) are stack axes."""
    roles = layer_roles(name)
    if roles is None or ndim < len(roles):
        raise ValueError(f"{name} (ndim {ndim}) is not a weight LoRA can adapt; adaptable: {[p for p, _ in ROLES]}")
    return "s" * (ndim - len(roles)) + roles


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """`config.lora` as the model sees it (frozen, so hashable).

    Attributes:
      rank: r; 0 adds no adapters (a `quant` alone then still quantizes the frozen weights; configs need r >= 1).
      alpha: the update is scaled by alpha / rank (PEFT's `lora_alpha`); None = rank (scale 1).
      dropout: dropout on the adapter's input in training (PEFT's `lora_dropout`).
      targets: ordered `(regex, adapt)` rules over weight names; the first full match decides.
      quant: "none", "int8" or "nf4": how the frozen adaptable weights are stored.
    """

    rank: int = 0
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[tuple[str, bool], ...] = ()
    quant: str = "none"

    def __post_init__(self):
        if self.alpha is None:  # Frozen dataclass: set once, here.
            object.__setattr__(self, "alpha", float(self.rank))
        if self.rank < 0:
            raise ValueError(f"config.lora.rank must be >= 0, got {self.rank}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"config.lora.dropout must lie in [0, 1), got {self.dropout}.")
        if self.quant not in quant.QUANT_MODES:
            raise ValueError(f"config.lora.quant={self.quant!r}: use one of {quant.QUANT_MODES}.")
        for i, (pattern, _) in enumerate(self.targets):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"config.lora.targets[{i}] = {pattern!r} is not a regex: {e}") from e

    @property
    def scale(self) -> float:
        alpha = self.rank if self.alpha is None else self.alpha  # (Never None after __post_init__.)
        return float(alpha) / self.rank if self.rank else 0.0

    def adapts(self, name: str) -> bool:
        """Whether the weight `name` gets an adapter: it is adaptable (`ROLES`) and the first target that fully
        matches it says so."""
        if not self.rank or layer_roles(name) is None:
            return False
        for pattern, adapt in self.targets:
            if re.fullmatch(pattern, name):
                return adapt
        return False

    def quantizes(self, name: str) -> bool:
        return self.quant != "none" and layer_roles(name) is not None


def parse_targets(targets: Any) -> tuple[tuple[str, bool], ...]:
    """`config.lora.targets` entries, each a regex (adapt) or a `(regex, bool)` pair (False excludes)."""
    out = []
    for i, t in enumerate(targets or ()):
        if isinstance(t, str):
            out.append((t, True))
        elif isinstance(t, (list, tuple)) and len(t) == 2 and isinstance(t[0], str) and isinstance(t[1], bool):
            out.append((t[0], t[1]))
        else:
            raise ValueError(f"config.lora.targets[{i}] = {t!r}: use a regex string or a (regex, True/False) pair.")
    return tuple(out)


def spec_from_config(config: Any) -> LoraSpec | None:
    """The `LoraSpec` of a completed config's `lora` group (`config_base`), or None when its rank is 0.

    `lora.alpha` None means alpha = rank (scale 1, PEFT's default pairing). The values are checked by
    `config_base.validate` (rank, quant, dropout, targets) before this is called.
    """
    cfg = config.lora
    rank = int(cfg.rank)
    if not rank:
        return None
    return LoraSpec(
        rank=rank,
        alpha=float(rank if cfg.alpha is None else cfg.alpha),
        dropout=float(cfg.dropout),
        targets=parse_targets(cfg.targets),
        quant=str(cfg.quant),
    )


# --- Inside the layers -----------------------------------------------------------------------------------------


def _name(module: nn.Module, param: str) -> str:
    return "/".join((*module.path, param))


def _input_axis(roles: str) -> int:
    """The blocked axis for quantization: the last input axis (bitsandbytes blocks along torch's `in`)."""
    return roles.rindex("i")


def weight(
    module: nn.Module,
    param: str,
    init: Callable[..., jax.Array],
    shape: tuple[int, ...],
    lora: LoraSpec | None,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """The weight `param` of `module` ([shape]): a plain parameter, or dequantized from `{param}_q`/`{param}_qscale`
    when `lora.quant` is set (then only the codes and scales are parameters). Call inside a compact method."""
    name = _name(module, param)
    if lora is None or not lora.quantizes(name):
        return module.param(param, init, shape, dtype)
    axis = _input_axis(roles_of(name, len(shape)))
    codes_shape, scale_shape = quant.quantized_shapes(shape, axis, lora.quant)
    # A random init quantizes one fresh weight into both parameters. (flax also evaluates these functions
    # abstractly in `apply` to check shapes; there each quantizes its own abstract weight.)
    fresh: dict[str, jax.Array] = {}

    def codes_init(rng: jax.Array) -> jax.Array:
        codes, scale = quant.quantize(init(rng, shape, dtype), axis, lora.quant, xp=jnp)
        if module.is_initializing():
            fresh["scale"] = scale
        return codes

    def scale_init(rng: jax.Array) -> jax.Array:
        if "scale" in fresh:
            return fresh.pop("scale")
        return quant.quantize(init(rng, shape, dtype), axis, lora.quant, xp=jnp)[1]

    codes = module.param(param + CODES, codes_init)
    scale = module.param(param + SCALE, scale_init)
    if codes.shape != codes_shape or scale.shape != scale_shape:
        raise ValueError(f"{name}: quantized shapes {codes.shape}, {scale.shape}; want {codes_shape}, {scale_shape}")
    return quant.dequantize(codes, scale, axis, lora.quant)


def _split_eqn(eqn: str) -> tuple[str, str, str]:
    lhs, rest = eqn.replace(" ", "").split(",")
    rhs, out = rest.split("->")
    return lhs, rhs, out


def adapter_eqns(eqn: str, roles: str) -> tuple[str, str, str, str]:
    """For `y = einsum(eqn, x, W)` with W's axis `roles`: (A spec, B spec, eqn x·A → h, eqn h·B → y-shaped delta)."""
    lhs, rhs, out = _split_eqn(eqn)
    if len(rhs) != len(roles):
        raise ValueError(f"einsum {eqn!r}: weight spec {rhs!r} does not fit roles {roles!r}")
    r = sorted(set(string.ascii_letters) - set(lhs + rhs + out))[0]
    stack = "".join(c for c, k in zip(rhs, roles) if k == "s")
    ins = "".join(c for c, k in zip(rhs, roles) if k == "i")
    outs = "".join(c for c, k in zip(rhs, roles) if k == "o")
    a, b = stack + ins + r, stack + r + outs
    h = "".join(c for c in lhs if c not in ins) + "".join(c for c in stack if c not in lhs) + r
    return a, b, f"{lhs},{a}->{h}", f"{h},{b}->{out}"


def adapter_shapes(shape: Sequence[int], roles: str, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of A [S.., I.., r] and B [S.., r, O..] for a weight of `shape` with `roles`."""
    pick = lambda kind: tuple(d for d, k in zip(shape, roles) if k == kind)  # noqa: E731
    return (*pick("s"), *pick("i"), rank), (*pick("s"), rank, *pick("o"))


def delta(
    module: nn.Module, param: str, eqn: str, x: jax.Array, shape: tuple[int, ...], lora: LoraSpec | None
) -> jax.Array | None:
    """The LoRA update of `y = einsum(eqn, x, W)` for the weight `param` of `module` ([shape]), or None when the
    weight is not a target. Creates `{param}_lora_a` (He-uniform) and `{param}_lora_b` (zeros) in float32.

    Dropout (rate `lora.dropout`) applies to x only when a "dropout" RNG is given, i.e. in training.
    """
    name = _name(module, param)
    if lora is None or not lora.adapts(name):
        return None
    roles = roles_of(name, len(shape))
    a_shape, b_shape = adapter_shapes(shape, roles, lora.rank)
    n_in = len(a_shape) - roles.count("s") - 1  # A's input axes (after its stack axes).
    a_init = nn.initializers.variance_scaling(
        2.0,
        "fan_in",
        "uniform",
        in_axis=tuple(range(roles.count("s"), roles.count("s") + n_in)),
        out_axis=-1,
        batch_axis=tuple(range(roles.count("s"))),
    )
    a = module.param(param + ADAPTER_A, a_init, a_shape, jnp.float32)
    b = module.param(param + ADAPTER_B, nn.initializers.zeros_init(), b_shape, jnp.float32)
    if lora.dropout and module.has_rng("dropout"):
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - lora.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - lora.dropout), jnp.zeros_like(x))
    _, _, eqn_a, eqn_b = adapter_eqns(eqn, roles)
    # In the compute dtype, as the base product (`precision.einsum`: float32 accumulation, float32 masters get
    # float32 gradients); with float32 activations a plain float32 einsum.
    h = precision.einsum(eqn_a, x, a)
    return precision.einsum(eqn_b, h, b) * jnp.asarray(lora.scale, x.dtype)


# --- On parameter trees (merge, split, quantize) -----------------------------------------------------------------


def is_adapter(name: str) -> bool:
    return name.endswith(ADAPTER_A) or name.endswith(ADAPTER_B)


def merged_delta(a: Any, b: Any, roles: str, scale: float, xp: Any = jnp) -> Any:
    """scale · A·B laid out like the weight with `roles` (A [S.., I.., r], B [S.., r, O..])."""
    letters = string.ascii_lowercase
    w = letters[: len(roles)]
    stack = "".join(c for c, k in zip(w, roles) if k == "s")
    ins = "".join(c for c, k in zip(w, roles) if k == "i")
    outs = "".join(c for c, k in zip(w, roles) if k == "o")
    return xp.einsum(f"{stack}{ins}z,{stack}z{outs}->{w}", a, b) * scale


def merge(flat: Mapping[str, Any], scale: float, quant_mode: str = "none", xp: Any = jnp) -> dict[str, Any]:
    """A flat {name: array} with adapters → the base layout with W + scale·A·B, adapters removed.

    Quantized weights (`_q`/`_qscale`) are dequantized first (pass `quant_mode`), so the result always has the
    base model's names. Merged weights are float32 (W + ΔW rounded once); other leaves keep their dtype.
    """
    out: dict[str, Any] = {}
    for name, v in flat.items():
        if is_adapter(name) or name.endswith(SCALE):
            continue
        if name.endswith(CODES) and name[: -len(CODES)] + SCALE in flat:
            base = name[: -len(CODES)]
            scales = flat[base + SCALE]
            roles = roles_of(base, v.ndim)
            out[base] = quant.dequantize(xp.asarray(v), xp.asarray(scales), _input_axis(roles), quant_mode, xp=xp)
        else:
            out[name] = v
    for name in [n for n in flat if n.endswith(ADAPTER_A)]:
        base = name[: -len(ADAPTER_A)]
        w = out[base]
        d = merged_delta(
            xp.asarray(flat[name], xp.float32),
            xp.asarray(flat[base + ADAPTER_B], xp.float32),
            roles_of(base, w.ndim),
            scale,
            xp,
        )
        out[base] = xp.asarray(w, xp.float32) + d  # float32: a bfloat16 W would round a small update away.
    return out


def quantize_weight(name: str, w: Any, mode: str) -> tuple[Any, Any]:
    """Host-side (numpy) codes and block scales of the float weight `name` (what the loader places for a QLoRA
    base, one weight at a time as it is read from the checkpoint)."""
    import numpy as np  # noqa: PLC0415 - host arrays.

    return quant.quantize(np.asarray(w, np.float32), _input_axis(roles_of(name, np.ndim(w))), mode)


def dequantize_weight(name: str, codes: Any, scales: Any, mode: str) -> Any:
    """Host-side (numpy) float weight `name` from its codes and scales (the inverse of `quantize_weight`)."""
    import numpy as np  # noqa: PLC0415 - host arrays.

    axis = _input_axis(roles_of(name, np.ndim(codes)))
    return quant.dequantize(np.asarray(codes), np.asarray(scales), axis, mode, xp=np)


def quantized_weights(shapes: Mapping[str, Sequence[int]], mode: str) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """`{weight name: (its float shape, codes name, scales name)}` for the quantized weights among a model's
    parameters `{name: shape}` (those stored as `W_q` + `W_qscale`)."""
    out = {}
    for name, shape in shapes.items():
        base = name[: -len(CODES)]
        if name.endswith(CODES) and base + SCALE in shapes:
            full = list(shape)
            if mode == "nf4":  # Two codes per byte along the blocked axis.
                full[_input_axis(roles_of(base, len(shape)))] *= 2
            out[base] = (tuple(full), name, base + SCALE)
    return out


def quantize_flat(flat: Mapping[str, Any], spec: LoraSpec) -> dict[str, Any]:
    """Host-side (numpy) quantization of a flat base {name: array}: each adaptable weight `W` becomes `W_q` and
    `W_qscale` (tests; the loader quantizes one weight at a time with `quantize_weight`)."""
    out: dict[str, Any] = {}
    for name, v in flat.items():
        if spec.quantizes(name) and not is_adapter(name):
            out[name + CODES], out[name + SCALE] = quantize_weight(name, v, spec.quant)
        else:
            out[name] = v
    return out
