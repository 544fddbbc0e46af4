"""`paligemma-ft plan`: will this config fit, and what to change if not, before paying for a run.

    paligemma-ft plan --config configs/demo.py
    paligemma-ft plan --config my.py --config.model_name_or_preset=pg2_3b_224 --device H100 [--arithmetic-only]

Builds everything the trainer builds before it computes (model shapes with `jax.eval_shape`, mesh, parameter and
optimizer shardings, storage dtypes, the optimizer: `paligemma_ft.training.loop.setup`), then lowers and compiles the
trainer's own `train_step` for abstract inputs on the configured mesh without running it or allocating a
parameter. It reports per device: parameters, optimizer state, the batch, and XLA's temporary buffers
(activations, gradients, workspace) from `compiled.memory_analysis()`; with `--arithmetic-only` (or when the
backend gives no analysis) the temporaries come from a rough arithmetic estimate instead. Compiling on a CPU for a
GPU or TPU target gives the CPU compiler's figures: the target fuses differently, so treat them as estimates.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paligemma_ft import config_base
from paligemma_ft import flops as flops_lib
from paligemma_ft import sharding as sharding_lib
from paligemma_ft.commands.plan_estimate import estimate_temp_bytes
from paligemma_ft.model import precision
from paligemma_ft.model import remat as remat_lib
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
class PolicyRow:
    """One rematerialization policy (both towers) sized at the plan's batch. Bytes per device."""

    policy: str
    temp_bytes: int
    peak_bytes: int
    source: str
    largest_batch: int | None  # Global batch that fits (linear estimate); None when memory is unknown.
    fits: bool | None


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
    compute_dtype: str = "float32"
    compute_dtype_source: str = "config"
    policies: list[PolicyRow] = dataclasses.field(default_factory=list)  # One row per remat policy sized.

    @property
    def fits(self) -> bool | None:
        """None when the device memory is unknown."""
        return None if self.memory_limit is None else self.peak_bytes <= _HEADROOM * self.memory_limit


# --- The plan ------------------------------------------------------------------------------------------------


def _policy(name: str | None) -> str:
    return remat_lib.short_name(name)


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


def _with_compute_dtype(config: Any, device: str | None) -> tuple[Any, str, str]:
    """`(config, dtype, why)`: the config with `compute_dtype` resolved for the target (`--device`, else the local
    platform), since the step's activations, and so its memory, depend on it."""
    asked = config.compute_dtype
    platform = precision.device_platform(device)
    dtype = precision.resolve_compute_dtype(asked, platform)
    if asked not in (None, "", "auto"):
        why = "config.compute_dtype"
    else:
        why = f"auto for {platform or jax.devices()[0].platform}"
    config = copy.deepcopy(config)
    if hasattr(config, "unlocked"):
        with config.unlocked():
            config.compute_dtype = dtype
    else:
        config["compute_dtype"] = dtype
    return config, dtype, why


def _with_batch(config: Any, batch_size: int) -> Any:
    config = copy.deepcopy(config)
    ctx = config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext()
    with ctx:
        config.input.batch_size = batch_size
    return config


def _with_policy(config: Any, policy: str) -> Any:
    """The config with `model.img.remat_policy` and `model.llm.remat_policy` set to `policy`."""
    config = copy.deepcopy(config)
    ctx = config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext()
    with ctx:
        for tower in ("img", "llm"):
            config.model[tower]["remat_policy"] = policy
    return config


@dataclasses.dataclass
class _Sized:
    temp: float
    peak: float
    source: str
    compile_seconds: float | None
    step_bytes: float | None  # What one more example per micro-batch on each device adds; None: not measured.


def _size_step(config: Any, arithmetic_only: bool, slope: bool = False) -> tuple[Any, dict, _Sized]:
    """Sets up the trainer for `config` and sizes its step: `(setup, byte counts, sizes)` per device.

    The bytes each further example adds (`step_bytes`) come from the arithmetic estimate with `arithmetic_only`,
    else, with `slope`, from compiling the step a second time at twice the batch (memory is not quite linear in
    the batch: buffers get reused; the slope over a doubling averages that out); else they are not measured.
    """
    from paligemma_ft.training import setup as setup_lib  # noqa: PLC0415 - the trainer's set-up and step, lazily.
    from paligemma_ft.training import step as step_lib  # noqa: PLC0415

    s = setup_lib.setup(config, shapes_only=True)  # Shapes only: no data, tokenizer or (with a preset) checkpoint.
    batch_size = int(config.input.batch_size)
    micro = int(config.grad_accum_steps)
    abstract_batch = _abstract_batch(batch_size, s.res, s.text_len, s.batch_shard)
    counts = dict(
        param_bytes=_per_device_bytes(s.state_abstract["params"], s.state_shard["params"]),
        opt_bytes=_per_device_bytes(s.state_abstract["opt"], s.state_shard["opt"]),
        batch_bytes=_per_device_bytes(abstract_batch, jax.tree.map(lambda x: x.sharding, abstract_batch)),
        params=_weight_count(s),
        trainable=sum(
            math.prod(x.shape)
            for x, t in zip(jax.tree.leaves(s.state_abstract["params"]), jax.tree.leaves(s.trainable))
            if t
        ),
        shards=max(1, math.prod(s.mesh.shape[a] for a in sharding_lib.batch_axes(s.mesh))),
        micro=micro,
    )
    model_cfg = {"img": dict(s.model.img or {}), "llm": dict(s.model.llm or {})}
    act_bytes = np.dtype(precision.model_compute_dtype(model_cfg)).itemsize
    grad_bytes = int(counts["param_bytes"] * counts["trainable"] / max(counts["params"], 1))
    per_device = max(1, batch_size // counts["shards"] // micro)
    temp = estimate_temp_bytes(model_cfg, s.res, s.text_len, per_device, grad_bytes, act_bytes)
    more = estimate_temp_bytes(model_cfg, s.res, s.text_len, per_device + 1, grad_bytes, act_bytes) - temp
    state = counts["param_bytes"] + counts["opt_bytes"] + counts["batch_bytes"]
    step = more + micro * counts["batch_bytes"] / max(1, batch_size // counts["shards"])
    sized = _Sized(temp, state + temp, "arithmetic estimate (rough)", None, step)
    if arithmetic_only:
        return s, counts, sized
    sized.step_bytes = None
    if slope:
        _, _, doubled = _size_step(_with_batch(config, 2 * batch_size), False)
        per_micro = max(1, batch_size // counts["shards"] // micro)  # The doubling adds this many per micro-batch.
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
    sized.compile_seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    if mem is not None and getattr(mem, "argument_size_in_bytes", None) is not None:
        sized.temp = int(mem.temp_size_in_bytes)
        # Inputs stay alive; outputs that reuse donated inputs need no new memory.
        sized.peak = int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + sized.temp)
        sized.source = f"XLA memory analysis ({jax.devices()[0].platform} compiler)"
    if slope and doubled.peak > sized.peak:
        sized.step_bytes = (doubled.peak - sized.peak) / per_micro
    return s, counts, sized


def largest_batch(plan: Plan, peak_bytes: float, step_bytes: float | None) -> int | None:
    """The largest global batch whose step fits the plan's memory (10 % headroom), by a linear estimate: the peak
    at the plan's batch plus `step_bytes` for each further example per micro-batch on every device. A multiple of
    the data shards x micro-batches; 0 when not even that fits; None when the memory or the slope is unknown."""
    if plan.memory_limit is None or step_bytes is None:
        return None
    steps = math.floor((_HEADROOM * plan.memory_limit - peak_bytes) / max(step_bytes, 1.0))
    per_device = max(0, plan.per_device_batch + steps * plan.micro_batches)
    return per_device * max(1, plan.batch_size // plan.per_device_batch)


def _weight_count(s: Any) -> int:
    """The model's weights: every parameter's elements, a quantized (QLoRA) weight counted as the weight it
    stores (nf4 packs two per byte; its block scales are storage, not weights)."""
    from paligemma_ft.model import lora as lora_lib  # noqa: PLC0415

    flat = {k: tuple(v.shape) for k, v in tree_flatten_with_names(s.state_abstract["params"])}
    quantized = lora_lib.quantized_weights(flat, s.model.lora.quant) if s.model.lora is not None else {}
    stored = {n for _, codes, scales in quantized.values() for n in (codes, scales)}
    return sum(math.prod(v) for k, v in flat.items() if k not in stored) + sum(
        math.prod(shape) for shape, _, _ in quantized.values()
    )


def make_plan(
    config: Any,
    *,
    memory_gib: float | None = None,
    device: str | None = None,
    arithmetic_only: bool = False,
    policies: Sequence[str] | None = None,
) -> Plan:
    """Builds the trainer's setup for `config` and sizes one training step per device (nothing is allocated).

    Args:
      config: a training config (ConfigDict), as `paligemma-ft train` takes. Its `compute_dtype` (None: auto) is
        resolved for `device` when given (bfloat16 on GPUs and TPUs), else for the local platform.
      memory_gib: device memory to plan for; else `device`'s nominal memory ("H100", "TPU v5 lite"), else the
        local accelerator's allocator limit, else unknown.
      arithmetic_only: skip compiling; estimate temporaries with `estimate_temp_bytes`.
      policies: rematerialization policies (`paligemma_ft.model.remat`) to size too, each set on both towers and
        compiled at the batch and at twice it; the plan's `policies` rows give each one's peak and largest batch.
        Default: only the config's own (its largest batch only with `arithmetic_only`).
    """
    config = config_base.complete(config)
    config, compute_dtype, compute_why = _with_compute_dtype(config, device)
    for p in policies or ():
        remat_lib.short_name(p)  # An unknown name fails before anything compiles.
    asked = [remat_lib.short_name(p) for p in policies or ()]
    guess = remat_lib.short_name(config.model.llm.get("remat_policy"))
    s, counts, sized = _size_step(config, arithmetic_only, slope=guess in asked)
    model_cfg = {"img": dict(s.model.img or {}), "llm": dict(s.model.llm or {})}
    limit, limit_source = _memory_limit(memory_gib, device)
    plan = Plan(
        device_kind=device or jax.devices()[0].device_kind,
        devices=s.mesh.size,
        mesh=dict(s.mesh.shape),
        batch_size=int(config.input.batch_size),
        per_device_batch=max(1, int(config.input.batch_size) // counts["shards"]),
        micro_batches=counts["micro"],
        res=s.res,
        text_len=s.text_len,
        params=counts["params"],
        trainable=counts["trainable"],
        param_bytes=counts["param_bytes"],
        opt_bytes=counts["opt_bytes"],
        batch_bytes=counts["batch_bytes"],
        temp_bytes=int(sized.temp),
        peak_bytes=int(sized.peak),
        source=sized.source,
        compile_seconds=sized.compile_seconds,
        memory_limit=limit,
        memory_source=limit_source,
        flops_per_example=flops_lib.train_flops_per_example(
            model_cfg, s.res, s.text_len, trainable=s.trainable, lora=s.model.lora
        ),
        remat={t: _policy(model_cfg[t].get("remat_policy")) for t in ("img", "llm")},
        compute_dtype=compute_dtype,
        compute_dtype_source=compute_why,
    )
    own = plan.remat["llm"] if plan.remat["img"] == plan.remat["llm"] else None
    if policies is None:  # The config's own setting only.
        label = own or f"img={plan.remat['img']}, llm={plan.remat['llm']}"
        sizes = [(PolicyRow(label, plan.temp_bytes, plan.peak_bytes, plan.source, None, None), sized.step_bytes)]
    else:
        sizes = []
    for name in dict.fromkeys(asked):
        reuse = name == own and sized.step_bytes is not None  # The config's own policy, already measured.
        other = sized if reuse else _size_step(_with_policy(config, name), arithmetic_only, True)[2]
        sizes.append((PolicyRow(name, int(other.temp), int(other.peak), other.source, None, None), other.step_bytes))
    for row, step_bytes in sizes:
        row.largest_batch = largest_batch(plan, row.peak_bytes, step_bytes)
        row.fits = None if limit is None else row.peak_bytes <= _HEADROOM * limit
        plan.policies.append(row)
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
            f"Rematerialization: remat_policy=full on both towers, {remat_override('full')} "
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
        f"text {plan.text_len} tokens; remat img={plan.remat['img']} llm={plan.remat['llm']}; compute "
        f"{plan.compute_dtype} ({plan.compute_dtype_source})",
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
    lines += format_policies(plan)
    if plan.suggestions:
        lines.append("To fit:" if plan.fits is False else "Notes:")
        lines += [f"  - {s}" for s in plan.suggestions]
    return "\n".join(lines)


def remat_override(policy: str) -> str:
    """The command-line overrides that set `policy` on both towers (`model.img` / `model.llm` are open groups)."""
    return f"--config.model.img.remat_policy={policy} --config.model.llm.remat_policy={policy}"


def lightest_fitting(plan: Plan) -> PolicyRow | None:
    """The sized policy with the least recompute that fits (rows of `remat.STANDARD` only)."""
    rows = {r.policy: r for r in plan.policies if r.fits}
    return next((rows[p] for p in remat_lib.STANDARD if p in rows), None)


def format_policies(plan: Plan) -> list[str]:
    """The per-policy lines of the report: peak per device and largest batch, then which policy to pick."""
    if not plan.policies:
        return []
    fits = {None: "?", True: "yes", False: "NO"}
    width = max(len("remat policy"), *(len(r.policy) for r in plan.policies))
    lines = [
        f"{'remat policy':<{width}}  {'peak/device':>12}  fits  largest batch (linear estimate)",
        *(
            f"{r.policy:<{width}}  {format_bytes(r.peak_bytes):>12}  {fits[r.fits]:>4}  "
            f"{'?' if r.largest_batch is None else r.largest_batch}"
            for r in plan.policies
        ),
    ]
    if len(plan.policies) == 1:
        lines.append("Compare remat policies and their largest batches with --policies (two compiles per policy).")
    elif best := lightest_fitting(plan):
        lines.append(
            f"Lightest policy that fits: {best.policy} ({remat_override(best.policy)}, or set it in the config's "
            "`model`); lighter policies recompute less."
        )
    elif plan.memory_limit is not None:
        lines.append("No policy fits at this batch: see the suggestions.")
    return lines


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
    policies: Sequence[str] | None = None,
    echo: Callable[[str], Any] = print,
) -> int:
    """Prints the plan (and writes `workdir/plan.json` when given). Returns 0 if it fits or memory is unknown,
    1 if it does not fit."""
    plan = make_plan(config, memory_gib=memory_gib, device=device, arithmetic_only=arithmetic_only, policies=policies)
    echo(format_plan(plan))
    if workdir:
        path = pathlib.Path(workdir) / "plan.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**dataclasses.asdict(plan), "fits": plan.fits}, indent=2) + "\n")
    return 1 if plan.fits is False else 0
