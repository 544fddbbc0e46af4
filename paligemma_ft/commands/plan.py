"""`paligemma-ft plan`: will this config fit, and what to change if not, before paying for a run.

    paligemma-ft plan --config configs/demo.py
    paligemma-ft plan --config my.py --config.model_name_or_preset=pg2_3b_224 --device H100 [--arithmetic-only]

Builds everything the trainer builds before it computes (model shapes with `jax.eval_shape`, mesh, parameter and
optimizer shardings, storage dtypes, the optimizer: `paligemma_ft.training.setup.setup`), then lowers and compiles
the trainer's own jitted step (`paligemma_ft.training.step.jit_train_step`) for abstract inputs on the configured
mesh without running it or allocating a parameter. It reports per device: parameters, optimizer state, the batch,
and XLA's temporary buffers (activations, gradients, workspace) from `compiled.memory_analysis()`; with
`--arithmetic-only` (or when the backend gives no analysis) the temporaries come from a rough arithmetic estimate
instead. Compiling on a CPU for a GPU or TPU target gives the CPU compiler's figures: the target fuses differently,
so treat them as estimates.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paligemma_ft import config_base
from paligemma_ft import flops as flops_lib
from paligemma_ft import sharding as sharding_lib
from paligemma_ft.utils import tree_flatten_with_names

GiB = 2**30
_HEADROOM = 0.9  # Plan for 90 % of the device memory: allocators fragment and runtimes reserve some.


def _per_device_bytes(shapes: Any, shardings: Any) -> int:
    """Bytes one device holds of `shapes` (ShapeDtypeStructs) placed with `shardings` (the largest shard)."""
    total = 0
    for (_, s), sh in zip(tree_flatten_with_names(shapes), jax.tree.leaves(shardings)):
        total += math.prod(sh.shard_shape(tuple(s.shape))) * np.dtype(s.dtype).itemsize
    return total


@dataclasses.dataclass
class Plan:
    """A memory plan. Byte counts are per device."""

    device_kind: str
    devices: int
    mesh: dict[str, int]
    batch_size: int  # Global.
    per_device_batch: int  # Examples each device processes per step (all micro-batches together).
    micro_batches: int
    res: int
    text_len: int
    params: int  # Counts (global).
    trainable: int
    param_bytes: int
    opt_bytes: int
    batch_bytes: int
    temp_bytes: int  # Activations, gradients, workspace.
    peak_bytes: int  # What the step needs at once.
    source: str  # Where `temp_bytes` comes from.
    compile_seconds: float | None
    memory_limit: float | None
    memory_source: str
    flops_per_example: float
    remat: dict[str, str]
    suggestions: list[str] = dataclasses.field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        """None when the device memory is unknown."""
        return None if self.memory_limit is None else self.peak_bytes <= _HEADROOM * self.memory_limit


# --- Arithmetic estimate of the step's temporaries ---------------------------------------------------------------


def _tower_activation_bytes(
    tokens: int, width: int, mlp: int, qkv_width: int, heads: int, depth: int, policy: str, act: int
) -> float:
    """Rough bytes for one example's activations in one tower (attention logits/probs in float32).

    Saved for the backward pass: the block inputs under "full" remat, matmul outputs under "dots", everything
    under "none"; plus one block's working set, recomputed during the backward pass.
    """
    scores = 2 * heads * tokens * tokens * 4  # f32 logits and probabilities.
    one_block = tokens * (6 * width + 3 * mlp + 2 * qkv_width) * act + scores
    saved = {
        "full": tokens * width * act,
        "dots": tokens * (3 * width + 2 * qkv_width + 2 * mlp) * act + scores / 2,
    }.get(policy, one_block)
    return depth * saved + one_block


def _policy(name: str | None) -> str:
    name = name or "nothing_saveable"
    return {
        "nothing_saveable": "full",
        "everything_saveable": "none",
        "dots_saveable": "dots",
        "dots_with_no_batch_dims_saveable": "dots",
    }.get(name, name)


def estimate_temp_bytes(
    model_cfg: dict,
    res: int,
    text_len: int,
    per_device_batch: int,
    grad_bytes: int,
    act_bytes: int = 4,
    chunk: int = 512,
) -> float:
    """Rough per-device temporaries of one step: activations of `per_device_batch` examples (per micro-batch),
    gradients and optimizer-update scratch (2 x `grad_bytes`), and one chunk of float32 vocabulary logits."""
    img, llm = flops_lib._resolve(model_cfg)  # noqa: SLF001 - same package.
    p = flops_lib._image_tokens(img, res)  # noqa: SLF001
    t = p + text_len
    per_example = _tower_activation_bytes(
        p,
        img["width"],
        img.get("mlp_dim") or 4 * img["width"],
        3 * img["width"],
        img["num_heads"],
        img["depth"],
        _policy(img.get("remat_policy")) if img.get("scan") else "none",
        act_bytes,
    )
    per_example += _tower_activation_bytes(
        t,
        llm["width"],
        2 * llm["mlp_dim"],
        (llm["num_heads"] + 2 * llm["num_kv_heads"]) * llm["head_dim"],
        llm["num_heads"],
        llm["depth"],
        _policy(llm.get("remat_policy")) if llm.get("scan", True) else "none",
        act_bytes,
    )
    logits = 3 * min(chunk, per_device_batch * text_len) * llm["vocab_size"] * 4
    return per_device_batch * per_example + 2 * grad_bytes + logits


# --- The plan ------------------------------------------------------------------------------------------------


def _memory_limit(memory_gib: float | None, device: str | None) -> tuple[float | None, str]:
    if memory_gib is not None:
        return memory_gib * GiB, "given (--memory-gib)"
    if device is not None:
        limit = flops_lib.device_memory(device)
        return limit, (f"nominal for {device!r}" if limit else f"unknown device {device!r}")
    local = jax.devices()[0]
    stats = local.memory_stats() if hasattr(local, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"]), f"allocator limit of the local {local.device_kind}"
    limit = flops_lib.device_memory(local)
    return limit, (f"nominal for {local.device_kind}" if limit else "unknown (give --memory-gib or --device)")


def _abstract_batch(batch: int, res: int, text_len: int, sharding: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """The trainer's batch layout (see docs/design.md) as shapes placed on the batch sharding."""
    tokens = jax.ShapeDtypeStruct((batch, text_len + 1), jnp.int32, sharding=sharding)
    return {
        "image": jax.ShapeDtypeStruct((batch, res, res, 3), jnp.float32, sharding=sharding),
        "text": tokens,
        "mask_ar": tokens,
        "mask_loss": tokens,
        "_mask": jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=sharding),
    }


def make_plan(
    config: Any, *, memory_gib: float | None = None, device: str | None = None, arithmetic_only: bool = False
) -> Plan:
    """Builds the trainer's setup for `config` and sizes one training step per device (nothing is allocated).

    Args:
      config: a training config (ConfigDict), as `paligemma-ft train` takes.
      memory_gib: device memory to plan for; else `device`'s nominal memory ("H100", "TPU v5 lite"), else the
        local accelerator's allocator limit, else unknown.
      arithmetic_only: skip compiling; estimate temporaries with `estimate_temp_bytes`.
    """
    from paligemma_ft.training import setup as setup_lib  # noqa: PLC0415 - the trainer's set-up and step, lazily.
    from paligemma_ft.training import step as step_lib  # noqa: PLC0415

    config = config_base.complete(config)
    s = setup_lib.setup(config, shapes_only=True)  # Shapes only: no data, tokenizer or (with a preset) checkpoint.
    batch_size = int(config.input.batch_size)
    micro = int(config.grad_accum_steps)
    abstract_batch = _abstract_batch(batch_size, s.res, s.text_len, s.batch_shard)
    param_bytes = _per_device_bytes(s.state_abstract["params"], s.state_shard["params"])
    opt_bytes = _per_device_bytes(s.state_abstract["opt"], s.state_shard["opt"])
    batch_bytes = _per_device_bytes(abstract_batch, jax.tree.map(lambda x: x.sharding, abstract_batch))
    trainable_shapes = [
        x for x, t in zip(jax.tree.leaves(s.state_abstract["params"]), jax.tree.leaves(s.trainable)) if t
    ]
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(s.state_abstract["params"]))
    n_trainable = sum(math.prod(x.shape) for x in trainable_shapes)
    shards = max(1, math.prod(s.mesh.shape[a] for a in sharding_lib.batch_axes(s.mesh)))
    model_cfg = {"img": dict(s.model.img or {}), "llm": dict(s.model.llm or {})}
    llm_cfg = model_cfg["llm"]
    act_bytes = np.dtype(llm_cfg.get("embed_dtype", "float32")).itemsize

    compile_s, source = None, "arithmetic estimate (rough)"
    grad_bytes = int(param_bytes * n_trainable / max(n_params, 1))
    temp = estimate_temp_bytes(
        model_cfg, s.res, s.text_len, max(1, batch_size // shards // micro), grad_bytes, act_bytes
    )
    peak = param_bytes + opt_bytes + batch_bytes + temp
    if not arithmetic_only:
        step_fn = step_lib.jit_train_step(  # Exactly the trainer's (its EOS id only counts truncations).
            s.model,
            s.tx,
            s.trainable,
            step_lib.StepConfig.from_config(config),
            sched_fn=s.sched_fn,
            state_shardings=s.state_shard,
            batch_sharding=s.batch_shard,
        )
        t0 = time.perf_counter()
        compiled = step_fn.lower(s.state_abstract, abstract_batch).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        if mem is not None and getattr(mem, "argument_size_in_bytes", None) is not None:
            temp = int(mem.temp_size_in_bytes)
            # Inputs stay alive; outputs that reuse donated inputs need no new memory.
            peak = int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + temp)
            source = f"XLA memory analysis ({jax.devices()[0].platform} compiler)"
    limit, limit_source = _memory_limit(memory_gib, device)
    plan = Plan(
        device_kind=device or jax.devices()[0].device_kind,
        devices=s.mesh.size,
        mesh=dict(s.mesh.shape),
        batch_size=batch_size,
        per_device_batch=max(1, batch_size // shards),
        micro_batches=micro,
        res=s.res,
        text_len=s.text_len,
        params=n_params,
        trainable=n_trainable,
        param_bytes=param_bytes,
        opt_bytes=opt_bytes,
        batch_bytes=batch_bytes,
        temp_bytes=int(temp),
        peak_bytes=int(peak),
        source=source,
        compile_seconds=compile_s,
        memory_limit=limit,
        memory_source=limit_source,
        flops_per_example=flops_lib.train_flops_per_example(
            model_cfg, s.res, s.text_len, trainable=s.trainable, lora=s.model.lora
        ),
        remat={t: _policy(model_cfg[t].get("remat_policy")) for t in ("img", "llm")},
    )
    plan.suggestions = suggest(plan)
    return plan


def suggest(plan: Plan) -> list[str]:
    """What to change when the plan does not fit (or fits narrowly), most effective first, with estimates."""
    if plan.memory_limit is None:
        return ["Device memory unknown: pass --memory-gib N or --device NAME (H100, H200, A100, TPU v4, TPU v5e)."]
    budget = _HEADROOM * plan.memory_limit
    if plan.peak_bytes <= 0.8 * budget:
        return []
    out = []
    state = plan.param_bytes + plan.opt_bytes + plan.batch_bytes
    grads = plan.param_bytes * plan.trainable / max(plan.params, 1)
    activations = max(plan.temp_bytes - 2 * grads, 0.0)
    per_device = plan.per_device_batch
    for m in (2, 4, 8, 16, 32, 64):
        if m * plan.micro_batches > per_device or per_device % (m * plan.micro_batches):
            break
        if state + 2 * grads + activations / m <= budget:
            out.append(
                f"Micro-batches: --config.grad_accum_steps={m * plan.micro_batches} (same batch, "
                f"~{_gib(state + 2 * grads + activations / m)} GiB per device)."
            )
            break
    if any(p != "full" for p in plan.remat.values()):
        out.append(
            "Rematerialization: --config.model.llm.remat_policy=full and --config.model.img.remat_policy=full "
            "(recompute each block in the backward pass; ~30 % more compute)."
        )
    if plan.trainable > 0.5 * plan.params:
        out.append(
            "Trainable set: train fewer parameters, e.g. the colab's attention-only recipe "
            "config.schedule=[('llm/layers/attn/.*', {...}), ('.*', None)]: frozen parameters carry no "
            f"optimizer state (now {_gib(plan.opt_bytes)} GiB per device)."
        )
    if plan.param_bytes > 0.25 * budget:
        out.append(
            "Dtypes: --config.frozen_dtype=bfloat16 (frozen weights in 2 bytes) and bfloat16 optimizer "
            "moments (e.g. optax_name='big_vision.scale_by_adafactor' keeps momentum in bfloat16)."
        )
    if state > budget:
        out.append(
            f"Sharding: parameters and optimizer state alone need {_gib(state)} GiB per device; shard them "
            "over more devices (fsdp) or use a device with more memory."
        )
    return out or ["Lower input.batch_size or input.text_len: nothing else obvious fits."]


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def format_bytes(x: float) -> str:
    """`12.34 MiB` below 1 GiB, else `1.23 GiB`."""
    return f"{x / 2**20:.2f} MiB" if x < GiB else f"{x / GiB:.2f} GiB"


def format_plan(plan: Plan) -> str:
    """The report `paligemma-ft plan` prints."""
    mesh = ", ".join(f"{k}={v}" for k, v in plan.mesh.items())
    fits = {None: "unknown", True: "yes", False: "NO"}[plan.fits]
    limit = "unknown" if plan.memory_limit is None else format_bytes(plan.memory_limit)
    lines = [
        f"Plan: {plan.devices} x {plan.device_kind}, mesh ({mesh}); batch {plan.batch_size} "
        f"({plan.micro_batches} micro-batch{'es' if plan.micro_batches > 1 else ''}), {plan.res} px, "
        f"text {plan.text_len} tokens; remat img={plan.remat['img']} llm={plan.remat['llm']}",
        f"Parameters: {plan.params:,} ({plan.trainable:,} trainable)",
        f"Training FLOPs per example: {plan.flops_per_example:.4g}",
        "Per device:",
        f"  parameters          {format_bytes(plan.param_bytes):>12}",
        f"  optimizer state     {format_bytes(plan.opt_bytes):>12}",
        f"  batch               {format_bytes(plan.batch_bytes):>12}",
        f"  temporaries         {format_bytes(plan.temp_bytes):>12}  (activations, gradients, workspace: "
        f"{plan.source})",
        f"  peak                {format_bytes(plan.peak_bytes):>12}",
        f"Device memory: {limit} ({plan.memory_source}); fits with 10 % headroom: {fits}",
    ]
    if plan.compile_seconds is not None:
        lines.append(f"Compiled the train step in {plan.compile_seconds:.1f} s (not run).")
    if plan.suggestions:
        lines.append("To fit:" if plan.fits is False else "Notes:")
        lines += [f"  - {s}" for s in plan.suggestions]
    return "\n".join(lines)


def simulate_cpu_devices(n: int) -> None:
    """Makes JAX show `n` CPU devices so a mesh for `n` accelerators can be planned on a laptop; must run before
    JAX starts its backends (the `plan` command calls it first).

    Raises:
      ValueError: when JAX's backends already started with another device count.
    """
    from jax._src import xla_bridge  # noqa: PLC0415 - the only way to ask whether backends started.

    if xla_bridge.backends_are_initialized():
        if jax.device_count() != n:
            raise ValueError(
                f"--devices {n}: JAX already started with {jax.device_count()} devices; run the plan "
                "in a fresh process."
            )
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
    jax.config.update("jax_platforms", "cpu")


def run(
    config: Any,
    workdir: str | None = None,
    *,
    memory_gib: float | None = None,
    device: str | None = None,
    arithmetic_only: bool = False,
    echo: Callable[[str], Any] = print,
) -> int:
    """Prints the plan (and writes `workdir/plan.json` when given). Returns 0 if it fits or memory is unknown,
    1 if it does not fit."""
    plan = make_plan(config, memory_gib=memory_gib, device=device, arithmetic_only=arithmetic_only)
    echo(format_plan(plan))
    if workdir:
        path = pathlib.Path(workdir) / "plan.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**dataclasses.asdict(plan), "fits": plan.fits}, indent=2) + "\n")
    return 1 if plan.fits is False else 0
