"""Hugging Face PaliGemma folders on disk: safetensors read and written tensor by tensor, sharded with an index,
and folders found offline in the HF cache.

A folder holds `config.json` and either `model.safetensors` or shards `model-0000i-of-0000n.safetensors` listed
in `model.safetensors.index.json` (`{"metadata": {"total_size": N}, "weight_map": {tensor: shard}}`), as
transformers' `save_pretrained` writes them. A safetensors file is an 8-byte little-endian header length, a JSON
header `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the raw data.

Why by hand rather than with the `safetensors` package: its numpy API has no bfloat16 (and PaliGemma 2 ships in
bf16), and its writers take every tensor of a file at once, so a 5 GB shard would be held in memory. Here every
tensor is read from its offset straight into its final buffer, and a shard's header is written first (the
shapes are known before any data) so tensors stream to disk one at a time. The tests read what is written here
with the `safetensors` package and with transformers.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from paligemma_ft.checkpoints.npz import ArraySpec, CheckpointError, bytes_of

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' default `max_shard_size="5GB"`.
_MAX_HEADER = 100 * 2**20  # A header of a 3B model is ~100 KB; anything huge is not a weights file.
DTYPES = {  # safetensors dtype name -> numpy dtype.
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: Any) -> str:
    """The safetensors name of a numpy dtype (`BF16` for `ml_dtypes.bfloat16`).

    Raises:
      CheckpointError: the dtype has no safetensors name.
    """
    try:
        return _NAMES[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise CheckpointError(
            f"dtype {dtype} cannot be stored in safetensors (known: {sorted(_NAMES.values())})"
        ) from None


# ------------------------------------------------------------------------------------------------- reading


class SafetensorsFile:
    """One `.safetensors` file opened header first: specs of every tensor, then tensors read one at a time.

    Raises (on open):
      CheckpointError: naming the file when it is not a safetensors file, or a tensor's offsets disagree with its
        shape and dtype or run past the end of the file (truncated or forged).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._fp = open(self.path, "rb")  # noqa: SIM115 - held until close().
        try:
            self._tensors = self._read_header()
        except BaseException:
            self._fp.close()
            raise

    def _read_header(self) -> dict[str, tuple[ArraySpec, int]]:
        size = os.fstat(self._fp.fileno()).st_size
        raw = self._fp.read(8)
        (n,) = struct.unpack("<Q", raw) if len(raw) == 8 else (-1,)
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{self.path} is not a safetensors file (header length {n}, file size {size}).")
        try:
            header = json.loads(self._fp.read(n))
        except ValueError as e:
            raise CheckpointError(f"{self.path} is not a safetensors file: its header is not JSON ({e}).") from None
        self.metadata = header.pop("__metadata__", None) or {}
        start, tensors = 8 + n, {}
        for name, entry in header.items():
            try:
                dtype, shape = DTYPES[entry["dtype"]], tuple(int(d) for d in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{self.path}: tensor {name!r} has an unreadable header entry ({e!r}).") from None
            spec = ArraySpec(shape, dtype)
            if end - begin != spec.nbytes or begin < 0 or start + end > size:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} ({entry['dtype']} {list(shape)}) declares bytes {begin}..{end} "
                    f"of a {size - start}-byte data section; the file is truncated or damaged."
                )
            tensors[name] = (spec, start + begin)
        return tensors

    def specs(self) -> dict[str, ArraySpec]:
        return {name: spec for name, (spec, _) in self._tensors.items()}

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """One tensor (or the `rows` slice of its first axis, step 1), read straight from the file."""
        spec, offset = self._tensors[name]
        shape = spec.shape
        if rows is not None:
            start, stop, _ = rows.indices(shape[0])
            row_bytes = math.prod(shape[1:]) * spec.dtype.itemsize
            offset, shape = offset + start * row_bytes, (max(stop - start, 0), *shape[1:])
        out = np.empty(shape, spec.dtype)
        self._fp.seek(offset)
        if self._fp.readinto(bytes_of(out)) != out.nbytes:
            raise CheckpointError(f"{self.path}: tensor {name!r} is truncated.")
        return out

    def close(self) -> None:
        self._fp.close()


class HFWeights:
    """The weights of an HF folder (one file or shards + index), as one name -> tensor map. Use `with`.

    Raises (on open):
      CheckpointError: no weights (or only pickle-based `.bin` files), an index that lists missing shards, or a
        shard that lacks the tensors the index puts in it; each named with the folder.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._files: dict[str, SafetensorsFile] = {}
        try:
            self._where = self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> dict[str, str]:
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a safetensors index ({e!r}).") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (self.folder / s).is_file()]
            if missing:
                raise CheckpointError(
                    f"{self.folder}: {len(missing)} of the {len(shards)} shards listed in {INDEX} are missing: "
                    f"{', '.join(missing)}; download the folder again (all shards)."
                )
        elif (self.folder / SINGLE).is_file():
            weight_map, shards = None, [SINGLE]
        else:
            bins = sorted(p.name for p in self.folder.glob("*.bin"))
            extra = (
                f"; it has {', '.join(bins)}, which are pickles and are not read (they can run code)" if bins else ""
            )
            raise CheckpointError(f"{self.folder} has no {SINGLE} and no {INDEX}{extra}.")
        for shard in shards:
            self._files[shard] = SafetensorsFile(self.folder / shard)
        where = {name: shard for shard, f in self._files.items() for name in f.specs()}
        if weight_map is not None:
            wrong = [n for n, s in weight_map.items() if where.get(n) != s]
            if wrong:
                raise CheckpointError(
                    f"{self.folder}: {len(wrong)} tensor(s) listed in {INDEX} are not in their shard, e.g. "
                    f"{wrong[0]!r} (said to be in {weight_map[wrong[0]]}); the folder is damaged."
                )
        return where

    def specs(self) -> dict[str, ArraySpec]:
        return {name: spec for f in self._files.values() for name, spec in f.specs().items()}

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        return self._files[self._where[name]].read(name, rows)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __enter__(self) -> HFWeights:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------- writing


def _header(entries: Sequence[tuple[str, ArraySpec]], metadata: Mapping[str, str]) -> tuple[bytes, int]:
    """The header bytes (padded so the data starts 8-byte aligned, as the safetensors library writes it)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, spec in entries:
        header[name] = {
            "dtype": dtype_name(spec.dtype),
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw, offset


class ShardedWriter:
    """Writes tensors, in a planned order, into `model.safetensors` or shards of at most `max_shard_bytes` + index.

    The plan (names and specs, in order) is given up front, so each shard's header is written before its data
    and every tensor goes to disk as it is given: host memory holds one tensor, never a shard. Shards are split
    the way transformers does (a tensor larger than the limit gets a shard of its own). Files are written under
    temporary names and renamed when all are complete.

    Raises:
      CheckpointError: a tensor given out of order or with another shape/dtype than planned.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        plan: Sequence[tuple[str, ArraySpec]],
        *,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        metadata: Mapping[str, str] | None = None,
    ):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, ArraySpec]]] = [[]]
        size = 0
        for name, spec in plan:
            if shards[-1] and size + spec.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, spec))
            size += spec.nbytes
        n = len(shards)
        self.shard_names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shard_bytes = [sum(s.nbytes for _, s in shard) for shard in shards]
        self._queue = [(name, spec, i) for i, shard in enumerate(shards) for name, spec in shard]
        self._shards, self._next = shards, 0
        self._fp: Any = None  # The shard being written.
        self._current = -1
        self.total_bytes = sum(self.shard_bytes)

    def _tmp(self, i: int) -> Path:
        return self.folder / f".{self.shard_names[i]}.partial"

    def write(self, name: str, array: np.ndarray, *, pad_rows: bool = False) -> None:
        """The next planned tensor; with `pad_rows`, `array` may have fewer rows than planned and zero rows follow
        (written in chunks, so a padded copy of a large table is never made)."""
        if self._next >= len(self._queue):
            raise CheckpointError(f"tensor {name!r} was not planned (all {len(self._queue)} are written).")
        want, spec, shard = self._queue[self._next]
        array = np.ascontiguousarray(array)
        rows_ok = array.shape[1:] == spec.shape[1:] and array.shape[0] <= spec.shape[0] if pad_rows else True
        if name != want or array.dtype != spec.dtype or not rows_ok or (not pad_rows and array.shape != spec.shape):
            raise CheckpointError(
                f"tensor {name!r} {array.shape} {array.dtype} given where {want!r} {spec.shape} {spec.dtype} "
                "was planned."
            )
        if shard != self._current:
            if self._fp is not None:
                self._fp.close()
            self._current = shard
            self._fp = open(self._tmp(shard), "wb")  # noqa: SIM115 - closed at the next shard or in close().
            self._fp.write(_header(self._shards[shard], self._metadata)[0])
        self._fp.write(bytes_of(array))
        missing = spec.nbytes - array.nbytes
        while missing > 0:
            chunk = min(missing, 1 << 24)
            self._fp.write(bytes(chunk))
            missing -= chunk
        self._next += 1

    def close(self) -> None:
        """Checks that every planned tensor was written, renames the shards and writes the index."""
        if self._fp is not None:
            self._fp.close()
        if self._next != len(self._queue):
            raise CheckpointError(f"only {self._next} of the {len(self._queue)} planned tensors were written.")
        for i, name in enumerate(self.shard_names):
            os.replace(self._tmp(i), self.folder / name)
        if len(self.shard_names) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {name: self.shard_names[i] for name, _, i in self._queue},
            }
            (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def abort(self) -> None:
        if self._fp is not None:
            self._fp.close()
        for i in range(len(self.shard_names)):
            self._tmp(i).unlink(missing_ok=True)


# -------------------------------------------------------------------------------------------- folders, cache


def read_config(folder: str | os.PathLike) -> dict | None:
    """The folder's `config.json` as a dict, or None when there is none or it is not JSON."""
    try:
        with open(Path(folder) / "config.json", encoding="utf-8") as f:
            hf_config = json.load(f)
    except (OSError, ValueError):
        return None
    return hf_config if isinstance(hf_config, dict) else None


def is_hf_folder(folder: str | os.PathLike) -> bool:
    """True for a folder with a `config.json` and safetensors weights (a transformers `save_pretrained` folder)."""
    folder = Path(folder)
    return (folder / "config.json").is_file() and ((folder / SINGLE).is_file() or (folder / INDEX).is_file())


def cached_snapshot(repo: str) -> Path:
    """The HF cache's snapshot folder of `repo` (`org/name[@revision]`), found offline by huggingface_hub.

    Raises:
      FileNotFoundError: huggingface_hub is not installed, or the repo (revision) is not in the cache; the
        message names the cache folder and the download command.
    """
    repo_id, _, revision = repo.partition("@")
    try:
        import huggingface_hub  # noqa: PLC0415 - the `hf` extra.
        from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: PLC0415
    except ImportError as e:
        raise FileNotFoundError(f"checkpoint 'hf:{repo}' needs huggingface_hub: pip install 'paligemma-ft[hf]'") from e
    try:
        # local_files_only: the cache answers, the network is never asked.
        path = huggingface_hub.snapshot_download(repo_id, revision=revision or None, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError) as e:
        cache = huggingface_hub.constants.HF_HUB_CACHE
        raise FileNotFoundError(
            f"checkpoint 'hf:{repo}' is not in the Hugging Face cache {cache} ({type(e).__name__}); download it "
            f"first with `hf download {repo_id}` (or set HF_HUB_CACHE to the cache that holds it)"
        ) from None
    return Path(path)
