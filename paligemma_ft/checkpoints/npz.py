"""big_vision-compatible `.npz` parameter files: the format only (read, write, validate names/shapes/dtypes).

The format (big_vision `utils.load_params` / the fine-tuning colab's `npsave`):

* An `.npz` is a zip holding one `.npy` array per parameter. The member name is the parameter's `/`-joined path
  (`paligemma_ft.utils.tree_flatten_with_names`), e.g. `img/Transformer/encoderblock/LayerNorm_0/scale`. The
  released Kaggle files put everything under a top-level `params/` prefix; files written by the colab (and by
  `save_params`) have bare `img/...`, `llm/...` names. Both read the same way.
* A path may end in a sub-tree selector, `file.npz:img` or `file.npz:llm`, which reads only that sub-tree, as
  big_vision's `paligemma.load` does for the two towers.
* numpy has no bfloat16, so bf16 arrays are stored as 2-byte void (`|V2`) and viewed back as
  `ml_dtypes.bfloat16`. float32 and float16 are stored as such. Reading never casts.

Reading is header first (`NpzReader`): opening a file parses every member's `.npy` header (shape, dtype, order)
without inflating any data, checks that the zip's declared size of each member is exactly header + data, and
refuses object (pickled) arrays, since unpickling a downloaded file can run arbitrary code. A caller can thus
compare every shape with the model's before a byte of data is read: a small zip bomb (a deflated member that
inflates to gigabytes) is refused from its header in milliseconds. Arrays are then read one at a time, straight
from the file into their final buffer for uncompressed members (one layer of a stacked array can be read alone),
and checked against the zip's CRC when read whole.

Fitting a checkpoint to a model lives in `checkpoints/fit.py`, placement on devices in `checkpoints/placement.py`
and the loading path that uses both in `checkpoints/loading.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import struct
import uuid
import zipfile
import zlib
from typing import IO, Any

import ml_dtypes
import numpy as np

from paligemma_ft.errors import UserError
from paligemma_ft.utils import PyTree, names_and_shapes, recover_tree, tree_flatten_with_names

_LOG = logging.getLogger(__name__)

# `path.npz:sub/tree`: the selector is what follows the last `:` when it is a plain name (big_vision's regex,
# relaxed so that a bare `file.npz:img` without a `/` also works).
_SELECTOR = re.compile(r"^(?P<file>.*?)(?::(?P<subtree>[\w/]+))?$")
_MAX_HEADER = 1 << 16  # A `.npy` header of a plain array is ~100 bytes; numpy's own limit is 10 000.
_CHUNK = 1 << 24  # Read deflated members 16 MiB at a time.


class CheckpointError(UserError, ValueError):
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


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """What a checkpoint says about one array before it is read: `shape` and `dtype` (bf16 recovered)."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class _Member:
    spec: ArraySpec
    info: zipfile.ZipInfo
    stored: np.dtype  # The dtype in the file (`|V2` for bf16).
    header_len: int  # Bytes of magic + header before the data.
    fortran: bool


# ----------------------------------------------------------------------------------------------- reading


def split_selector(path: str | os.PathLike) -> tuple[str, str | None]:
    """Splits `file.npz:img/head` into `("file.npz", "img/head")`; an existing file name is never split."""
    path = os.fspath(path)
    if os.path.exists(path):
        return path, None
    match = _SELECTOR.match(path)
    assert match is not None  # The pattern matches every string.
    subtree = match["subtree"].strip("/") if match["subtree"] else None
    return match["file"], subtree or None


def _recover_dtype(dtype: np.dtype) -> np.dtype:
    """2-byte void (how numpy stores bfloat16) is `ml_dtypes.bfloat16`; other dtypes unchanged."""
    if dtype.kind == "V" and dtype.itemsize == 2 and dtype.names is None:
        return np.dtype(ml_dtypes.bfloat16)
    return dtype


def _root_prefix(names: list[str]) -> str:
    """The prefix under which the parameters live, as big_vision's `load_params` picks it."""
    if any(n.startswith("params/") for n in names):
        return "params/"  # Released Kaggle files.
    if any(n.startswith("opt/target/") for n in names):
        return "opt/target/"  # Old flax-optimizer exports.
    return ""  # Colab `npsave` / `save_params`: bare `img/...`, `llm/...`.


def _parse_header(fp: IO[bytes], file: str, key: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """`(shape, fortran_order, dtype, header_len)` of the `.npy` stream at `fp` (only the header is read)."""
    try:
        major, minor = np.lib.format.read_magic(fp)
        if (major, minor) == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp, max_header_size=_MAX_HEADER)
        elif (major, minor) == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp, max_header_size=_MAX_HEADER)
        else:
            raise ValueError(f".npy format version {major}.{minor} is not used for numeric arrays")
    except ValueError as e:
        raise CheckpointError(f"Checkpoint {file!r}: member {key!r} is not a readable .npy array: {e}") from None
    if dtype.hasobject:
        # `from None`: the numpy traceback adds nothing to "this file holds pickles".
        raise CheckpointError(
            f"Checkpoint {file!r}: array {key!r} holds pickled Python objects; refusing to load it. Parameter "
            "checkpoints hold only numeric arrays, and unpickling a downloaded file can run arbitrary code."
        ) from None
    return tuple(int(d) for d in shape), bool(fortran), dtype, fp.tell()


def bytes_of(array: np.ndarray) -> memoryview:
    """A writable byte view of a C-contiguous array (what `readinto` fills)."""
    return memoryview(array.reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # ndarray is a buffer.


class NpzReader:
    """A `.npz` opened header first: every array's name, shape and dtype, then arrays read one at a time.

    Names are relative to the root prefix (`params/` for Kaggle files) and, with a selector, to the selected
    sub-tree unless `keep_selector` is set (then `file.npz:img` yields `img/...` names, as the model has them).
    Use as a context manager, or call `close()`.

    Raises (on open):
      CheckpointError: naming the file when it is missing, not a zip, truncated/corrupt, holds a non-`.npy` or
        pickled member, declares a member size that disagrees with its header, or has nothing under the selector.
    """

    def __init__(self, path: str | os.PathLike, *, keep_selector: bool = False):
        self.path = os.fspath(path)
        self.file, subtree = split_selector(self.path)
        if not os.path.isfile(self.file):
            raise CheckpointError(f"Checkpoint file {self.file!r} does not exist (or is not a file).")
        self._fp = open(self.file, "rb")  # noqa: SIM115 - held open until close().
        try:
            magic = self._fp.read(4)
            if magic[:2] != b"PK":  # Zip magic. Without this np.load calls any other file "pickled data".
                raise CheckpointError(
                    f"Checkpoint {self.file!r} is not an .npz (zip) file{' (it is empty)' if not magic else ''}."
                )
            self._fp.seek(0)
            self._zip = zipfile.ZipFile(self._fp)
            self._members = self._read_headers(subtree, keep_selector)
        except CheckpointError:
            self.close()
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as e:
            self.close()
            raise CheckpointError(
                f"Checkpoint {self.file!r} is not a readable .npz (truncated or corrupt?): {type(e).__name__}: {e}"
            ) from e

    def _read_headers(self, subtree: str | None, keep_selector: bool) -> dict[str, _Member]:
        infos = {i.filename.removesuffix(".npy"): i for i in self._zip.infolist() if not i.is_dir()}
        base = _root_prefix(list(infos))
        root = base + subtree + "/" if subtree else base
        keys = [k for k in infos if k.startswith(root)]
        if not keys:
            tops = sorted({k[len(base) :].split("/")[0] for k in infos if k.startswith(base)})
            raise CheckpointError(
                f"Checkpoint {self.file!r} has no arrays under {root!r}; the sub-trees under "
                f"{base or 'the root'!r} are {tops}."
            )
        members = {}
        for key in keys:
            info = infos[key]
            if not info.filename.endswith(".npy"):
                raise CheckpointError(f"Checkpoint {self.file!r}: member {info.filename!r} is not a .npy array.")
            with self._zip.open(info) as f:  # Inflates only the few header bytes of a deflated member.
                shape, fortran, dtype, header_len = _parse_header(f, self.file, key)
            spec = ArraySpec(shape, _recover_dtype(dtype))
            if info.file_size != header_len + spec.nbytes:
                raise CheckpointError(
                    f"Checkpoint {self.file!r}: member {key!r} declares {info.file_size} bytes in the zip, but its "
                    f".npy header says {header_len} + {spec.nbytes} ({shape} {dtype}); the file is damaged or forged."
                )
            name = key[len(base) :] if keep_selector else key[len(root) :]
            members[name] = _Member(spec, info, dtype, header_len, fortran)
        return members

    # -- the ParamSource protocol (checkpoints/fit.py) ----------------------------------------------------------

    @property
    def where(self) -> str:
        return repr(self.path)

    def specs(self) -> dict[str, ArraySpec]:
        """`{name: ArraySpec}` of every array, from the headers alone."""
        return {name: m.spec for name, m in self._members.items()}

    def read(self, name: str, index: int | None = None) -> np.ndarray:
        """Reads one array (or, with `index`, its slice `[index]` along axis 0) in its stored dtype.

        Raises:
          CheckpointError: the data is truncated or fails the zip's CRC check (the message names the array).
        """
        m = self._members[name]
        shape, stored = m.spec.shape, m.stored
        try:
            if index is not None and not m.fortran and m.info.compress_type == zipfile.ZIP_STORED:
                if not 0 <= index < shape[0]:
                    raise IndexError(f"index {index} out of range for axis 0 of {shape}")
                out = np.empty(shape[1:], stored)
                self._read_stored(m, out, skip=index * out.nbytes, check_crc=False)
            else:
                out = np.empty(shape[::-1] if m.fortran else shape, stored)
                if m.info.compress_type == zipfile.ZIP_STORED:
                    self._read_stored(m, out, skip=0, check_crc=True)
                else:
                    self._read_deflated(m, out)
                out = out.T if m.fortran else out
                if index is not None:
                    out = np.ascontiguousarray(out[index])
        except (OSError, zlib.error, zipfile.BadZipFile, EOFError) as e:
            raise CheckpointError(f"Checkpoint {self.file!r}: cannot read array {name!r}: {e}") from e
        return out.view(m.spec.dtype) if stored != m.spec.dtype else out

    def _data_offset(self, m: _Member) -> int:
        """Where the member's `.npy` data starts in the file (after the local zip header and the `.npy` header)."""
        self._fp.seek(m.info.header_offset)
        local = self._fp.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"bad local header for {m.info.filename!r}")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        return m.info.header_offset + 30 + name_len + extra_len + m.header_len

    def _read_stored(self, m: _Member, out: np.ndarray, *, skip: int, check_crc: bool) -> None:
        buffer = bytes_of(out)
        self._fp.seek(self._data_offset(m) + skip)
        if self._fp.readinto(buffer) != out.nbytes:
            raise EOFError(f"truncated: expected {out.nbytes} bytes")
        if check_crc:
            self._fp.seek(self._data_offset(m) - m.header_len)
            crc = zlib.crc32(buffer, zlib.crc32(self._fp.read(m.header_len)))
            if crc != m.info.CRC:
                raise zipfile.BadZipFile(f"CRC mismatch (stored {m.info.CRC:#010x}, computed {crc:#010x})")

    def _read_deflated(self, m: _Member, out: np.ndarray) -> None:
        buffer = bytes_of(out)
        with self._zip.open(m.info) as f:  # zipfile checks the CRC when the member is read to its end.
            f.read(m.header_len)
            pos = 0
            while pos < len(buffer):
                chunk = f.read(min(_CHUNK, len(buffer) - pos))
                if not chunk:
                    raise EOFError(f"truncated: expected {len(buffer)} bytes, got {pos}")
                buffer[pos : pos + len(chunk)] = chunk
                pos += len(chunk)
            f.read()  # To the end, so the CRC is checked.

    def close(self) -> None:
        if getattr(self, "_zip", None) is not None:
            self._zip.close()
        self._fp.close()

    def __enter__(self) -> NpzReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_specs(path: str | os.PathLike) -> dict[str, ArraySpec]:
    """`{name: ArraySpec}` of a `.npz[:subtree]` from its headers (no data is read)."""
    with NpzReader(path) as reader:
        return reader.specs()


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
    with NpzReader(path) as reader:
        names = list(reader.specs())
        arrays = [reader.read(name) for name in names]
    try:
        tree = recover_tree(names, arrays)
    except ValueError as e:
        raise CheckpointError(f"Checkpoint {reader.file!r}: {e}") from e
    _LOG.info("Loaded %d arrays (%.1f MB) from %s.", len(arrays), sum(a.nbytes for a in arrays) / 1e6, path)
    return tree


# ----------------------------------------------------------------------------------------------- writing


def storable(name: str, leaf: Any) -> np.ndarray:
    """The numpy array written for `leaf`: bf16 becomes `|V2` (big_vision's layout); other dtypes are refused.

    Raises:
      CheckpointError: naming the parameter whose dtype is not bool/int/float/complex or bfloat16 (e.g. float8,
        which big_vision cannot read back).
    """
    array = np.asarray(leaf)
    if array.dtype == ml_dtypes.bfloat16:
        return array.view(np.dtype("V2"))
    if array.dtype.kind not in "biufc":
        raise CheckpointError(
            f"Cannot save parameter {name!r}: dtype {array.dtype} is not a plain numeric dtype "
            "(only bool/int/float/complex and bfloat16 round-trip through .npz)."
        )
    return array


class NpzWriter:
    """Writes a big_vision `.npz` one array at a time (bare `/`-joined names, bf16 as `|V2`), atomically.

    Arrays go into a temporary file in the target directory; `close()` flushes it to disk and renames it over
    `path`, so a crash never leaves a partial file at `path`. Leaving the `with` block on an exception removes
    the temporary file. No `.npz` suffix is added.

    Raises:
      CheckpointError: naming `path` when it cannot be written, or the parameter whose dtype cannot be stored.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        directory, base = os.path.split(os.path.abspath(self.path))
        self._tmp = os.path.join(directory, f".{base}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            self._fp = open(self._tmp, "xb")  # noqa: SIM115 - closed in close()/abort().
        except OSError as e:  # No such directory, no permission: name the target, not the temporary file.
            raise CheckpointError(f"Cannot write checkpoint {self.path!r}: {type(e).__name__}: {e}") from e
        # What np.savez does, by hand: np.savez(file, **flat) breaks on a parameter named "file".
        self._zip = zipfile.ZipFile(self._fp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self.count = self.nbytes = 0

    def write(self, name: str, array: Any) -> None:
        """Appends one array under `name` (streamed: no copy of the whole array is made)."""
        data = storable(name, array)
        try:
            with self._zip.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, data, allow_pickle=False)
        except OSError as e:  # Disk full.
            self.abort()
            raise CheckpointError(f"Cannot write checkpoint {self.path!r}: {type(e).__name__}: {e}") from e
        self.count, self.nbytes = self.count + 1, self.nbytes + data.nbytes

    def close(self) -> None:
        """Finishes the zip, syncs it to disk and renames it to `path`."""
        try:
            self._zip.close()
            self._fp.flush()
            os.fsync(self._fp.fileno())
            self._fp.close()
            os.replace(self._tmp, self.path)
        except OSError as e:
            self.abort()
            raise CheckpointError(f"Cannot write checkpoint {self.path!r}: {type(e).__name__}: {e}") from e

    def abort(self) -> None:
        """Drops the temporary file; `path` is left as it was."""
        for close in (self._zip.close, self._fp.close):
            try:
                close()
            except (OSError, ValueError):  # Already closed, or the disk is full: nothing more to do.
                pass
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save_params(path: str | os.PathLike, tree: PyTree) -> None:
    """Writes `tree` as a big_vision `.npz` (bare `/`-joined names, bf16 as `|V2`), atomically (`NpzWriter`).

    Args:
      path: destination file.
      tree: nested dicts/lists of arrays (numpy or fully addressable `jax.Array`).
    """
    with NpzWriter(path) as writer:
        for name, leaf in tree_flatten_with_names(tree):
            writer.write(name, leaf)


# ------------------------------------------------------------------------------------------- validation


def check_params(loaded: PyTree, expected: PyTree, *, source: str) -> None:
    """Checks that `loaded` has exactly the names and shapes of `expected`; dtypes may differ.

    Args:
      loaded: tree of arrays (e.g. from `load_params`) or of `ArraySpec`s.
      expected: tree of `jax.ShapeDtypeStruct` (from `jax.eval_shape` of the model's init) or arrays.
      source: where `loaded` came from, for the message (a file name).

    Raises:
      CheckpointMismatchError: listing every missing, unexpected and mis-shaped parameter at once.
    """
    got, want = names_and_shapes(loaded), names_and_shapes(expected)
    missing = [(n, s) for n, s in want.items() if n not in got]
    unexpected = [(n, s) for n, s in got.items() if n not in want]
    mismatched = [(n, s, got[n]) for n, s in want.items() if n in got and got[n] != s]
    raise_mismatch(source, missing, unexpected, mismatched, got_names=got, want_names=want)


def raise_mismatch(
    source: str,
    missing: list,
    unexpected: list,
    mismatched: list,
    *,
    got_names: Any = (),
    want_names: Any = (),
    note: str = "",
) -> None:
    """Raises one `CheckpointMismatchError` listing every problem (does nothing when there is none)."""
    if not (missing or unexpected or mismatched):
        return
    lines = [
        f"Checkpoint {source} does not fit the model: {len(missing)} missing, {len(unexpected)} unexpected, "
        f"{len(mismatched)} with the wrong shape.{note}"
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
    got_tops, want_tops = {n.split("/")[0] for n in got_names}, {n.split("/")[0] for n in want_names}
    if got_tops and want_tops and not got_tops & want_tops:
        lines.append(
            f"  hint: the checkpoint's top-level keys {sorted(got_tops)} share nothing with the model's "
            f"{sorted(want_tops)}; a `file.npz:img` / `:llm` selector may be missing or extra."
        )
    raise CheckpointMismatchError("\n".join(lines), missing=missing, unexpected=unexpected, mismatched=mismatched)
