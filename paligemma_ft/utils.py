"""Parameter-name helpers shared by checkpoints, sharding, optimizer masks and logs.

Every parameter has one name: the keys of its path through the tree joined with `/`, exactly as big_vision's
`utils.tree_flatten_with_names` writes them, e.g. `img/Transformer/encoderblock/LayerNorm_0/scale` or
`llm/layers/attn/q_einsum/w`. Dict keys are visited in sorted order (as `jax.tree` does) and list/tuple indices
become decimal strings (`llm/layers/0/...` in the non-scan layout). Rules that pick a sharding, a trainable set
or a weight-decay mask are `(regex, value)` pairs matched against these names with `match_first`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import jax

PyTree = Any  # Nested dicts/lists/tuples whose leaves are arrays (or ShapeDtypeStructs, shardings, ...).

T = TypeVar("T")


def _key_to_str(entry: Any) -> str:
    """One step of a `jax.tree_util` key path as the name component big_vision would write."""
    if isinstance(entry, jax.tree_util.DictKey):
        part = str(entry.key)
    elif isinstance(entry, jax.tree_util.SequenceKey):
        part = str(entry.idx)
    elif isinstance(entry, jax.tree_util.GetAttrKey):
        part = entry.name
    elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
        part = str(entry.key)
    else:  # Unknown key kinds from custom pytree nodes: their str() is the best we can do.
        part = str(entry)
    # A `/` inside a key would make the joined name ambiguous and `recover_tree` would build another tree.
    if "/" in part or not part:
        raise ValueError(
            f"Tree key {part!r} cannot be part of a '/'-joined parameter name "
            "(keys must be non-empty and contain no '/')."
        )
    return part


def path_to_name(path: Sequence[Any]) -> str:
    """Turns a `jax.tree_util` key path into a `/`-joined name (`(DictKey('img'), DictKey('head'))` -> `img/head`)."""
    return "/".join(_key_to_str(entry) for entry in path)


def tree_flatten_with_names(tree: PyTree, *, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
    """Flattens `tree` into `(name, leaf)` pairs in `jax.tree.leaves` order (dict keys sorted).

    Args:
      tree: nested dicts / lists / tuples (any pytree). `None` subtrees have no leaves, as in `jax.tree`.
      is_leaf: optional predicate that stops the recursion early (passed to `jax.tree_util`).

    Returns:
      A list of `(name, leaf)`; e.g. `{"b": [x, y], "a": {"c": z}}` -> `[("a/c", z), ("b/0", x), ("b/1", y)]`.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_to_name(path), leaf) for path, leaf in flat]


def recover_tree(names: Iterable[str], leaves: Iterable[Any]) -> dict[str, Any]:
    """Rebuilds nested dicts from `/`-joined names: the inverse of `tree_flatten_with_names` for dict trees.

    List indices come back as string keys (`"0"`, `"1"`, ...), as in big_vision.

    Raises:
      ValueError: naming the parameter when names collide (one name is a prefix of another, or repeats) or a
        name has an empty component.
    """
    names, leaves = list(names), list(leaves)
    if len(names) != len(leaves):
        raise ValueError(f"recover_tree got {len(names)} names but {len(leaves)} leaves.")
    tree: dict[str, Any] = {}
    for name, leaf in zip(names, leaves):
        parts = name.split("/")
        if not all(parts):
            raise ValueError(f"Parameter name {name!r} has an empty component.")
        node = tree
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"Parameter name {name!r} clashes with the leaf {'/'.join(parts[: depth + 1])!r}.")
            node = child
        if parts[-1] in node:
            what = "appears twice" if not isinstance(node[parts[-1]], dict) else "is also a sub-tree"
            raise ValueError(f"Parameter name {name!r} {what}.")
        node[parts[-1]] = leaf
    return tree


def tree_map_with_names(
    fn: Callable[..., Any], tree: PyTree, *rest: PyTree, is_leaf: Callable[[Any], bool] | None = None
) -> PyTree:
    """Like `jax.tree.map`, but `fn(name, leaf, *rest_leaves)` also receives the leaf's `/`-joined name.

    Example: `tree_map_with_names(lambda n, x: n.endswith("/kernel"), params)` is a weight-decay mask.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf, *others: fn(path_to_name(path), leaf, *others), tree, *rest, is_leaf=is_leaf
    )


def match_first(rules: Sequence[tuple[str, T]], name: str, *, what: str) -> T:
    """Returns the value of the first rule whose regex fully matches `name` (big_vision's rule semantics).

    Args:
      rules: ordered `(regex, value)` pairs, e.g. `[("img/.*", "replicate"), (".*", "fsdp")]`.
      name: a `/`-joined parameter name.
      what: what the rules decide ("sharding", "trainable", "weight decay", ...), used in error messages.

    Raises:
      ValueError: when no rule matches, naming the parameter and listing the patterns tried; or when a pattern
        is not a valid regex.
    """
    for pattern, value in rules:
        try:
            if re.fullmatch(pattern, name):
                return value
        except re.error as e:
            raise ValueError(f"Invalid {what} rule regex {pattern!r}: {e}") from e
    patterns = [pattern for pattern, _ in rules]
    raise ValueError(
        f"No {what} rule matches parameter {name!r}; patterns tried (full match, in order): "
        f"{patterns}. Add a rule for it, e.g. a final ('.*', ...) catch-all."
    )


def names_and_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
    """`{name: shape}` for every leaf that has a `.shape` (arrays, `jax.ShapeDtypeStruct`)."""
    return {name: tuple(leaf.shape) for name, leaf in tree_flatten_with_names(tree) if hasattr(leaf, "shape")}


@dataclasses.dataclass(frozen=True)
class LeafAdapter:
    """How a model tower makes one stored parameter fit its own shape (big_vision's per-tower `load` fixes).

    Each tower module lists its adapters in `CHECKPOINT_ADAPTERS`; `checkpoints/fit.py` applies them while
    loading. Whether an adapter applies is decided from the shapes alone, before any data is read.

    Attributes:
      pattern: regex, full-matched against the name below the tower (`pos_embedding`, `embedder/input_embedding`).
      fits: `(stored_shape, model_shape) -> bool`: the adapter turns the first into the second.
      apply: `(array, model_shape, rng: np.random.Generator) -> array` of `model_shape`, in the array's dtype.
      describe: `(name, stored_shape, model_shape) -> str`, the log line.
    """

    pattern: str
    fits: Callable[[tuple[int, ...], tuple[int, ...]], bool]
    apply: Callable[..., Any]
    describe: Callable[[str, tuple[int, ...], tuple[int, ...]], str]
