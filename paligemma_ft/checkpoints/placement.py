"""Moving parameters onto devices: leaf by leaf, onto their shardings, cast on the devices.

`place_params` moves a host tree; `place_leaf` one array. Either way each leaf is put on its sharding in its
stored dtype, then cast by a jitted `astype` that donates its input, and the host reference is dropped before
the next leaf, so host memory peaks at about one copy of the model (plus one leaf) and device memory at the
placed model plus one leaf. `checkpoints/loading.py` uses `place_leaf` as it reads a checkpoint, so a model is
never held twice.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paligemma_ft.utils import PyTree, tree_flatten_with_names

DtypeSpec = Any  # None | dtype-like | callable(name) -> dtype-like | tree of dtype-likes / ShapeDtypeStructs.


def _as_dtype(value: Any) -> np.dtype | None:
    """dtype-like (str, np/jnp scalar type, np.dtype) or anything with `.dtype` (ShapeDtypeStruct) -> dtype."""
    if value is None:
        return None
    if not isinstance(value, (str, type, np.dtype)) and hasattr(value, "dtype"):
        value = value.dtype
    return jnp.dtype(value)


def _dtype_resolver(dtypes: DtypeSpec) -> Callable[[str], np.dtype | None]:
    """name -> target dtype (None: keep the stored dtype) from any of the accepted `dtypes` forms."""
    if dtypes is None:
        return lambda name: None
    if isinstance(dtypes, (Mapping, list, tuple)):
        table = {name: _as_dtype(leaf) for name, leaf in tree_flatten_with_names(dtypes)}
        return table.get  # Names absent from the tree (None leaves) keep their dtype.
    if isinstance(dtypes, (str, type, np.dtype)):
        single = _as_dtype(dtypes)
        return lambda name: single
    if callable(dtypes):
        return lambda name: _as_dtype(dtypes(name))
    raise TypeError(f"dtypes must be None, a dtype, a callable name -> dtype or a tree; got {type(dtypes)}.")


@functools.partial(jax.jit, static_argnums=1, donate_argnums=0)
def _astype(x: jax.Array, dtype: np.dtype) -> jax.Array:
    return x.astype(dtype)  # Elementwise, so the output keeps the input's sharding.


def _clear(tree: Any) -> None:
    """Empties nested dicts/lists in place so that they no longer reference their leaves."""
    if isinstance(tree, Mapping):
        for value in tree.values():
            _clear(value)
        if isinstance(tree, dict):
            tree.clear()
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            _clear(value)
        if isinstance(tree, list):
            tree.clear()


def place_params(
    tree: PyTree,
    shardings: PyTree | jax.sharding.Sharding | Callable[[str], Any],
    dtypes: DtypeSpec = None,
    *,
    consume: bool = True,
) -> PyTree:
    """Moves a host tree onto devices leaf by leaf: `device_put` to the sharding, then cast on the devices.

    Each leaf is put on its sharding in its stored dtype, then cast by a jitted `astype` that donates its input,
    and the host reference is dropped before the next leaf, so host memory peaks at about one copy of the model
    (plus one leaf) and device memory at the placed model plus one leaf.

    Args:
      tree: nested dicts of numpy (or jax) arrays, e.g. from `load_for_model`.
      shardings: a tree of `jax.sharding.Sharding` with the same names, one sharding for all, or a callable
        name -> sharding.
      dtypes: None (keep stored dtypes); one dtype for all; a callable name -> dtype or None; or a tree of
        dtypes / `jax.ShapeDtypeStruct` (e.g. the model's `eval_shape`), where absent names keep their dtype.
      consume: empty `tree`'s dicts and lists as the leaves move, so the host arrays can be freed. Pass False
        to keep `tree` intact (the host copies then live as long as the caller keeps them).

    Returns:
      The same structure with `jax.Array` leaves.

    Raises:
      ValueError: naming the parameter whose sharding is missing or cannot hold its shape. Shardings and dtypes
        are all resolved before the first leaf moves.
    """
    named = tree_flatten_with_names(tree)
    treedef = jax.tree.structure(tree)
    dtype_of = _dtype_resolver(dtypes)
    if isinstance(shardings, jax.sharding.Sharding):
        sharding_of: Callable[[str], Any] = lambda name: shardings
    elif callable(shardings) and not isinstance(shardings, (Mapping, list, tuple)):
        sharding_of = shardings
    else:
        sharding_of = dict(tree_flatten_with_names(shardings)).get
    plan = []
    for name, _leaf in named:
        sharding = sharding_of(name)
        if not isinstance(sharding, jax.sharding.Sharding):
            raise ValueError(f"No jax.sharding.Sharding for parameter {name!r} (got {sharding!r}).")
        plan.append((name, sharding, dtype_of(name)))
    leaves = [leaf for _, leaf in named]
    del named
    if consume:
        _clear(tree)
    placed = []
    for i, (name, sharding, dtype) in enumerate(plan):
        leaf, leaves[i] = leaves[i], None
        placed.append(place_leaf(name, leaf, sharding, dtype))
        del leaf
    return jax.tree.unflatten(treedef, placed)


def place_leaf(name: str, array: Any, sharding: jax.sharding.Sharding, dtype: Any = None) -> jax.Array:
    """One array onto `sharding`, then cast to `dtype` on the devices (None keeps its dtype).

    Raises:
      ValueError: naming the parameter when the sharding cannot hold its shape.
    """
    try:
        x = jax.device_put(array, sharding)
    except ValueError as e:
        raise ValueError(f"Cannot place parameter {name!r} {np.shape(array)} with {sharding}: {e}") from e
    dtype = _as_dtype(dtype)
    if dtype is not None and x.dtype != dtype:
        with warnings.catch_warnings():
            # A cast to another width cannot reuse the donated buffer; jax warns, and we free it below.
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            y = _astype(x, dtype)
        if not x.is_deleted():
            x.delete()
        x = y
    return x
