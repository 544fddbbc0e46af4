"""big_vision-compatible `.npz` parameter checkpoints: read, write, fit to a model, place on devices.

The format (big_vision `utils.load_params` / the fine-tuning colab's `npsave`):

* An `.npz` is an uncompressed zip holding one `.npy` array per parameter. The member name is the parameter's
  `/`-joined path (`paligemma_ft.utils.tree_flatten_with_names`), e.g. `img/Transformer/encoderblock/
  LayerNorm_0/scale`. The released Kaggle files put everything under a top-level `params/` prefix; files written
  by the colab (and by `save_params`) have bare `img/...`, `llm/...` names. Both load the same way.
* A path may end in a sub-tree selector, `file.npz:img` or `file.npz:llm`, which loads only that sub-tree (and
  returns it without the selector prefix), as big_vision's `paligemma.load` does for the two towers.
* numpy has no bfloat16, so bf16 arrays are stored as 2-byte void (`|V2`) and viewed back as
  `ml_dtypes.bfloat16`. float32 and float16 are stored as such. Loading never casts.
* Only plain arrays are accepted: files are opened with `allow_pickle=False`, and an object (pickled) array is
  refused, since unpickling a downloaded file can run arbitrary code.

Fitting a checkpoint to a model (`load_for_model`) follows big_vision's `vit.load` / `gemma.load`: the ViT
position embedding is resampled bilinearly to the model's grid, a short vocabulary table is extended with
N(0, 0.02) rows, scan (stacked) and per-layer layouts are converted into each other, and an old
`mlp/gating_einsum` layout [.., 2, F, D] is transposed to [.., 2, D, F]. Then every name and shape is checked
against `jax.eval_shape` of the model, and every problem is reported in one error before anything is placed.
`place_params` moves the numpy tree to its shardings leaf by leaf, so the host never holds two copies.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import uuid
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import scipy.ndimage

from paligemma_ft.errors import UserError
from paligemma_ft.utils import PyTree, names_and_shapes, recover_tree, tree_flatten_with_names

_LOG = logging.getLogger(__name__)

# `path.npz:sub/tree`: the selector is what follows the last `:` when it is a plain name (big_vision's regex,
# relaxed so that a bare `file.npz:img` without a `/` also works).
_SELECTOR = re.compile(r"^(?P<file>.*?)(?::(?P<subtree>[\w/]+))?$")
_POSEMB = re.compile(r"(?:.*/)?pos_embedding")
_EMBEDDER = re.compile(r"(?:.*/)?embedder/input_embedding")
_GATING = re.compile(r"(?:.*/)?mlp/gating_einsum")
DtypeSpec = Any  # None | dtype-like | callable(name) -> dtype-like | tree of dtype-likes / ShapeDtypeStructs.


class CheckpointError(UserError):
    """A checkpoint file cannot be read or written (missing, not a zip, truncated, pickled, ...)."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's names/shapes do not fit the model. Attributes list every problem found.

    Attributes:
      missing: `(name, expected_shape)` in the model but not in the checkpoint.
      unexpected: `(name, found_shape)` in the checkpoint but not in the model.
      mismatched: `(name, expected_shape, found_shape)`.
    """

    def __init__(self, message: str, *, missing: list, unexpected: list, mismatched: list):
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched


# ----------------------------------------------------------------------------------------------- reading


def split_selector(path: str | os.PathLike) -> tuple[str, str | None]:
    """Splits `file.npz:img/head` into `("file.npz", "img/head")`; an existing file name is never split."""
    path = os.fspath(path)
    if os.path.exists(path):
        return path, None
    match = _SELECTOR.match(path)
    subtree = match["subtree"].strip("/") if match["subtree"] else None
    return match["file"], subtree or None


def _recover_dtype(array: np.ndarray) -> np.ndarray:
    """Views 2-byte void arrays (how numpy stores bfloat16) as `ml_dtypes.bfloat16`; others unchanged."""
    if array.dtype.kind == "V" and array.dtype.itemsize == 2 and array.dtype.names is None:
        return array.view(ml_dtypes.bfloat16)
    return array


def _read_member(npz: Any, key: str, file: str) -> np.ndarray:
    try:
        value = npz[key]
    except ValueError as e:
        if "allow_pickle" not in str(e):
            raise
        # `from None`: the numpy traceback adds nothing to "this file holds pickles".
        raise CheckpointError(
            f"Checkpoint {file!r}: array {key!r} holds pickled Python objects; refusing to load it. Parameter "
            "checkpoints hold only numeric arrays, and unpickling a downloaded file can run arbitrary code."
        ) from None
    if not isinstance(value, np.ndarray):  # A zip member that is not a `.npy` comes back as raw bytes.
        raise CheckpointError(f"Checkpoint {file!r}: member {key!r} is not a .npy array.")
    return _recover_dtype(value)


def _root_prefix(names: list[str]) -> str:
    """The prefix under which the parameters live, as big_vision's `load_params` picks it."""
    if any(n.startswith("params/") for n in names):
        return "params/"  # Released Kaggle files.
    if any(n.startswith("opt/target/") for n in names):
        return "opt/target/"  # Old flax-optimizer exports.
    return ""  # Colab `npsave` / `save_params`: bare `img/...`, `llm/...`.


def _read_selected(npz: Any, subtree: str | None, file: str) -> dict[str, np.ndarray]:
    """Reads only the arrays under the root prefix (+ selector), keyed by their names below it."""
    base = _root_prefix(list(npz.files))
    root = base + subtree + "/" if subtree else base
    keys = [k for k in npz.files if k.startswith(root)]
    if not keys:
        tops = sorted({k[len(base) :].split("/")[0] for k in npz.files if k.startswith(base)})
        raise CheckpointError(
            f"Checkpoint {file!r} has no arrays under {root!r}; the sub-trees under {base or 'the root'!r} are {tops}."
        )
    return {k[len(root) :]: _read_member(npz, k, file) for k in keys}


def load_params(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a big_vision `.npz` parameter file into a nested dict of numpy arrays (file dtypes kept).

    Args:
      path: a local `.npz` file, optionally followed by a sub-tree selector (`file.npz:img`).

    Returns:
      Nested dicts of `np.ndarray` (bf16 as `ml_dtypes.bfloat16`), without the `params/` prefix and without the
      selector prefix.

    Raises:
      CheckpointError: naming the file when it is missing, not a zip, truncated/corrupt, holds pickled arrays,
        or has nothing under the selector.
    """
    file, subtree = split_selector(path)
    if not os.path.isfile(file):
        raise CheckpointError(f"Checkpoint file {file!r} does not exist (or is not a file).")
    try:
        # We own the file handle: np.load leaks its own when the zip turns out to be truncated.
        with open(file, "rb") as f:
            magic = f.read(4)
            if magic[:2] != b"PK":  # Zip magic. Without this np.load calls any other file "pickled data".
                raise CheckpointError(
                    f"Checkpoint {file!r} is not an .npz (zip) file{' (it is empty)' if not magic else ''}."
                )
            f.seek(0)
            with np.load(f, allow_pickle=False) as npz:
                arrays = _read_selected(npz, subtree, file)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"Checkpoint {file!r} is not a readable .npz (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e
    try:
        tree = recover_tree(arrays.keys(), arrays.values())
    except ValueError as e:
        raise CheckpointError(f"Checkpoint {file!r}: {e}") from e
    _LOG.info(
        "Loaded %d arrays (%.1f MB) from %s.",
        len(arrays),
        sum(a.nbytes for a in arrays.values()) / 1e6,
        os.fspath(path),
    )
    return tree


# ----------------------------------------------------------------------------------------------- writing


def _storable(name: str, leaf: Any) -> np.ndarray:
    """The numpy array written for `leaf`: bf16 becomes `|V2` (big_vision's layout); pickles are refused."""
    array = np.asarray(leaf)
    if array.dtype == ml_dtypes.bfloat16:
        return array.view(np.dtype("V2"))
    if array.dtype.kind not in "biufc":
        raise CheckpointError(
            f"Cannot save parameter {name!r}: dtype {array.dtype} is not a plain numeric dtype "
            "(only bool/int/float/complex and bfloat16 round-trip through .npz)."
        )
    return array


def save_params(path: str | os.PathLike, tree: PyTree) -> None:
    """Writes `tree` as a big_vision `.npz` (bare `/`-joined names, bf16 as `|V2`), atomically.

    The file is written under a temporary name in the target directory, flushed to disk, then renamed over
    `path`, so a crash never leaves a partial file at `path`. No `.npz` suffix is added.

    Args:
      path: destination file.
      tree: nested dicts/lists of arrays (numpy or fully addressable `jax.Array`).

    Raises:
      CheckpointError: naming `path` when it cannot be written, or the parameter whose dtype cannot be stored.
    """
    path = os.fspath(path)
    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:
            # What np.savez does, by hand: np.savez(file, **flat) breaks on a parameter named "file".
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                for name, leaf in tree_flatten_with_names(tree):
                    with zf.open(name + ".npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, _storable(name, leaf), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):  # Disk full, no such directory, no permission: name the target, not tmp.
            raise CheckpointError(f"Cannot write checkpoint {path!r}: {type(e).__name__}: {e}") from e
        raise


# ------------------------------------------------------------------------------------------- validation


def check_params(loaded: PyTree, expected: PyTree, *, source: str) -> None:
    """Checks that `loaded` has exactly the names and shapes of `expected`; dtypes may differ.

    Args:
      loaded: tree of arrays (e.g. from `load_params`).
      expected: tree of `jax.ShapeDtypeStruct` (from `jax.eval_shape` of the model's init) or arrays.
      source: where `loaded` came from, for the message (a file name).

    Raises:
      CheckpointMismatchError: listing every missing, unexpected and mis-shaped parameter at once.
    """
    got, want = names_and_shapes(loaded), names_and_shapes(expected)
    missing = [(n, s) for n, s in want.items() if n not in got]
    unexpected = [(n, s) for n, s in got.items() if n not in want]
    mismatched = [(n, s, got[n]) for n, s in want.items() if n in got and got[n] != s]
    if not (missing or unexpected or mismatched):
        return
    lines = [
        f"Checkpoint {source} does not fit the model: {len(missing)} missing, {len(unexpected)} unexpected, "
        f"{len(mismatched)} with the wrong shape."
    ]
    if missing:
        lines.append("  missing (in the model, not in the checkpoint):")
        lines += [f"    {n}  expected shape {s}" for n, s in missing]
    if unexpected:
        lines.append("  unexpected (in the checkpoint, not in the model):")
        lines += [f"    {n}  found shape {s}" for n, s in unexpected]
    if mismatched:
        lines.append("  wrong shape:")
        lines += [f"    {n}  expected shape {s}, found shape {f}" for n, s, f in mismatched]
    got_tops, want_tops = {n.split("/")[0] for n in got}, {n.split("/")[0] for n in want}
    if got and want and not got_tops & want_tops:
        lines.append(
            f"  hint: the checkpoint's top-level keys {sorted(got_tops)} share nothing with the model's "
            f"{sorted(want_tops)}; a `file.npz:img` / `:llm` selector may be missing or extra."
        )
    raise CheckpointMismatchError("\n".join(lines), missing=missing, unexpected=unexpected, mismatched=mismatched)


# ------------------------------------------------------------------------------------------- adaptation


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


_LAYOUTS = (
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


def _convert_layouts(flat: dict[str, np.ndarray], want: Mapping[str, Any], log: logging.Logger) -> None:
    """Converts, in place, each tower whose layout (scan or per-layer) differs from the model's."""
    for layout in _LAYOUTS:
        want_stacked, want_unstacked = layout.groups(want, layout.stacked), layout.groups(want, layout.unstacked)
        for pre, group in layout.groups(list(flat), layout.stacked).items():
            if pre in want_unstacked and pre not in want_stacked:
                depth = 0
                for rest, name in group.items():
                    stacked = flat.pop(name)
                    if stacked.ndim == 0:
                        raise CheckpointError(f"Cannot unstack scalar {name!r}: scan leaves have a layer axis.")
                    depth = stacked.shape[0]
                    for i in range(depth):  # Views, not copies.
                        flat[layout.unstacked_fmt.format(pre=pre, i=i, rest=rest)] = stacked[i]
                log.info(
                    "Converted %d %s leaves under %r from the scan layout (depth %d) to per-layer names.",
                    len(group),
                    layout.what,
                    pre,
                    depth,
                )
        for pre, group in layout.groups(list(flat), layout.unstacked).items():
            if pre in want_stacked and pre not in want_unstacked:
                by_rest: dict[str, dict[int, str]] = {}
                for (i, rest), name in group.items():
                    by_rest.setdefault(rest, {})[i] = name
                for rest, layers in by_rest.items():
                    target = layout.stacked_fmt.format(pre=pre, rest=rest)
                    if sorted(layers) != list(range(len(layers))):
                        raise CheckpointError(
                            f"Cannot stack {target!r}: layer indices {sorted(layers)} are not 0..{len(layers) - 1}."
                        )
                    try:
                        flat[target] = np.stack([flat.pop(layers[i]) for i in range(len(layers))])
                    except ValueError as e:
                        raise CheckpointError(f"Cannot stack {target!r}: {e}") from e
                log.info(
                    "Converted %d %s leaves under %r from per-layer names to the scan layout.",
                    len(by_rest),
                    layout.what,
                    pre,
                )


def resample_posemb(posemb: np.ndarray, num_tokens: int) -> np.ndarray:
    """Bilinear resize of a square ViT position-embedding grid, as big_vision's `vit.resample_posemb`.

    Args:
      posemb: [1, N, D] with N a square number (row-major sqrt(N) x sqrt(N) grid).
      num_tokens: the new N, also square.

    Returns:
      [1, num_tokens, D] in `posemb`'s dtype (computed in float32 when scipy cannot handle the dtype).
    """
    gs_old, gs_new = math.isqrt(posemb.shape[1]), math.isqrt(num_tokens)
    if gs_old**2 != posemb.shape[1] or gs_new**2 != num_tokens:
        raise ValueError(
            f"Cannot resample a {posemb.shape[1]}-token position embedding to {num_tokens} tokens: "
            "both must be square grids."
        )
    grid = posemb.reshape(gs_old, gs_old, -1)
    if grid.dtype not in (np.float32, np.float64):
        grid = grid.astype(np.float32)  # scipy.ndimage has no float16/bfloat16 kernels.
    zoom = (gs_new / gs_old, gs_new / gs_old, 1)
    grid = scipy.ndimage.zoom(grid, zoom, order=1)
    return grid.reshape(1, gs_new * gs_new, -1).astype(posemb.dtype, copy=False)


def _fit_leaf(
    name: str, array: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator, log: logging.Logger
) -> np.ndarray:
    """Applies the one adaptation (posemb, vocab, gating transpose) that makes `array` fit `shape`, if any."""
    if _GATING.fullmatch(name) and array.ndim >= 2 and array.shape[:-2] + array.shape[:-3:-1] == shape:
        log.info("Transposed %s from %s (.., 2, F, D) to %s (.., 2, D, F).", name, array.shape, shape)
        return np.swapaxes(array, -1, -2)
    if (
        _POSEMB.fullmatch(name)
        and array.ndim == 3 == len(shape)
        and array.shape[0] == shape[0] == 1
        and array.shape[2] == shape[2]
    ):
        try:
            out = resample_posemb(array, shape[1])
        except ValueError as e:
            log.warning("Not resampling %s: %s", name, e)
            return array  # check_params reports the shape mismatch.
        log.info(
            "Resampled %s bilinearly from %s (%dx%d grid) to %s (%dx%d grid).",
            name,
            array.shape,
            math.isqrt(array.shape[1]),
            math.isqrt(array.shape[1]),
            shape,
            math.isqrt(shape[1]),
            math.isqrt(shape[1]),
        )
        return out
    if (
        _EMBEDDER.fullmatch(name)
        and array.ndim == 2 == len(shape)
        and array.shape[1] == shape[1]
        and array.shape[0] < shape[0]
    ):
        extra = rng.standard_normal((shape[0] - array.shape[0], shape[1]), dtype=np.float32) * 0.02
        log.info(
            "Extended %s from %d to %d rows with N(0, 0.02) rows (as big_vision's gemma.load).",
            name,
            array.shape[0],
            shape[0],
        )
        return np.concatenate([array, extra.astype(array.dtype)], axis=0)
    return array


def adapt_params(loaded: PyTree, expected: PyTree, *, rng_seed: int = 0, log: logging.Logger = _LOG) -> dict[str, Any]:
    """Makes a loaded checkpoint fit the model where big_vision would (does not check; see `check_params`).

    * scan <-> per-layer layouts (`img/Transformer/encoderblock[_i]/...`, `llm/layers[/i]/...`), when the
      model uses the other one;
    * `mlp/gating_einsum` [.., 2, F, D] -> [.., 2, D, F] when that makes the shape match;
    * `img/pos_embedding` [1, N_old, D] -> [1, N_new, D], bilinear on the sqrt(N) grid, dtype kept;
    * `llm/embedder/input_embedding` [V_old, D] -> [V_new, D] when V_old < V_new, appending N(0, 0.02) rows.

    Each change is logged. `loaded` is not modified; untouched leaves are shared, not copied.

    Args:
      loaded: nested dicts of numpy arrays.
      expected: tree of `jax.ShapeDtypeStruct` (or arrays) with the model's names and shapes.
      rng_seed: seed of the numpy generator for the new vocabulary rows.
      log: where to report the changes.

    Returns:
      A new nested dict of numpy arrays.
    """
    flat = dict(tree_flatten_with_names(loaded))
    want = names_and_shapes(expected)
    _convert_layouts(flat, want, log)
    rng = np.random.default_rng(rng_seed)
    for name in sorted(flat):
        if name in want and tuple(flat[name].shape) != want[name]:
            flat[name] = _fit_leaf(name, flat[name], want[name], rng, log)
    return recover_tree(flat.keys(), flat.values())


# --------------------------------------------------------------------------------------- model + devices


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


def _cast_in_place(tree: dict[str, Any], dtype_of: Callable[[str], np.dtype | None], prefix: str = "") -> None:
    """Host-side cast, one leaf at a time, replacing each leaf so the old array can be freed at once."""
    for key, value in tree.items():
        name = prefix + key
        if isinstance(value, dict):
            _cast_in_place(value, dtype_of, name + "/")
        elif (dtype := dtype_of(name)) is not None and value.dtype != dtype:
            tree[key] = value.astype(dtype)


def load_for_model(
    path: str | os.PathLike,
    expected: PyTree,
    *,
    dtypes: DtypeSpec = None,
    rng_seed: int = 0,
    log: logging.Logger = _LOG,
) -> dict[str, Any]:
    """Loads `path`, adapts it to the model (`adapt_params`) and checks it (`check_params`).

    Args:
      path: `.npz` file, optionally with a `:img` / `:llm` selector.
      expected: `jax.eval_shape` of the model's (or the selected tower's) init: names, shapes and dtypes.
      dtypes: optional host-side cast (same forms as in `place_params`); None keeps the file's dtypes. Prefer
        casting on the devices with `place_params(..., dtypes=...)`.
      rng_seed: seed for new vocabulary rows.
      log: where adaptations are reported.

    Returns:
      Nested dicts of numpy arrays with exactly `expected`'s names and shapes.

    Raises:
      CheckpointError: the file cannot be read. CheckpointMismatchError: lists every name/shape problem.
    """
    params = adapt_params(load_params(path), expected, rng_seed=rng_seed, log=log)
    check_params(params, expected, source=repr(os.fspath(path)))
    if dtypes is not None:
        _cast_in_place(params, _dtype_resolver(dtypes))
    return params


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
        try:
            x = jax.device_put(leaf, sharding)
        except ValueError as e:
            raise ValueError(f"Cannot place parameter {name!r} {np.shape(leaf)} with {sharding}: {e}") from e
        del leaf
        if dtype is not None and x.dtype != dtype:
            with warnings.catch_warnings():
                # A cast to another width cannot reuse the donated buffer; jax warns, and we free it below.
                warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
                y = _astype(x, dtype)
            if not x.is_deleted():
                x.delete()
            x = y
        placed.append(x)
    return jax.tree.unflatten(treedef, placed)
