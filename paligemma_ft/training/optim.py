"""Optimization: learning-rate schedules, the optax chain from a config, trainable sets, losses, accumulation.

Everything follows big_vision (`utils.create_learning_rate_schedule`, `utils.steps`, `optax.make`, the PaliGemma
trainer's loss; reference 6 and 7.2) so that big_vision configs keep their meaning:

* `config.schedule` is one dict (applied to every parameter) or an ordered list of `(regex, dict | None)`; the
  first full match wins, `None` freezes, and a parameter matched by no rule is an error.
* The update is `-sched(t) * (lr * opt(clip(g)) + wd * mult * p)`: weight decay is decoupled, NOT multiplied by
  `lr`, and by default only touches names matching `.*/kernel$` (so Gemma weights are never decayed).
* Frozen parameters carry no optimizer state (`optax.MaskedNode` leaves) and get an update of exactly `-0.0`.

Axis legend: B batch, T tokens per example, D width, V vocab, M micro-batches.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from paligemma_ft import config_base
from paligemma_ft.model import precision
from paligemma_ft.utils import PyTree, match_first, tree_flatten_with_names, tree_map_with_names

Schedule = Callable[[Any], jax.Array]  # step (int or traced int) -> f32[] multiplier.

_DURATION_SUFFIXES = ("steps", "epochs", "examples", "percent")
_SCHEDULE_EXTRA_KEYS = {"power", "end", "linear_end", "steps", "mults"}
_DURATION_PREFIXES = ("warmup", "cooldown", "timescale", "shift")


def _as_dict(x: Any) -> dict:
    """ConfigDict / Mapping -> plain dict (ConfigDict is not a `Mapping`)."""
    if hasattr(x, "to_dict"):
        return x.to_dict()
    if isinstance(x, Mapping):
        return dict(x)
    raise TypeError(f"Expected a dict of schedule arguments, got {type(x).__name__}: {x!r}")


# --- Durations and schedules (big_vision utils.steps / create_learning_rate_schedule) ---------------------------


def steps(
    prefix: str,
    config: Any,
    data_size: int | None = None,
    batch_size: int | None = None,
    total_steps: int | None = None,
    default: Any = ValueError,
) -> int:
    """Reads the duration `prefix` from `config` in steps: `<prefix>_steps|_epochs|_examples|_percent`.

    Epochs need `data_size` and `batch_size`, examples need `batch_size`, percent needs `total_steps`. Fractions
    are rounded with Python's `round` (banker's rounding: 6.5 -> 6) but a non-zero duration is at least 1 step.

    Raises:
      ValueError: when more than one of the keys is set, a percent lies outside [0, 1], or the duration is
        missing (or cannot be converted) and no `default` is given; the message names the keys.
    """
    keys = [f"{prefix}_{s}" for s in _DURATION_SUFFIXES if config.get(f"{prefix}_{s}") is not None]
    if len(keys) > 1:
        raise ValueError(f"Only one of {keys} may be set.")

    def to_int(x: float) -> int:
        return max(1, round(x)) if x else 0  # `total_epochs=1e-4` still runs one step; an explicit 0 runs none.

    if keys == [f"{prefix}_steps"]:
        return int(config.get(keys[0]))
    if keys == [f"{prefix}_examples"] and batch_size:
        return to_int(config.get(keys[0]) / batch_size)
    if keys == [f"{prefix}_epochs"] and batch_size and data_size:
        return to_int(config.get(keys[0]) * data_size / batch_size)
    if keys == [f"{prefix}_percent"] and total_steps:
        pct = config.get(keys[0])
        if not 0.0 <= pct <= 1.0:
            raise ValueError(f"{prefix}_percent must lie in [0, 1], got {pct}.")
        return to_int(pct * total_steps)
    if default is ValueError:
        raise ValueError(
            f"Cannot convert {prefix!r} to steps: keys set {keys or 'none'}, batch_size={batch_size}, "
            f"data_size={data_size}, total_steps={total_steps}."
        )
    return default


def create_learning_rate_schedule(
    total_steps: int,
    batch_size: int | None = None,
    data_size: int | None = None,
    base: float = 1.0,
    decay_type: str = "stair",
    scale_with_batchsize: bool = False,
    **kw: Any,
) -> Schedule:
    """big_vision's schedule: `step -> f32[]` learning rate (or multiplier when `base=1`).

    Args:
      total_steps: length of the run in steps.
      batch_size, data_size: only needed for durations in examples/epochs, and `scale_with_batchsize`.
      base: the peak value.
      decay_type: "cosine", "linear" / "polynomial" (`end` or `linear_end`, `power`), "rsqrt" (`timescale_*`,
        `shift_*`), "stair" (`steps`, `mults`) or "constant".
      scale_with_batchsize: multiply `base` by `batch_size / 256` (Goyal et al.).
      **kw: `warmup_*` / `cooldown_*` durations (see `steps`) and the decay type's arguments above.

    Returns:
      `fn(step)`: progress = clip((step - warmup) / (total - warmup), 0, 1) shapes the decay, then the value is
      multiplied by min(1, step / warmup) and min(1, (total - step) / cooldown). Jittable.

    Raises:
      ValueError: for an unknown decay type or argument (e.g. a misspelt `warmup_pecent`), or warmup >= total.
    """
    allowed = _SCHEDULE_EXTRA_KEYS | {f"{p}_{s}" for p in _DURATION_PREFIXES for s in _DURATION_SUFFIXES}
    if unknown := sorted(set(kw) - allowed):
        raise ValueError(f"Unknown schedule argument(s) {unknown}; allowed: {sorted(allowed)}.")
    if decay_type not in ("cosine", "linear", "polynomial", "rsqrt", "stair", "constant"):
        raise ValueError(
            f"Unknown decay_type {decay_type!r}; use cosine, linear, polynomial, rsqrt, stair or constant."
        )
    warmup = steps("warmup", kw, data_size, batch_size, total_steps, default=0)
    cooldown = steps("cooldown", kw, data_size, batch_size, total_steps, default=0)
    # Runs of 0 or 1 steps are legitimate (eval-only, debugging); otherwise warmup must end before the run does.
    if total_steps > 1 and warmup >= total_steps:
        raise ValueError(f"warmup ({warmup} steps) must be shorter than total_steps ({total_steps}).")
    if decay_type == "rsqrt":
        timescale = steps("timescale", kw, data_size, batch_size, total_steps)
        shift = steps("shift", kw, data_size, batch_size, total_steps, default=0)
    if scale_with_batchsize and not batch_size:
        raise ValueError("scale_with_batchsize=True needs the batch size (the peak is base * batch_size / 256).")
    peak = base * batch_size / 256.0 if scale_with_batchsize and batch_size else base

    def step_fn(step: Any) -> jax.Array:
        lr: float | jax.Array = peak
        progress = jnp.clip((step - warmup) / float(max(total_steps - warmup, 1)), 0.0, 1.0)
        if decay_type in ("linear", "polynomial"):
            end = kw.get("end", kw.get("linear_end", 0.0))
            lr = end + (lr - end) * (1.0 - progress) ** kw.get("power", 1)
        elif decay_type == "cosine":
            lr = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif decay_type == "rsqrt":
            lr = jnp.where(
                step >= warmup,
                lr / jnp.sqrt(1.0 + (step + shift - warmup) / timescale),
                lr / jnp.sqrt(1.0 + shift / timescale),
            )
        elif decay_type == "stair":
            i = jnp.searchsorted(jnp.asarray(kw.get("steps", []), jnp.float32), step + 1)
            lr = lr * jnp.take(jnp.asarray([1.0] + list(kw.get("mults", [])), jnp.float32), i)
        if warmup:
            lr = lr * jnp.minimum(1.0, step / warmup)
        if cooldown:
            lr = lr * jnp.minimum(1.0, (total_steps - step) / cooldown)
        return jnp.asarray(lr, jnp.float32)

    return step_fn


# --- Trainable sets ------------------------------------------------------------------------------------------


def _schedule_rules(schedule: Any) -> list[tuple[str, Any]]:
    """`config.schedule` as ordered `(regex, dict | None)` rules (a single dict applies to every parameter)."""
    if isinstance(schedule, (list, tuple)):
        rules = []
        for i, rule in enumerate(schedule):
            if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)):
                raise ValueError(f"config.schedule[{i}] must be a (regex, dict | None) pair, got {rule!r}.")
            rules.append((rule[0], None if rule[1] is None else _as_dict(rule[1])))
        return rules
    return [(".*", _as_dict(schedule or {}))]


def trainable_mask(params: PyTree, rules: Any) -> PyTree:
    """Tree of bools: True where the first rule matching the parameter's name has a non-None value.

    Args:
      params: parameters or `jax.ShapeDtypeStruct`s.
      rules: `config.schedule` (one dict: all trainable) or ordered `(regex, value)` pairs; `None` (or `False`)
        freezes, e.g. `[("llm/layers/attn/.*", {}), (".*", None)]` trains only the LLM attention.

    Raises:
      ValueError: naming the first parameter that no rule matches.
    """
    rules = _schedule_rules(rules) if not _is_bool_rules(rules) else list(rules)
    return tree_map_with_names(
        lambda name, _: match_first(rules, name, what="trainable (config.schedule)") not in (None, False), params
    )


def _is_bool_rules(rules: Any) -> bool:
    return isinstance(rules, (list, tuple)) and all(
        isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[1], bool) for r in rules
    )


def _rule_masks(params: PyTree, rules: Sequence[tuple[str, Any]], what: str, *, require_all: bool) -> list[PyTree]:
    """One bool tree per rule; each parameter is True in at most one of them: its first full match."""
    indexed = [(pattern, i) for i, (pattern, _) in enumerate(rules)]

    def index(name: str, _: Any) -> int:
        try:
            return match_first(indexed, name, what=what)
        except ValueError:
            if require_all:
                raise
            return -1

    idx = tree_map_with_names(index, params)
    return [jax.tree.map(lambda j, i=i: j == i, idx) for i in range(len(rules))]


def param_dtypes(params: PyTree, config: Any) -> PyTree:
    """The storage dtype of every parameter: trainable -> `config.trainable_dtype` (default float32), frozen ->
    `config.frozen_dtype` ("float16", "bfloat16", ...; None keeps the checkpoint's dtype). Non-float leaves
    keep their dtype. The colab keeps frozen weights in float16 to fit a 16 GB GPU.
    """
    config = config_base.complete(config)
    mask = trainable_mask(params, config.schedule)
    train_dt, frozen_dt = config.trainable_dtype, config.frozen_dtype

    def pick(leaf: Any, trainable: bool) -> np.dtype:
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return np.dtype(leaf.dtype)
        target = train_dt if trainable else frozen_dt
        return np.dtype(leaf.dtype if target is None else jnp.dtype(target))

    return jax.tree.map(pick, params, mask)


# --- The optax chain (big_vision optax.make) -----------------------------------------------------------------


def _adafactor(
    min_dim_size_to_factor: int = 32,
    decay_rate: float = 0.8,
    decay_offset: int = 0,
    beta2_cap: float = 0.999,
    clipping_threshold: float | None = None,
    momentum: float | None = 0.9,
    dtype_momentum: Any = jnp.bfloat16,
    eps: float = 1e-30,
) -> optax.GradientTransformation:
    """big_vision's Adafactor variant: factored second moments with a capped 1 - t^-0.8 decay, optional block
    RMS clipping, then momentum kept in `dtype_momentum`; no lr, no weight decay (those come later in the chain)."""

    def decay_fn(t: Any, exponent: float) -> jax.Array:
        return jnp.minimum(beta2_cap, 1.0 - (jnp.asarray(t, jnp.float32) + 1.0) ** (-exponent))

    return optax.chain(
        optax.scale_by_factored_rms(
            factored=True,
            decay_rate=decay_rate,
            step_offset=decay_offset,
            min_dim_size_to_factor=min_dim_size_to_factor,
            epsilon=eps,
            decay_rate_fn=decay_fn,
        ),
        optax.clip_by_block_rms(clipping_threshold) if clipping_threshold else optax.identity(),
        optax.ema(momentum, debias=False, accumulator_dtype=dtype_momentum) if momentum else optax.identity(),
    )


def _momentum_hp(
    momentum: float = 0.9, dtype: Any = jnp.bfloat16, nesterov: bool = False
) -> optax.GradientTransformation:
    """SGD momentum with a half-precision accumulator (big_vision.momentum_hp)."""
    return optax.trace(decay=momentum, nesterov=nesterov, accumulator_dtype=dtype)


# Names that are not plain `optax.<name>` gradient scalers. "adam"/"adamw" are `scale_by_adam`: the lr comes from
# `config.lr` and the decoupled weight decay from `config.wd`, later in the chain.
_OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "big_vision.sgd": optax.identity,
    "sgd": optax.identity,
    "big_vision.momentum_hp": _momentum_hp,
    "momentum": _momentum_hp,
    "big_vision.scale_by_adafactor": _adafactor,
    "scale_by_adafactor": _adafactor,
    "adafactor": _adafactor,
    "adam": optax.scale_by_adam,
    "adamw": optax.scale_by_adam,
}


def _base_optimizer(name: str, kwargs: dict) -> optax.GradientTransformation:
    if "lr" in kwargs or "learning_rate" in kwargs or "weight_decay" in kwargs:
        raise ValueError(
            "config.optax must not hold lr / learning_rate / weight_decay: use config.lr, "
            "config.lr_mults, config.wd and config.wd_mults."
        )
    fn = _OPTIMIZERS.get(name)
    if fn is None and name.startswith("scale_by_"):
        fn = getattr(optax, name, None)
    if fn is None:
        raise ValueError(
            f"Unknown config.optax_name {name!r}; use one of {sorted(_OPTIMIZERS)} or an optax.scale_by_* name."
        )
    try:
        return fn(**kwargs)
    except TypeError as e:
        raise ValueError(f"config.optax={kwargs} does not fit optimizer {name!r}: {e}") from e


def make_optimizer(
    config: Any,
    params: PyTree,
    *,
    total_steps: int | None = None,
    batch_size: int | None = None,
    data_size: int | None = None,
) -> tuple[optax.GradientTransformation, list[Schedule]]:
    """Builds big_vision's optax chain from the config (reference 7.2).

    Chain: clip_by_global_norm (trainable only) -> optimizer (trainable only) -> scale(lr) [-> lr_mults] ->
    add_decayed_weights(wd * mult) on `wd_mults` masks -> scale_by_schedule per schedule rule -> set_to_zero on
    frozen -> scale(-1). Keys: `optax_name` (default "scale_by_adam"), `optax` (kwargs), `lr` (default 1.0),
    `wd` (default 0), `wd_mults` (default `[(".*/kernel$", 1.0)]`), `lr_mults`, `grad_clip_norm`, `schedule`,
    `total_steps`, and `schedule_step_offset` (not in big_vision, default 0): the update with count c uses the
    schedule at c + offset of a (total_steps + offset)-step schedule. The colab evaluates a 65-step schedule at
    steps 1..64, i.e. `total_steps=64, schedule_step_offset=1`, so that no update has lr 0.

    Args:
      config: dict or ConfigDict.
      params: parameters or `jax.ShapeDtypeStruct`s (only names and tree structure are used).
      total_steps, batch_size, data_size: for the schedule; `total_steps` defaults to `steps("total", config, ...)`.

    Returns:
      `(tx, sched_fns)`: the transformation and one schedule multiplier per non-frozen schedule rule, as functions
      of the optimizer's update count (lr logged at count c is `config.lr * sched_fns[0](c)`).

    Raises:
      ValueError: naming the first parameter no schedule rule matches, an unknown optimizer, or bad multipliers.
    """
    config = config_base.complete(config)
    rules = _schedule_rules(config.schedule)
    masks = _rule_masks(params, rules, "schedule (config.schedule)", require_all=True)
    frozen = jax.tree.map(
        lambda *ms: any(ms), *[m for m, (_, s) in zip(masks, rules) if s is None], jax.tree.map(lambda _: False, params)
    )
    trainable = jax.tree.map(operator.not_, frozen)

    offset = int(config.schedule_step_offset or 0)
    if total_steps is None:
        total_steps = steps("total", config, data_size, batch_size)
    sched_fns, sched_txs = [], []
    for mask, (pattern, sched) in zip(masks, rules):
        if sched is None:
            continue
        sched = dict(sched)
        if "base" in sched:
            raise ValueError(f"config.schedule for {pattern!r} sets 'base'; use 'mult' (the lr is config.lr).")
        mult = sched.pop("mult", 1.0)
        fn = create_learning_rate_schedule(total_steps + offset, batch_size, data_size, base=mult, **sched)
        shifted = (lambda c, fn=fn: fn(c + offset)) if offset else fn
        sched_fns.append(shifted)
        sched_txs.append(optax.masked(optax.scale_by_schedule(shifted), mask))

    clip_norm = config.grad_clip_norm
    clip_tx = optax.masked(optax.clip_by_global_norm(clip_norm), trainable) if clip_norm else optax.identity()
    opt_kwargs = _as_dict(config.optax or {})
    opt_tx = optax.masked(_base_optimizer(config.optax_name, opt_kwargs), trainable)

    lr_txs = [optax.scale(config.lr)]
    if lr_mults := config.lr_mults:
        if any(m <= 0 for _, m in lr_mults):
            raise ValueError(f"config.lr_mults must be > 0 (freeze with schedule=None instead): {lr_mults}")
        for m, (_, mult) in zip(_rule_masks(params, lr_mults, "config.lr_mults", require_all=False), lr_mults):
            lr_txs.append(optax.masked(optax.scale(mult), m))

    wd = config.wd or 0.0
    wd_mults = config.wd_mults
    wd_txs = [
        optax.add_decayed_weights(wd * mult, m)  # Decoupled: scaled by the schedule only, never by lr.
        for m, (_, mult) in zip(_rule_masks(params, wd_mults, "config.wd_mults", require_all=False), wd_mults)
        if wd * mult
    ]

    # Frozen leaves: `masked` above gave them no state; zeroing here also cancels weight decay on them.
    zero_tx = optax.masked(optax.set_to_zero(), frozen)
    return optax.chain(clip_tx, opt_tx, *lr_txs, *wd_txs, *sched_txs, zero_tx, optax.scale(-1.0)), sched_fns


def count_state_arrays(opt_state: PyTree) -> int:
    """Number of array leaves in an optimizer state (frozen leaves contribute none: they are MaskedNodes)."""
    return len(jax.tree.leaves(opt_state))


# --- Losses --------------------------------------------------------------------------------------------------


def _token_nll(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    """Per-token cross-entropy f32[...] against one-hot targets smoothed to 1 - ls (true) and ls / (V - 1)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logp_true = jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if not label_smoothing:
        return -logp_true
    vocab = logits.shape[-1]
    if vocab < 2:
        raise ValueError("label_smoothing needs a vocabulary of at least 2 tokens.")
    # -sum_v logp_v * t_v without building the [..., V] targets: the off-target mass is spread uniformly.
    logp_rest = jnp.sum(logp, axis=-1) - logp_true
    return -(1.0 - label_smoothing) * logp_true - label_smoothing / (vocab - 1) * logp_rest


def _reduce(nll: jax.Array, mask: jax.Array, reduction: str) -> jax.Array:
    """Masks per-token losses f32[B, ...] and reduces them (see `softmax_xent`)."""
    mask = mask.astype(bool)
    nll = jnp.where(mask, nll, 0.0)  # `where`, not `*`: a masked position may hold inf/nan.
    if reduction == "none":
        return nll
    maskf = mask.astype(jnp.float32)
    if reduction == "token_mean":
        return jnp.sum(nll) / jnp.maximum(jnp.sum(maskf), 1.0)
    if reduction == "example_mean":
        if nll.ndim < 2:
            raise ValueError(
                "reduction='example_mean' needs per-example token axes ([B, T] labels); use "
                "'token_mean' or 'none' for a flat [M] list of positions."
            )
        axes = tuple(range(1, nll.ndim))
        return jnp.mean(jnp.sum(nll, axis=axes) / jnp.maximum(jnp.sum(maskf, axis=axes), 1.0))
    raise ValueError(f"Unknown reduction {reduction!r}; use example_mean, token_mean or none.")


def softmax_xent(
    logits: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    *,
    label_smoothing: float = 0.0,
    reduction: str = "example_mean",
) -> jax.Array:
    """big_vision's PaliGemma training loss.

    Args:
      logits: [B, T, V] (any float dtype; computed in float32).
      labels: i32[B, T] target tokens (`text[:, 1:]`).
      mask: [B, T] 1 where the token carries loss (`mask_loss[:, 1:]`).
      label_smoothing: ls; targets are 1 - ls on the true token and ls / (V - 1) elsewhere.
      reduction: "example_mean" (big_vision: per-example sum / max(#supervised, 1), then the mean over all B
        examples, an all-masked example counting as 0), "token_mean" (sum / max(#supervised, 1) over the batch)
        or "none" (masked per-token losses f32[B, T]).

    Returns:
      f32[] loss (or f32[B, T] for "none").
    """
    return _reduce(_token_nll(logits, labels, label_smoothing), mask, reduction)


def chunked_softmax_xent(
    pre_logits: jax.Array,
    embedding: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    *,
    chunk: int = 512,
    label_smoothing: float = 0.0,
    reduction: str = "example_mean",
) -> jax.Array:
    """`softmax_xent(pre_logits @ embedding.T, ...)` computed `chunk` positions at a time.

    Only f32[chunk, V] logits exist at once, forward and backward (each chunk is rematerialized in the backward
    pass), so a 257k vocabulary does not cost [B * T, V] float32 memory. Pass only the positions that can carry
    loss (e.g. the text part after the image tokens).

    The product runs in the compute dtype, pre_logits' dtype, with float32 accumulation
    (`preferred_element_type`): the table is cast to it inside each chunk, so bfloat16 pre-logits never make a
    float32 copy of the [V, D] table, and a float32 master table's gradient is summed over chunks in float32.
    float32 pre-logits give the plain float32 product.

    Args:
      pre_logits: [B, T, D] (or [M, D] for reductions "token_mean" / "none") in the compute dtype.
      embedding: [V, D] tied output embedding (`llm/embedder/input_embedding`) in its stored dtype.
      labels: i32[B, T] (or [M]); mask: [B, T] (or [M]).
      chunk: positions per chunk; the flattened positions are zero-padded to a multiple of it.
    """
    lead, width = labels.shape, pre_logits.shape[-1]
    h, y = pre_logits.reshape(-1, width), labels.reshape(-1)
    n = h.shape[0]
    chunk = max(1, min(chunk, n))
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    h = jnp.pad(h, ((0, pad), (0, 0))).reshape(n_chunks, chunk, width)
    y = jnp.pad(y, (0, pad)).reshape(n_chunks, chunk)

    @jax.checkpoint  # Save only the chunk's inputs; recompute its [chunk, V] logits in the backward pass.
    def chunk_nll(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        hc, yc = args
        logits = precision.dot(hc, embedding, transpose_w=True, out_dtype=jnp.float32)  # As the model's decode.
        return _token_nll(logits, yc, label_smoothing)

    nll = jax.lax.map(chunk_nll, (h, y)).reshape(-1)[:n].reshape(lead)
    return _reduce(nll, mask, reduction)


# --- Gradient accumulation -----------------------------------------------------------------------------------


def accumulate_gradients(
    loss_and_grad_fn: Callable[[PyTree, PyTree], tuple[Any, PyTree]], params: PyTree, batch: PyTree, micro_batches: int
) -> tuple[Any, PyTree]:
    """Mean of `loss_and_grad_fn(params, micro_batch)` over `micro_batches` equal slices of `batch` (jittable).

    With equal-sized micro-batches, the mean of per-micro-batch example means is the full-batch example mean, so
    the result matches one big step (a "token_mean" loss would not average exactly). Micro-batch j takes
    examples j, j + M, j + 2M, ...: reshaping [B] to [B / M, M] keeps each device's rows on that device when B
    is sharded, unlike contiguous slices. Sums are kept in float32 and cast back to the gradient's dtype.

    Args:
      loss_and_grad_fn: `(params, batch) -> (value, grads)`, e.g. `jax.value_and_grad(loss)`; `value` may be a
        pytree such as `(loss, aux)`, averaged like the gradients.
      batch: pytree of arrays with a leading batch axis B divisible by `micro_batches`.
      micro_batches: M >= 1.
    """
    if micro_batches <= 1:
        return loss_and_grad_fn(params, batch)
    sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1 or next(iter(sizes)) % micro_batches:
        raise ValueError(f"Batch sizes {sorted(sizes)} must be equal and divisible by micro_batches={micro_batches}.")
    split = jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]), 0, 1), batch
    )
    first = jax.tree.map(lambda x: x[0], split)
    out_shape = jax.eval_shape(loss_and_grad_fn, params, first)
    acc_dtype = lambda s: jnp.float32 if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype  # noqa: E731
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, acc_dtype(s)), out_shape)

    def body(acc: PyTree, micro: PyTree) -> tuple[PyTree, None]:
        out = loss_and_grad_fn(params, micro)
        return jax.tree.map(lambda a, o: a + o.astype(a.dtype), acc, out), None

    total, _ = jax.lax.scan(body, zeros, split)
    return jax.tree.map(lambda t, s: (t / micro_batches).astype(s.dtype), total, out_shape)


def global_norm_of(tree: PyTree) -> jax.Array:
    """f32[] L2 norm over all leaves (what big_vision logs as `l2_grads` / `l2_params`)."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)) if leaves else jnp.zeros(())


def describe_trainable(params: PyTree, config: Any) -> dict[str, int]:
    """Counts of parameters {"trainable": n, "frozen": n} under `config.schedule` (for the start-up overview)."""
    mask = dict(tree_flatten_with_names(trainable_mask(params, config_base.complete(config).schedule)))
    counts = {"trainable": 0, "frozen": 0}
    for name, leaf in tree_flatten_with_names(params):
        counts["trainable" if mask[name] else "frozen"] += int(math.prod(leaf.shape))
    return counts
