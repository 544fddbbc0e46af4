"""What a run needs to be correct across several processes (hosts), each feeding and reading its own devices.

A multi-process JAX program is one program run by every process: arrays span the processes' devices, and every
process must make the same collective calls in the same order. The helpers here are collectives where that is
needed (so all processes call them together) and plain local code on one process, where they cost nothing:

* `global_batch` / `local_rows`: a global batch from each process's rows, and back (decode, per-example losses).
* `to_host`: a pytree of (possibly sharded across processes) arrays as numpy on every process, leaf by leaf
  (the `params.npz` export).
* `allgather_json`: every process's JSON-able value, in process order (data-iterator states, evaluation results).
* `is_primary`: process 0, which alone writes shared files (metrics, reports, predictions, exports).

Rows of a batch: process p holds the rows its devices address in the global batch, in increasing order (what
`jax.make_array_from_process_local_data` assumes); with the default mesh that is the p-th contiguous block.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

PyTree = Any


def is_primary() -> bool:
    """True on process 0 (the one that writes shared files)."""
    return jax.process_index() == 0


def spans_processes(tree: PyTree) -> bool:
    """Whether the arrays of `tree` live on devices of several processes (then jitted inputs must be global)."""
    leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
    return bool(leaves) and not leaves[0].is_fully_addressable


def allgather_json(value: Any) -> list[Any]:
    """`value` (JSON-able) of every process, in process order; a collective: every process calls it.

    The values travel as UTF-8 JSON bytes padded to the longest (`process_allgather` needs equal shapes).
    """
    if jax.process_count() == 1:
        return [json.loads(json.dumps(value))]  # The same round trip as below, so callers see one behaviour.
    data = np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:n]).decode("utf-8")) for row, n in zip(rows, sizes)]


def to_host(tree: PyTree) -> PyTree:
    """Numpy copies of every leaf of `tree` on every process; a collective when arrays span processes.

    Leaf by leaf, so the host holds one gathered leaf at a time besides the result. Arrays sharded over devices
    of other processes are gathered (`process_allgather`); replicated and local ones are read directly.
    """

    def leaf(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(leaf, tree)


def _batch_shards_per_process(sharding: NamedSharding, what: str) -> int:
    """How many distinct row blocks of a batch one process holds under `sharding` (split dim 0 only)."""
    spec = sharding.spec
    axes = spec[0] if len(spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    shards = int(np.prod([sharding.mesh.shape[a] for a in axes])) if axes else 1
    if shards % jax.process_count():
        raise ValueError(
            f"{what}: the batch is split over {shards} device groups (mesh {dict(sharding.mesh.shape)}, axes "
            f"{axes}), which {jax.process_count()} processes cannot share evenly; make the data axes of "
            "config.mesh a multiple of the process count."
        )
    return shards // jax.process_count()


def global_batch(
    local: Mapping[str, Any], sharding: NamedSharding, *, what: str = "batch"
) -> tuple[dict[str, jax.Array], int]:
    """Global arrays from this process's rows; `(arrays, n)` with `n` this process's real row count.

    Each process passes its own `b` rows (the same `b` on every process). Rows are padded, by repeating the last
    one, up to a multiple of the device groups the process feeds; a `_mask` key (bool[b], added when missing)
    is False on the padding, so decoding stops for them as for any padding row. `local_rows(out, sharding, n)`
    undoes this on the outputs.
    """
    arrays = {k: np.asarray(v) for k, v in local.items()}
    n = len(next(iter(arrays.values())))
    if "_mask" not in arrays:
        arrays["_mask"] = np.ones(n, bool)
    per = _batch_shards_per_process(sharding, what)
    pad = -n % per
    if pad:
        arrays = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in arrays.items()}
        arrays["_mask"][n:] = False
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in arrays.items()}, n


def process_rows(sharding: NamedSharding, num_rows: int) -> np.ndarray:
    """The rows of a `num_rows`-row global array that this process's devices hold, in increasing order."""
    index_map = sharding.addressable_devices_indices_map((num_rows,))
    rows: set[int] = set()
    for index in index_map.values():
        rows.update(range(num_rows)[index[0]] if index else range(num_rows))
    return np.array(sorted(rows), np.int64)


def local_rows(out: jax.Array, sharding: NamedSharding, n: int) -> np.ndarray:
    """This process's first `n` rows of `out` (an output over a batch made by `global_batch` with `sharding`).

    A collective when `out` spans processes: the whole output is gathered (outputs of decoding and losses are
    small: tokens or one number per row), then this process's rows are taken.
    """
    full = to_host(out)
    return full[process_rows(sharding, full.shape[0])][:n]
