"""Fitting stored parameters to a model, name by name, before any data is read.

A checkpoint is seen through the `ParamSource` protocol: `specs()` gives every array's name, shape and dtype
(from file headers: nothing is read), and `read(name, index=None)` reads one array, or one layer of a stacked one.
`NpzReader`, the Hugging Face reader (`checkpoints/hf_import.py`) and `DictSource` (arrays in memory) implement it.

`plan_fit` then decides, for every parameter of the model, whether it is loaded as stored, loaded through one of
its tower's adapters (`CHECKPOINT_ADAPTERS` in `model/vit.py` and `model/gemma.py`: position-embedding
resampling, vocabulary resizing, the old gating layout), or initialised (missing from the checkpoint, or matched
by a `dont_load` regex), and lists every name that cannot be reconciled in one error. Scan (stacked) and
per-layer layouts are bridged by a view (`relayout`) that stacks or slices on read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from paligemma_ft.checkpoints.npz import ArraySpec, CheckpointError, raise_mismatch
from paligemma_ft.model import gemma, vit
from paligemma_ft.utils import LeafAdapter, PyTree, names_and_shapes, recover_tree, tree_flatten_with_names

_LOG = logging.getLogger(__name__)

# Each tower's adapters, keyed by the tower's name prefix in the parameter tree.
TOWER_ADAPTERS: dict[str, Sequence[LeafAdapter]] = {"img/": vit.CHECKPOINT_ADAPTERS, "llm/": gemma.CHECKPOINT_ADAPTERS}


class ParamSource(Protocol):
    """Stored parameters, readable one array at a time (see the module docstring)."""

    @property
    def where(self) -> str: ...  # How messages name the source (a quoted path).

    def specs(self) -> Mapping[str, ArraySpec]: ...

    def read(self, name: str, index: int | None = None) -> np.ndarray: ...


class DictSource:
    """A `ParamSource` over arrays already in memory (a nested or flat dict)."""

    def __init__(self, tree: PyTree, where: str = "<in memory>"):
        self._arrays = dict(tree_flatten_with_names(tree)) if not _is_flat(tree) else dict(tree)
        self.where = where

    def specs(self) -> dict[str, ArraySpec]:
        return {n: ArraySpec(tuple(np.shape(a)), np.asarray(a).dtype) for n, a in self._arrays.items()}

    def read(self, name: str, index: int | None = None) -> np.ndarray:
        array = np.asarray(self._arrays[name])
        return array if index is None else array[index]


def _is_flat(tree: Any) -> bool:
    return (
        isinstance(tree, Mapping)
        and all(not isinstance(v, Mapping) for v in tree.values())
        and any("/" in k for k in tree)
    )


# ------------------------------------------------------------------------------------------------ layouts


class _Layout:
    """Scan (stacked on axis 0) vs per-layer names of one tower. Regex groups: `pre`, `rest` and layer `i`."""

    def __init__(self, what: str, stacked: str, unstacked: str, stacked_fmt: str, unstacked_fmt: str):
        self.what, self.stacked, self.unstacked = what, re.compile(stacked), re.compile(unstacked)
        self.stacked_fmt, self.unstacked_fmt = stacked_fmt, unstacked_fmt

    def groups(self, names: Any, pattern: re.Pattern) -> dict[str, dict[Any, str]]:
        """`{pre: {rest or (i, rest): name}}` for the names that match `pattern`."""
        out: dict[str, dict[Any, str]] = {}
        for name in names:
            if m := pattern.fullmatch(name):
                key = (int(m["i"]), m["rest"]) if "i" in m.groupdict() else m["rest"]
                out.setdefault(m["pre"], {})[key] = name
        return out


LAYOUTS = (
    _Layout(
        "ViT",
        r"(?P<pre>(?:.*/)?Transformer/)encoderblock/(?P<rest>.+)",
        r"(?P<pre>(?:.*/)?Transformer/)encoderblock_(?P<i>\d+)/(?P<rest>.+)",
        "{pre}encoderblock/{rest}",
        "{pre}encoderblock_{i}/{rest}",
    ),
    _Layout(
        "Gemma",
        r"(?P<pre>(?:.*/)?)layers/(?!\d+/)(?P<rest>.+)",
        r"(?P<pre>(?:.*/)?)layers/(?P<i>\d+)/(?P<rest>.+)",
        "{pre}layers/{rest}",
        "{pre}layers/{i}/{rest}",
    ),
)


class _Relayout:
    """A view of a source with each tower in the model's layout: per-layer names slice a stacked array on read,
    a stacked name stacks per-layer arrays on read."""

    def __init__(self, source: ParamSource, want: Mapping[str, Any], log: logging.Logger):
        self.source, self.where = source, source.where
        self._specs = dict(source.specs())
        self._recipes: dict[str, tuple[str, Any]] = {}  # name -> ("slice", (stored name, i)) | ("stack", names)
        for layout in LAYOUTS:
            want_stacked, want_unstacked = layout.groups(want, layout.stacked), layout.groups(want, layout.unstacked)
            for pre, group in layout.groups(list(self._specs), layout.stacked).items():
                if pre in want_unstacked and pre not in want_stacked:
                    self._unstack(layout, pre, group, log)
            for pre, group in layout.groups(list(self._specs), layout.unstacked).items():
                if pre in want_stacked and pre not in want_unstacked:
                    self._stack(layout, pre, group, log)

    def _unstack(self, layout: _Layout, pre: str, group: Mapping[str, str], log: logging.Logger) -> None:
        depth = 0
        for rest, name in group.items():
            spec = self._specs.pop(name)
            if not spec.shape:
                raise CheckpointError(f"Cannot unstack scalar {name!r}: scan leaves have a layer axis.")
            depth = spec.shape[0]
            for i in range(depth):
                new = layout.unstacked_fmt.format(pre=pre, i=i, rest=rest)
                self._specs[new] = ArraySpec(spec.shape[1:], spec.dtype)
                self._recipes[new] = ("slice", (name, i))
        log.info(
            "Converting %d %s leaves under %r from the scan layout (depth %d) to per-layer names.",
            len(group),
            layout.what,
            pre,
            depth,
        )

    def _stack(self, layout: _Layout, pre: str, group: Mapping[Any, str], log: logging.Logger) -> None:
        by_rest: dict[str, dict[int, str]] = {}
        for (i, rest), name in group.items():
            by_rest.setdefault(rest, {})[i] = name
        for rest, layers in by_rest.items():
            target = layout.stacked_fmt.format(pre=pre, rest=rest)
            if sorted(layers) != list(range(len(layers))):
                raise CheckpointError(
                    f"Cannot stack {target!r}: layer indices {sorted(layers)} are not 0..{len(layers) - 1}."
                )
            names = [layers[i] for i in range(len(layers))]
            specs = [self._specs.pop(n) for n in names]
            if len({(s.shape, s.dtype) for s in specs}) != 1:
                raise CheckpointError(
                    f"Cannot stack {target!r}: its layers differ in shape or dtype "
                    f"({sorted({(s.shape, str(s.dtype)) for s in specs})})."
                )
            self._specs[target] = ArraySpec((len(names), *specs[0].shape), specs[0].dtype)
            self._recipes[target] = ("stack", names)
        log.info(
            "Converting %d %s leaves under %r from per-layer names to the scan layout.", len(by_rest), layout.what, pre
        )

    def specs(self) -> dict[str, ArraySpec]:
        return self._specs

    def read(self, name: str, index: int | None = None) -> np.ndarray:
        if name not in self._recipes:
            return self.source.read(name, index)
        kind, arg = self._recipes[name]
        if kind == "slice":
            stored, i = arg
            array = self.source.read(stored, i)
            return array if index is None else array[index]
        if index is not None:
            return self.source.read(arg[index])
        spec = self._specs[name]
        out = np.empty(spec.shape, spec.dtype)
        for i, layer in enumerate(arg):
            out[i] = self.source.read(layer)
        return out


def per_layer(specs: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """`{name: shape}` with every scan-stacked leaf replaced by its per-layer names (others unchanged)."""
    out = {}
    for name, spec in specs.items():
        for layout in LAYOUTS:
            if m := layout.stacked.fullmatch(name):
                for i in range(spec.shape[0]):
                    out[layout.unstacked_fmt.format(pre=m["pre"], i=i, rest=m["rest"])] = tuple(spec.shape[1:])
                break
        else:
            out[name] = tuple(spec.shape)
    return out


def relayout(source: ParamSource, want: Mapping[str, Any], log: logging.Logger = _LOG) -> ParamSource:
    """`source` seen in the model's layout (scan or per-layer, per tower); `want` holds the model's names."""
    return _Relayout(source, want, log)


# ---------------------------------------------------------------------------------------------- the plan


def _adapter_for(name: str, stored: tuple[int, ...], shape: tuple[int, ...]) -> LeafAdapter | None:
    for prefix, adapters in TOWER_ADAPTERS.items():
        if name.startswith(prefix):
            rel = name[len(prefix) :]
            return next((a for a in adapters if re.fullmatch(a.pattern, rel) and a.fits(stored, shape)), None)
    return None


def _leaf_rng(name: str, seed: int) -> np.random.Generator:
    """A generator per parameter, so new rows do not depend on the order leaves are read in."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


@dataclasses.dataclass
class FitPlan:
    """What happens to each model parameter; `read(name)` gives the stored array fitted to the model's shape.

    Attributes:
      source: the (relayouted) checkpoint.
      loaded: model name -> the adapter that fits it (None: stored as is).
      missing: model names the checkpoint lacks (initialised by the loader).
      not_loaded: model names matched by `dont_load` (initialised too).
      skipped: checkpoint names matched by `dont_load` that the model lacks (ignored).
    """

    source: ParamSource
    shapes: dict[str, tuple[int, ...]]
    loaded: dict[str, LeafAdapter | None]
    missing: list[str]
    not_loaded: list[str]
    skipped: list[str]
    rng_seed: int = 0

    @property
    def initialised(self) -> list[str]:
        return sorted(self.missing + self.not_loaded)

    def read(self, name: str) -> np.ndarray:
        """The stored array for model parameter `name`, adapted to the model's shape (stored dtype kept).

        Raises:
          CheckpointError: the adapter refuses the values (e.g. trained vocabulary rows past the model's size).
        """
        array = self.source.read(name)
        adapter = self.loaded[name]
        if adapter is None:
            return array
        try:
            return adapter.apply(array, self.shapes[name], _leaf_rng(name, self.rng_seed))
        except ValueError as e:
            raise CheckpointError(f"Checkpoint {self.source.where}: {e}") from e

    def log(self, log: logging.Logger = _LOG) -> None:
        """One line per adaptation, and the initialised parameters by name."""
        specs = self.source.specs()
        for name, adapter in self.loaded.items():
            if adapter is not None:
                log.info(adapter.describe(name, specs[name].shape, self.shapes[name]))
        if self.missing:
            log.warning(
                "Initialising %d parameter(s) the checkpoint %s lacks: %s",
                len(self.missing),
                self.source.where,
                ", ".join(self.missing),
            )
        if self.not_loaded:
            log.warning(
                "Initialising %d parameter(s) matched by dont_load: %s",
                len(self.not_loaded),
                ", ".join(self.not_loaded),
            )
        if self.skipped:
            log.info(
                "Ignoring %d stored parameter(s) matched by dont_load: %s", len(self.skipped), ", ".join(self.skipped)
            )


def plan_fit(
    source: ParamSource,
    expected: PyTree | Mapping[str, tuple[int, ...]],
    *,
    dont_load: Sequence[str] = (),
    allow_missing: bool = True,
    rng_seed: int = 0,
    log: logging.Logger = _LOG,
) -> FitPlan:
    """Decides, from names and shapes alone, how each model parameter is obtained (see `FitPlan`).

    Args:
      source: the checkpoint.
      expected: the model's parameters: a tree of `jax.ShapeDtypeStruct` (`jax.eval_shape` of its init), or a
        flat `{name: shape}`.
      dont_load: regexes (full match): model parameters that keep their initial value, and stored ones to ignore.
      allow_missing: initialise what the checkpoint lacks (training); False makes a missing parameter an error
        (inference: an uninitialised model would only produce noise).
      rng_seed: seed of adapters that draw values (new vocabulary rows).

    Raises:
      CheckpointMismatchError: listing every stored parameter the model lacks, every shape no adapter fixes,
        the missing ones when `allow_missing` is False, and a checkpoint that provides nothing at all.
    """
    want = dict(expected) if _is_shape_map(expected) else names_and_shapes(expected)
    try:
        patterns = [re.compile(p) for p in dont_load]
    except re.error as e:
        raise ValueError(f"dont_load: invalid regex: {e}") from e
    excluded = lambda name: any(p.fullmatch(name) for p in patterns)
    view = relayout(source, want, log)
    specs = view.specs()
    loaded: dict[str, LeafAdapter | None] = {}
    missing: list[str] = []
    not_loaded: list[str] = []
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    for name, shape in want.items():
        if excluded(name):
            not_loaded.append(name)
        elif name not in specs:
            missing.append(name)
        elif specs[name].shape == tuple(shape):
            loaded[name] = None
        elif adapter := _adapter_for(name, specs[name].shape, tuple(shape)):
            loaded[name] = adapter
        else:
            mismatched.append((name, tuple(shape), specs[name].shape))
    extra = [n for n in specs if n not in want]
    unexpected = [(n, specs[n].shape) for n in extra if not excluded(n)]
    note = ""
    if not loaded and not mismatched:
        note = " It provides none of the model's parameters."
    raise_mismatch(
        source.where,
        [] if (allow_missing and loaded) else [(n, want[n]) for n in missing],
        unexpected,
        mismatched,
        got_names=specs,
        want_names=want,
        note=note,
    )
    return FitPlan(
        view,
        {n: tuple(s) for n, s in want.items()},
        loaded,
        missing,
        not_loaded,
        [n for n in extra if excluded(n)],
        rng_seed,
    )


def _is_shape_map(x: Any) -> bool:
    return isinstance(x, Mapping) and all(isinstance(v, tuple) for v in x.values())


# ------------------------------------------------------------------------------- in-memory conveniences


def adapt_params(loaded: PyTree, expected: PyTree, *, rng_seed: int = 0, log: logging.Logger = _LOG) -> dict[str, Any]:
    """Makes arrays in memory fit the model where big_vision would (layouts and tower adapters); does not check.

    Leaves that no adapter fits are returned unchanged (`check_params` reports them). `loaded` is not modified;
    untouched leaves are shared, not copied.
    """
    want = names_and_shapes(expected)
    view = relayout(DictSource(loaded), want, log)
    out = {}
    for name, spec in view.specs().items():
        array = view.read(name)
        adapter = _adapter_for(name, spec.shape, want[name]) if name in want and spec.shape != want[name] else None
        if adapter is not None:
            log.info(adapter.describe(name, spec.shape, want[name]))
            array = adapter.apply(array, want[name], _leaf_rng(name, rng_seed))
        out[name] = array
    return recover_tree(out.keys(), out.values())
