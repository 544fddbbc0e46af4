"""The training step: one pure function, and the one place it is jitted (with shardings and buffer donation).

`train_step(state, batch, ...)` is what the trainer runs, what `paligemma-ft plan` compiles from shapes and what
`bench/bench_train.py` times; `jit_train_step` builds its jitted form for all three. This module imports only
JAX, optax, the model and the loss (no data pipeline, no checkpointing), so benchmarks run it on a bare image.

The state is a plain dict: `{"params": PyTree, "opt": optax state, "step": i32[], "rng": u32[2]}`. The batch is
the trainer's layout: `image f32[B, R, R, 3]`, `text, mask_ar, mask_loss i32[B, L + 1]`, `_mask bool[B]`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from paligemma_ft.model import Model
from paligemma_ft.training import optim
from paligemma_ft.training.losses import loss_fn

PyTree = Any
# `(params, batch, rng) -> f32[]`: the loss hook (default: `losses.loss_fn` with the step's settings).
LossFn = Callable[[PyTree, Mapping[str, jax.Array], jax.Array], jax.Array]
METRIC_KEYS = ("train/loss", "train/grad_norm", "train/loss_tokens", "train/truncated")  # Plus "train/lr".


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static settings of `train_step` (hashable, so one jit covers them).

    Attributes:
      label_smoothing, reduction: loss options (`config.label_smoothing`, `config.loss_reduction`).
      micro_batches: gradient accumulation (`config.grad_accum_steps`): the batch is split into equal slices.
      lr: the peak learning rate, to report `train/lr` (the schedule multiplier of the update times `lr`).
      eos_id: the tokenizer's end-of-sequence id: a sequence that fills `L + 1` tokens and does not end with it
        was cut (counted in `train/truncated`).
    """

    label_smoothing: float = 0.0
    reduction: str = "example_mean"
    micro_batches: int = 1
    lr: float = 1.0
    eos_id: int = 1

    @classmethod
    def from_config(cls, config: Any, eos_id: int = 1) -> StepConfig:
        """From a completed run config (`label_smoothing`, `loss_reduction`, `grad_accum_steps`, `lr`)."""
        return cls(
            label_smoothing=float(config.label_smoothing),
            reduction=str(config.loss_reduction),
            micro_batches=int(config.grad_accum_steps),
            lr=float(config.lr),
            eos_id=int(eos_id),
        )


def data_metrics(batch: Mapping[str, jax.Array], eos_id: int) -> dict[str, jax.Array]:
    """What the batch holds for the loss, computed where the batch lives (global counts on any mesh).

    Returns:
      `train/loss_tokens`: f32[] mean loss positions per example (0 for every example: nothing is learned);
      `train/truncated`: f32[] examples whose sequence was cut at `L + 1` tokens (the last position holds a token
      that is neither padding, 0, nor EOS: an over-long target lost its end, or the prefix filled everything).
    """
    rows = batch["_mask"].astype(jnp.float32)
    tokens = batch["mask_loss"][:, 1:].sum(axis=1).astype(jnp.float32)
    last = batch["text"][:, -1]
    cut = ((last != 0) & (last != eos_id)).astype(jnp.float32)
    n = jnp.maximum(rows.sum(), 1.0)
    return {"train/loss_tokens": (tokens * rows).sum() / n, "train/truncated": (cut * rows).sum()}


def train_step(
    state: dict,
    batch: Mapping[str, jax.Array],
    *,
    model: Model,
    tx: optax.GradientTransformation,
    trainable: PyTree,
    step_cfg: StepConfig = StepConfig(),
    sched_fn: Callable[[jax.Array], jax.Array] | None = None,
    loss: LossFn | None = None,
) -> tuple[dict, dict[str, jax.Array]]:
    """One update. Pure: the state in (see the module docstring), the next state and f32[] metrics out.

    Args:
      model: the model the default loss applies.
      tx: the optimizer (`optim.make_optimizer`).
      trainable: a pytree of Python bools like the params; only trainable leaves are differentiated (frozen ones
        may be integer, e.g. a QLoRA base), so XLA computes no gradient for frozen leaves (nor the backward pass
        through fully frozen towers).
      step_cfg: loss options, `micro_batches` and the EOS id (see `StepConfig`).
      sched_fn: the learning-rate schedule (multiplier) of the trainable parameters, to report `train/lr`.
      loss: replaces the trainer's loss (`losses.loss_fn`); benchmarks use it to time another formulation.

    Returns:
      `(state, metrics)`: `train/loss`, `train/grad_norm` (over trainable gradients), `train/loss_tokens`,
      `train/truncated` (see `data_metrics`) and, when `sched_fn` is given, `train/lr`.
    """
    rng, step_rng = jax.random.split(state["rng"])
    step_rng = jax.random.fold_in(step_rng, state["step"])
    if loss is None:
        loss = functools.partial(
            loss_fn, model=model, label_smoothing=step_cfg.label_smoothing, reduction=step_cfg.reduction
        )
    # Differentiate the trainable leaves only: frozen ones may be integers (a QLoRA base's codes), and their
    # gradients would never be used. Frozen leaves get zeros after accumulation (dead code for XLA), so the
    # optimizer sees the usual tree and accumulation carries only the trainable gradients.
    mask, treedef = jax.tree.leaves(trainable), jax.tree.structure(state["params"])
    leaves = jax.tree.leaves(state["params"])

    def loss_of_trained(trained: list, b: Mapping[str, jax.Array]) -> jax.Array:
        it = iter(trained)
        return loss(jax.tree.unflatten(treedef, [next(it) if t else x for x, t in zip(leaves, mask)]), b, step_rng)

    grad_fn = jax.value_and_grad(loss_of_trained)
    value, trained_grads = optim.accumulate_gradients(
        grad_fn, [x for x, t in zip(leaves, mask) if t], batch, step_cfg.micro_batches
    )
    it = iter(trained_grads)
    grads = jax.tree.unflatten(treedef, [next(it) if t else jnp.zeros_like(x) for x, t in zip(leaves, mask)])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # apply_updates promotes e.g. float16 + float32 zero; keep every leaf's storage dtype (frozen ones unchanged).
    params = jax.tree.map(lambda new, old, t: new.astype(old.dtype) if t else old, params, state["params"], trainable)
    metrics = {"train/loss": value, "train/grad_norm": optim.global_norm_of(trained_grads)}
    metrics.update(data_metrics(batch, step_cfg.eos_id))
    if sched_fn is not None:
        metrics["train/lr"] = step_cfg.lr * sched_fn(state["step"])
    return {"params": params, "opt": opt, "step": state["step"] + 1, "rng": rng}, metrics


def jit_train_step(
    model: Model,
    tx: optax.GradientTransformation,
    trainable: PyTree,
    step_cfg: StepConfig = StepConfig(),
    *,
    sched_fn: Callable[[jax.Array], jax.Array] | None = None,
    state_shardings: PyTree | None = None,
    batch_sharding: jax.sharding.Sharding | None = None,
    loss: LossFn | None = None,
) -> Any:
    """`train_step` jitted: the state's buffers are donated (updated in place), inputs and outputs placed.

    Args:
      state_shardings: a tree of shardings like the state (`training.setup.Setup.state_shard`); the metrics come
        back replicated like `step`. None (one device, benchmarks): placement is left to JAX.
      batch_sharding: the sharding of every batch array (`sharding.batch_sharding(mesh)`).
      Others: as `train_step`.

    Returns:
      A `jax.jit` function `(state, batch) -> (state, metrics)`; lower it with abstract inputs to compile without
      running (`plan`), or call it.
    """
    fn = functools.partial(
        train_step, model=model, tx=tx, trainable=trainable, step_cfg=step_cfg, sched_fn=sched_fn, loss=loss
    )
    if state_shardings is None:
        return jax.jit(fn, donate_argnums=0)
    metrics_sharding = state_shardings["step"]  # Scalars, replicated.
    return jax.jit(
        fn,
        donate_argnums=0,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, metrics_sharding),
    )
