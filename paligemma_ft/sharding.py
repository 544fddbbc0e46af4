"""Device mesh and parameter placement from config rules (big_vision `sharding.py`, reference 7.1).

* `config.mesh`: `[("data", -1)]`, `[("data", 2), ("fsdp", 4)]`, ...; at most one size may be -1 (the rest of
  the devices).
* `config.sharding_strategy`: ordered `(regex, tactic)` rules over `/`-joined parameter names; the first full
  match wins and a parameter matched by no rule is an error. A tactic is one op or several chained with `|`:
  - `replicate`: leave the spec as it is (all replicated unless an earlier op sharded a dim);
  - `fsdp(axis="data", min_size_mb=4)`: shard the largest dimension that is divisible by the size of `axis`
    (a mesh axis name or a tuple of names) and still free; tensors of at most `min_size_mb` MiB stay replicated
    (big_vision's `min_size_to_shard_mb` is accepted too);
  - `shard_dim(axis="model", dim=-1)`: shard dimension `dim` over `axis`.
  Tactic strings are parsed as literals with `ast`, never evaluated.
* Batches go over the data axes: `("data", "fsdp")` when both exist, so FSDP devices also split the batch.
"""

from __future__ import annotations

import ast
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from paligemma_ft.utils import PyTree, match_first, tree_flatten_with_names, tree_map_with_names

log = logging.getLogger(__name__)

Spec = tuple  # One entry per array dim: None, a mesh axis name, or a tuple of names.
# An op updates a spec: (spec, shape, itemsize, mesh, name) -> spec.
Op = Callable[[Spec, tuple[int, ...], int, Mesh, str], Spec]

DEFAULT_BATCH_AXES = ("data", "fsdp")


# --- Mesh ----------------------------------------------------------------------------------------------------


def make_mesh(mesh_cfg: Sequence[tuple[str, int]], devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a `Mesh` from `[(axis_name, size), ...]`; one size may be -1 (whatever devices remain).

    Uses `mesh_utils.create_device_mesh`, which orders devices for the physical topology on TPU/GPU.

    Raises:
      ValueError: for more than one -1, repeated names, or sizes whose product is not the device count (the
        message names the mesh and the count).
    """
    devices = list(jax.devices() if devices is None else devices)
    names = [str(name) for name, _ in mesh_cfg]
    sizes = [int(size) for _, size in mesh_cfg]
    if not names:
        raise ValueError("config.mesh is empty; use e.g. [('data', -1)].")
    if len(set(names)) != len(names):
        raise ValueError(f"config.mesh {list(mesh_cfg)} repeats an axis name.")
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh {list(mesh_cfg)}: sizes must be positive, with at most one -1.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"config.mesh {list(mesh_cfg)} cannot be laid over {len(devices)} devices: "
                f"{len(devices)} is not divisible by {known}."
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"config.mesh {list(mesh_cfg)} needs {math.prod(sizes)} devices but there are "
            f"{len(devices)}; use -1 for one axis to fill the rest."
        )
    return Mesh(mesh_utils.create_device_mesh(sizes, devices=devices), tuple(names))


# --- Tactics -------------------------------------------------------------------------------------------------


def _axes(axis: Any) -> tuple[str, ...]:
    return (axis,) if isinstance(axis, str) else tuple(axis)


def _axis_size(mesh: Mesh, axis: Any, rule: str) -> int:
    for a in _axes(axis):
        if a not in mesh.shape:
            raise ValueError(
                f"Sharding tactic {rule!r} names mesh axis {a!r}, but the mesh has {tuple(mesh.axis_names)}."
            )
    return math.prod(mesh.shape[a] for a in _axes(axis))


def _used_axes(spec: Spec) -> set[str]:
    return {a for entry in spec if entry is not None for a in _axes(entry)}


def _replicate() -> Op:
    return lambda spec, shape, itemsize, mesh, name: spec


def _fsdp(axis: Any = "data", min_size_mb: float = 4, *, min_size_to_shard_mb: float | None = None) -> Op:
    if min_size_to_shard_mb is not None:  # big_vision's name.
        min_size_mb = min_size_to_shard_mb
    axis = axis if isinstance(axis, str) else tuple(axis)
    rule = f"fsdp(axis={axis!r})"

    def op(spec: Spec, shape: tuple[int, ...], itemsize: int, mesh: Mesh, name: str) -> Spec:
        size = _axis_size(mesh, axis, rule)
        if math.prod(shape) * itemsize <= min_size_mb * 2**20:
            return spec  # Small tensors: the communication is not worth it.
        if _used_axes(spec) & set(_axes(axis)):
            log.info("fsdp: %s %s already uses %s; left as %s.", name, shape, axis, spec)
            return spec
        # Largest dimension first; among equal sizes the later dimension (as big_vision's reversed argsort).
        for i in sorted(range(len(shape)), key=lambda i: (shape[i], i), reverse=True):
            if spec[i] is None and shape[i] % size == 0:
                return spec[:i] + (axis,) + spec[i + 1 :]
        log.info("fsdp: no free dimension of %s %s is divisible by %s=%d; left as %s.", name, shape, axis, size, spec)
        return spec

    return op


def _shard_dim(axis: Any, dim: int) -> Op:
    axis = axis if isinstance(axis, str) else tuple(axis)
    rule = f"shard_dim(axis={axis!r}, dim={dim})"

    def op(spec: Spec, shape: tuple[int, ...], itemsize: int, mesh: Mesh, name: str) -> Spec:
        size = _axis_size(mesh, axis, rule)
        if not -len(shape) <= dim < len(shape):
            raise ValueError(f"{rule}: parameter {name!r} has only {len(shape)} dims (shape {shape}).")
        d = dim % len(shape)
        if spec[d] is not None:
            raise ValueError(f"{rule}: dim {d} of parameter {name!r} is already sharded over {spec[d]!r}.")
        if _used_axes(spec) & set(_axes(axis)):
            raise ValueError(f"{rule}: parameter {name!r} already uses mesh axis {axis!r} (spec {spec}).")
        if shape[d] % size:
            raise ValueError(
                f"{rule}: dim {d} of parameter {name!r} (shape {shape}) is not divisible by the axis size {size}."
            )
        return spec[:d] + (axis,) + spec[d + 1 :]

    return op


_TACTICS: dict[str, tuple[Callable[..., Op], tuple[str, ...]]] = {
    "replicate": (_replicate, ()),
    "fsdp": (_fsdp, ("axis", "min_size_mb")),
    "shard_dim": (_shard_dim, ("axis", "dim")),
}


def parse_tactic(tactic: str) -> list[Op]:
    """Parses `'op(args) | op(args)'` into ops, reading arguments as Python literals (no `eval`).

    Raises:
      ValueError: naming the tactic string for unknown ops, non-literal or wrong arguments.
    """
    ops = []
    for part in tactic.split("|"):
        part = part.strip()
        try:
            node = ast.parse(part, mode="eval").body
        except SyntaxError as e:
            raise ValueError(f"Cannot parse sharding tactic {part!r} (in {tactic!r}): {e.msg}") from None
        if isinstance(node, ast.Name):  # `replicate` without parentheses.
            node = ast.Call(func=node, args=[], keywords=[])
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            raise ValueError(f"Sharding tactic {part!r} must look like name(arg=value, ...).")
        if node.func.id not in _TACTICS:
            raise ValueError(f"Unknown sharding tactic {node.func.id!r} in {tactic!r}; known: {sorted(_TACTICS)}.")
        factory, positional = _TACTICS[node.func.id]
        names = [_keyword_name(k, part) for k in node.keywords]
        try:
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {name: ast.literal_eval(k.value) for name, k in zip(names, node.keywords)}
        except ValueError:
            raise ValueError(f"Sharding tactic {part!r}: arguments must be literals.") from None
        if len(args) > len(positional):
            raise ValueError(f"Sharding tactic {part!r} takes at most {len(positional)} positional arguments.")
        kwargs.update(zip(positional, args))
        try:
            ops.append(factory(**kwargs))
        except TypeError as e:
            raise ValueError(f"Sharding tactic {part!r}: {e}") from None
    return ops


def _keyword_name(keyword: ast.keyword, part: str) -> str:
    if keyword.arg is None:  # `op(**mapping)` has no name to bind.
        raise ValueError(f"Sharding tactic {part!r}: name each argument (no **).")
    return keyword.arg


def _apply(ops: Sequence[Op], shape: tuple[int, ...], itemsize: int, mesh: Mesh, name: str) -> PartitionSpec:
    spec: Spec = (None,) * len(shape)
    for op in ops:
        spec = op(spec, shape, itemsize, mesh, name)
    return PartitionSpec(*spec)


def _matched_tactics(params: PyTree, strategy: Sequence[tuple[str, str]]) -> dict[str, list[Op]]:
    """name -> ops of the first matching rule (each tactic string parsed once)."""
    parsed = [(pattern, parse_tactic(tactic)) for pattern, tactic in strategy]
    return {
        name: match_first(parsed, name, what="sharding (config.sharding_strategy)")
        for name, _ in tree_flatten_with_names(params)
    }


def infer_sharding(params: PyTree, strategy: Sequence[tuple[str, str]], mesh: Mesh) -> PyTree:
    """Tree of `NamedSharding`s for `params` (arrays or `jax.ShapeDtypeStruct`s) from ordered regex rules.

    Raises:
      ValueError: naming the first parameter that no rule matches, or a bad tactic / axis.
    """
    tactics = _matched_tactics(params, strategy)
    return tree_map_with_names(
        lambda name, x: NamedSharding(
            mesh, _apply(tactics[name], tuple(x.shape), np.dtype(x.dtype).itemsize, mesh, name)
        ),
        params,
    )


def opt_state_sharding(opt_state: PyTree, params: PyTree, strategy: Sequence[tuple[str, str]], mesh: Mesh) -> PyTree:
    """Shardings for an optimizer state (arrays or shapes) that follow the parameters'.

    A state leaf whose name ends with a parameter's name (e.g. `1/inner_state/0/mu/llm/.../w`) takes that
    parameter's sharding when the shapes agree, or the parameter's tactic applied to its own shape otherwise
    (e.g. Adafactor's factored rows); other leaves (step counts) are replicated.
    """
    param_shardings = dict(tree_flatten_with_names(infer_sharding(params, strategy, mesh)))
    tactics = _matched_tactics(params, strategy)
    shapes = {name: tuple(x.shape) for name, x in tree_flatten_with_names(params)}

    def place(name: str, x: Any) -> NamedSharding:
        parts = name.split("/")
        for i in range(len(parts)):  # Longest suffix first.
            pname = "/".join(parts[i:])
            if pname in shapes:
                if tuple(x.shape) == shapes[pname]:
                    return param_shardings[pname]
                try:
                    return NamedSharding(
                        mesh, _apply(tactics[pname], tuple(x.shape), np.dtype(x.dtype).itemsize, mesh, name)
                    )
                except ValueError:
                    break  # e.g. shard_dim on a factored leaf with fewer dims: replicate it.
        return NamedSharding(mesh, PartitionSpec())

    return tree_map_with_names(place, opt_state)


# --- Batches -------------------------------------------------------------------------------------------------


def batch_axes(mesh: Mesh, data_axes: Sequence[str] | None = None) -> tuple[str, ...]:
    """The mesh axes that split the batch: `data_axes` (default ("data", "fsdp")) present in the mesh, in mesh
    order.

    Raises:
      ValueError: when `data_axes` is given explicitly and names an axis the mesh lacks.
    """
    if data_axes is not None and (missing := [a for a in data_axes if a not in mesh.axis_names]):
        raise ValueError(f"Batch axes {missing} are not in the mesh {tuple(mesh.axis_names)}.")
    wanted = DEFAULT_BATCH_AXES if data_axes is None else tuple(data_axes)
    return tuple(a for a in mesh.axis_names if a in wanted)


def batch_sharding(mesh: Mesh, data_axes: Sequence[str] | None = None) -> NamedSharding:
    """`NamedSharding` splitting the leading (batch) dim over the data axes; other dims and axes replicated."""
    axes = batch_axes(mesh, data_axes)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def check_batch_divisible(global_batch: int, mesh: Mesh, data_axes: Sequence[str] | None = None) -> None:
    """Raises a ValueError naming the batch size, the mesh and a fix when the batch cannot be split evenly
    over the data axes and the processes."""
    axes = batch_axes(mesh, data_axes)
    shards = math.prod(mesh.shape[a] for a in axes)
    procs = jax.process_count()
    if global_batch % shards or global_batch % procs:
        raise ValueError(
            f"input.batch_size={global_batch} must be divisible by the {shards} batch shards of mesh "
            f"{dict(mesh.shape)} (axes {axes}) and by the {procs} processes; try "
            f"{math.lcm(shards, procs) * max(1, -(-global_batch // math.lcm(shards, procs)))}."
        )


# --- Multi-host ----------------------------------------------------------------------------------------------


def _multi_host_env() -> str | None:
    """The environment variable that says this process is one of several, if any."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if env.get("BV_JAX_INIT"):  # big_vision's switch.
        return "BV_JAX_INIT"
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        return "SLURM_NTASKS"
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "OMPI_COMM_WORLD_SIZE"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "TPU_WORKER_HOSTNAMES"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):  # Multi-slice TPU.
        return "MEGASCALE_COORDINATOR_ADDRESS"
    return None


# `jax.distributed.initialize` arguments read from the environment when the config leaves them unset. jax reads
# JAX_COORDINATOR_ADDRESS (and JAX_LOCAL_DEVICE_IDS) itself, but not the process count and index, so without
# these a launch outside SLURM, Open MPI or a TPU pod could not be described by variables alone.
ENV_KEYS = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
    "local_device_ids": "JAX_LOCAL_DEVICE_IDS",
}


def distributed_kwargs(group: Any, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`jax.distributed.initialize` keyword arguments: `config.distributed.<key>` when set, else the JAX_* variable.

    Unset ones are left out, for jax's cluster auto-detection (SLURM, Open MPI, TPU pods) to fill in.

    Raises:
      ValueError: a value that is not an integer (or a comma-separated list of them), naming the key or variable.
    """
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for key, var in ENV_KEYS.items():
        value = group.get(key) if hasattr(group, "get") else None
        where = f"config.distributed.{key}"
        if value is None and environ.get(var, "").strip():
            value, where = environ[var].strip(), var
        if value is None:
            continue
        try:
            if key in ("num_processes", "process_id"):
                value = int(value)
            elif key == "local_device_ids":
                items = value.split(",") if isinstance(value, str) else value
                value = [int(i) for i in items]
            else:
                value = str(value)
        except (TypeError, ValueError):
            kind = "an integer" if key in ("num_processes", "process_id") else "a list of device indices"
            raise ValueError(f"{where}={value!r} must be {kind}.") from None
        out[key] = value
    if "num_processes" in out and "process_id" in out and not 0 <= out["process_id"] < out["num_processes"]:
        raise ValueError(
            f"process id {out['process_id']} is outside [0, {out['num_processes']}) "
            "(config.distributed.process_id / JAX_PROCESS_ID against num_processes / JAX_NUM_PROCESSES)."
        )
    return out


def maybe_initialize_distributed(config: Any) -> bool:
    """Calls `jax.distributed.initialize` on multi-process runs; call it before anything else touches jax.

    `config.distributed.enabled` (or a bare bool `config.distributed`): True forces it, False never does, None
    detects a multi-process environment from `JAX_COORDINATOR_ADDRESS`, `BV_JAX_INIT`, SLURM/Open MPI with
    several tasks, or several TPU workers. The coordinator address, process count, process index and local
    devices come from the group's keys when set, else from `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
    `JAX_PROCESS_ID` and `JAX_LOCAL_DEVICE_IDS`, else from jax's cluster auto-detection. On CPU the processes
    exchange data over gloo (jax's default CPU collectives).

    Returns:
      Whether `initialize` was called now (False on a single process or when already initialized).

    Raises:
      ValueError: a malformed value, or a launch jax cannot complete (e.g. a coordinator address but no process
        count or index, outside any cluster it detects); the message names the keys and variables to set.
    """
    group: Any = config.get("distributed") if hasattr(config, "get") else None
    wanted = group.get("enabled") if hasattr(group, "get") else group
    if wanted is False:
        return False
    reason = "config.distributed.enabled=True" if wanted else _multi_host_env()
    if reason is None or jax.distributed.is_initialized():
        return False
    kwargs = distributed_kwargs(group)
    log.info("Initializing jax.distributed (%s) with %s.", reason, kwargs or "auto-detected settings")
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, TypeError) as e:  # jax's own messages name its arguments, not our keys or variables.
        raise ValueError(
            f"Cannot start a multi-process run ({reason}; given {kwargs or 'nothing'}): {e} Set "
            "JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID on every "
            "process (or config.distributed.*), or launch under SLURM (srun), Open MPI or on a TPU pod, which "
            "jax detects."
        ) from e
    _no_cached_cpu_collectives()
    return True


def _no_cached_cpu_collectives() -> None:
    """Turns jax's persistent compilation cache off for a multi-process CPU run on jax >= 0.12.

    Measured with jax 0.12.1 (Python 3.12): two CPU processes that load a step from the persistent cache
    (`JAX_COMPILATION_CACHE_DIR`, `config.compilation_cache_dir`) hang in its first cross-process collective (gloo);
    the same run compiling afresh, or on jax 0.10.2, does not (tests/test_multiprocess_run.py). GPUs and TPUs keep
    the cache. Why here: the cache is read at the first compilation, which comes after `initialize`.
    """
    version = tuple(int(part) for part in re.findall(r"\d+", jax.__version__)[:2])
    enabled = jax.config.jax_enable_compilation_cache  # type: ignore[attr-defined]
    if version < (0, 12) or jax.default_backend() != "cpu" or not enabled:
        return
    jax.config.update("jax_enable_compilation_cache", False)
    log.warning(
        "jax %s on CPU with %d processes: the persistent compilation cache is off (cached executables hang in "
        "cross-process collectives on this jax)",
        jax.__version__,
        jax.process_count(),
    )
