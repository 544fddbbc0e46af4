"""Orbax checkpoints of the training state: params, optimizer state, step, RNG, and the data iterator (JSON).

Each checkpoint is one orbax step folder with two items: `state` (a pytree of sharded arrays, restored directly
onto its shardings) and `data` (JSON: `{"processes": [every process's data-iterator `get_state()`, in process
order], "_state_checksums": ...}`; each process gets its own entry back). Orbax writes to a temporary folder and
renames it when complete, so a crash during a save leaves the previous checkpoint usable; temporary folders left by
a crash are removed when the next run opens the folder.

Damage that orbax cannot see is caught here:
* Integrity: `save` records a checksum of every array (two uint32 per leaf, computed on the devices: the wrapping
  sum of the array's bits and of the bits weighted by odd position factors) in the `data` item, and
  `restore_latest` recomputes it. A flipped byte in a stored array otherwise restores silently with wrong values
  (orbax's files carry no checksum of the array data).
  A checkpoint without checksums (written before they existed) is restored with a logged warning.
* Data states: all processes' entries are checked together (`check_data`, e.g. the iterator's `check_states`)
  on every process, so all processes take the same decision; a malformed one is damage like any other.
* Fallback: a newest checkpoint that cannot be read (truncated, corrupted, half deleted, a bad data state) is
  moved aside as `<step>.damaged` with a logged warning, and the previous one is used. Only when none is
  readable does `restore_latest` raise.
* Write errors: a failed save (disk full, permissions) raises `CheckpointSaveError`, which names the step, the
  folder, the cause and the last complete checkpoint, wherever orbax reports it (the save call itself, the next
  save, or `wait_until_finished` / `close`); the previous checkpoints are never touched by a failed save.
"""

from __future__ import annotations

import collections
import logging
import os
import pathlib
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from paligemma_ft import multihost

PyTree = Any
log = logging.getLogger(__name__)
CHECKSUM_KEY = "_state_checksums"  # Reserved key of the `data` item; removed before the data state is returned.
PROCESSES_KEY = "processes"  # Key of the `data` item holding every process's data state.


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the message names the step, folder, cause and last good checkpoint."""


class CheckpointRestoreError(RuntimeError):
    """No checkpoint in the folder could be restored; the message lists every step and why it failed."""


class CorruptCheckpointError(ValueError):
    """A checkpoint whose arrays do not match the checksums recorded when it was saved."""


class CheckpointMismatchError(ValueError):
    """A readable checkpoint whose arrays do not fit this run's state (another model size, dtype or optimizer)."""


def _finished_steps(directory: pathlib.Path) -> list[int]:
    """Step folders that orbax finalized (temporary and moved-aside folders have non-numeric names)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


class Manager(ocp.CheckpointManager):
    """A `CheckpointManager` whose save errors become `CheckpointSaveError` with a message a person can act on.

    Orbax saves asynchronously, so a write error can surface in `save` (of this or the next step) or in
    `wait_until_finished` (called by `close` too); each is translated here. `_saving` is the step being written.
    """

    _saving: int | None = None

    def _save_error(self, error: Exception) -> CheckpointSaveError:
        step, directory = self._saving, pathlib.Path(os.fspath(self.directory))
        previous = [s for s in _finished_steps(directory) if step is None or s < step]
        kept = (
            f"The previous checkpoint, step {previous[-1]}, is intact: free the space (or fix the cause) and "
            "run the same command again to resume from it."
            if previous
            else "There is no earlier complete checkpoint; the run would start again from step 0."
        )
        return CheckpointSaveError(
            f"Could not save checkpoint step {step} in {directory}: {type(error).__name__}: {error}. {kept}"
        )

    def wait_until_finished(self) -> None:
        try:
            super().wait_until_finished()
        except Exception as e:  # noqa: BLE001 - any failure of the background write is a failed save.
            raise self._save_error(e) from e

    def save(self, step: int, *args: Any, **kwargs: Any) -> bool:
        self.wait_until_finished()  # The previous save's error is reported as that save's (orbax waits too).
        self._saving = int(step)
        try:
            return super().save(step, *args, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise self._save_error(e) from e


def make_manager(directory: str | os.PathLike, *, max_to_keep: int | None = 2, async_save: bool = True) -> Manager:
    """A `Manager` over `directory` (created if needed) keeping the last `max_to_keep` steps.

    Temporary folders of saves that never finished (a killed run) are deleted when the manager opens.
    """
    _remove_unfinished(pathlib.Path(os.path.abspath(os.fspath(directory))))
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
    return Manager(os.path.abspath(os.fspath(directory)), options=options, item_handlers=handlers)


def _remove_unfinished(directory: pathlib.Path) -> None:
    """Deletes orbax's temporary folders (`<step>.orbax-checkpoint-tmp...`) left by saves that were cut short.

    Done here, synchronously, rather than with orbax's `cleanup_tmp_directories` (a background task), so that
    the folder is clean when the run starts. Process 0 only; nothing is being saved while a run opens.
    """
    if jax.process_index() != 0 or not directory.is_dir():
        return
    for path in directory.iterdir():
        if ".orbax-checkpoint-tmp" in path.name and path.is_dir():
            log.info("Removing %s: a checkpoint save that never finished.", path)
            shutil.rmtree(path, ignore_errors=True)


# --- Checksums -----------------------------------------------------------------------------------------------


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """u32[2] of an array of any dtype: the wrapping sums of its bits and of its bits times (2 * position + 1).

    A change of one element changes the first sum (a nonzero difference below 2^32); moved elements change the
    second. The reductions run where the shards live, so no array is gathered.
    """
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)  # 8 bytes -> a trailing dim of 2.
    position = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(bits.ndim)):
        position = position + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, dim) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[dim]
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * (2 * position + 1), dtype=jnp.uint32)])


@jax.jit
def _checksums(state: PyTree) -> PyTree:
    return jax.tree.map(_leaf_checksum, state)


def state_checksums(state: PyTree) -> dict[str, list[int]]:
    """`{leaf path: [sum, weighted sum]}` of every array in `state` (JSON-able)."""
    sums = jax.device_get(_checksums(state))
    flat, _ = jax.tree_util.tree_flatten_with_path(sums)
    return {jax.tree_util.keystr(path): [int(v) for v in value] for path, value in flat}


# --- Save and restore ------------------------------------------------------------------------------------------


def save(manager: ocp.CheckpointManager, step: int, state: PyTree, data_state: Mapping[str, Any]) -> None:
    """Starts saving `state` (arrays) and this process's `data_state` (JSON-able) as checkpoint `step`.

    Every process calls it (a collective): the data states of all processes are gathered into the checkpoint. The
    arrays' checksums are computed (on the devices) before this returns, so `state` may be donated next; the
    writing itself is asynchronous.

    Raises:
      CheckpointSaveError: this save, or the previous asynchronous one, failed (e.g. disk full).
    """
    data = {PROCESSES_KEY: multihost.allgather_json(dict(data_state)), CHECKSUM_KEY: state_checksums(state)}
    manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)))


def _layout(tree: PyTree) -> collections.Counter:
    return collections.Counter((tuple(int(d) for d in x.shape), str(x.dtype)) for x in jax.tree.leaves(tree))


def _check_layout(manager: ocp.CheckpointManager, step: int, abstract_state: PyTree) -> None:
    """Compares the (shape, dtype) of every saved array with the state this run builds, before reading data.

    Names are not compared (orbax stores its own), only the multiset of shapes and dtypes, which any change of
    model size, parameter dtype or optimizer changes.

    Raises:
      CheckpointMismatchError: the layouts differ (the message lists a few arrays on each side).
      Exception: the metadata cannot be read (a damaged checkpoint).
    """
    meta = manager.item_metadata(step)["state"]
    saved, wanted = _layout(getattr(meta, "tree", meta)), _layout(abstract_state)
    if not saved:
        raise CorruptCheckpointError("the checkpoint lists no arrays (its array metadata is missing)")
    if saved != wanted:
        extra, missing = sorted((saved - wanted).elements()), sorted((wanted - saved).elements())
        raise CheckpointMismatchError(
            f"Checkpoint step {step} in {manager.directory} was saved for another model or optimizer: it holds "
            f"{sum(saved.values())} arrays, this config's training state has {sum(wanted.values())}; only in the "
            f"checkpoint: {_few(extra)}; only in this config: {_few(missing)}. Use a new --workdir for this config, "
            "or run with the config the checkpoint was written with (see config.json next to it)."
        )


def _few(items: list) -> str:
    shown = ", ".join(f"{dtype}{list(shape)}" for shape, dtype in items[:4])
    return (shown + (f" and {len(items) - 4} more" if len(items) > 4 else "")) or "none"


def _is_config_change(error: Exception) -> bool:
    """Errors that say "another config wrote this", not "this is damaged" (`config_change = True` on the class)."""
    return isinstance(error, CheckpointMismatchError) or bool(getattr(error, "config_change", False))


def _own_data_state(data: Any, check_data: Callable[[Any], Any] | None, where: str) -> Any:
    """This process's entry of a checkpoint's `data` item (without checksums), after checking every entry.

    Checkpoints written before every process's state was kept hold one state at the top level; it is checked
    and returned as it is.

    Raises:
      CheckpointMismatchError: a data state of another config, or of another process count whose states differ.
      ValueError: a malformed `data` item or entry (damage).
    """
    if PROCESSES_KEY not in data:
        entries, legacy = [data], True
    else:
        entries, legacy = data[PROCESSES_KEY], False
        if not isinstance(entries, list) or not entries or set(data) != {PROCESSES_KEY}:
            raise ValueError(f"the data item is not {{{PROCESSES_KEY!r}: [one state per process]}}: {data!r}"[:300])
    if check_data is not None:
        try:
            check_data(entries)
        except Exception as e:
            if _is_config_change(e):
                raise CheckpointMismatchError(
                    f"{where}: its data state does not fit this config: {e} Use a new --workdir for this config, or "
                    "run with the config the checkpoint was written with (see config.json next to it)."
                ) from e
            raise ValueError(f"bad data state: {e}") from e
    if legacy:
        return data
    count, index = jax.process_count(), jax.process_index()
    if len(entries) == count:
        return entries[index]
    if any(entry != entries[0] for entry in entries):
        raise CheckpointMismatchError(
            f"{where} holds the data states of {len(entries)} processes, which differ, and this run has {count} "
            f"processes; resume it with {len(entries)}."
        )
    return entries[0]  # The same state on every process (the pipeline's is): any process count can go on.


def _restore_step(
    manager: ocp.CheckpointManager, step: int, target: PyTree, check_data: Callable[[Any], Any] | None
) -> tuple[PyTree, Any]:
    out = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
    )
    if not isinstance(out["data"], Mapping):
        raise ValueError(f"the data item is a {type(out['data']).__name__}, not a JSON object")
    data = dict(out["data"])
    expected = data.pop(CHECKSUM_KEY, None)
    data_state = _own_data_state(data, check_data, f"Checkpoint step {step} in {manager.directory}")
    if expected is None:
        log.warning(
            "Checkpoint step %d in %s has no checksums (written before they were recorded): its arrays are "
            "restored without an integrity check.",
            step,
            manager.directory,
        )
    else:
        if not isinstance(expected, Mapping):
            raise ValueError(f"the recorded checksums are a {type(expected).__name__}, not a JSON object")
        got = state_checksums(out["state"])
        bad = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
        if bad:
            raise CorruptCheckpointError(
                f"{len(bad)} of {len(expected)} arrays differ from the checksums recorded "
                f"when the checkpoint was saved: {', '.join(bad[:5])}" + (" ..." if len(bad) > 5 else "")
            )
    return out["state"], data_state


def _move_aside(manager: ocp.CheckpointManager, step: int) -> pathlib.Path | None:
    """Renames step folder `step` to `<step>.damaged` (process 0), so a new save of that step can be written."""
    path = pathlib.Path(os.fspath(manager.directory)) / str(step)
    target = path.with_name(f"{step}.damaged")
    if jax.process_index() == 0 and path.exists():
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"{step}.damaged{n}")
        path.rename(target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415 - multi-host only.

        multihost_utils.sync_global_devices(f"paligemma_ft_move_aside_{step}")
    return target if target.exists() else None


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract_state: PyTree,
    shardings: PyTree,
    *,
    check_data: Callable[[Any], Any] | None = None,
) -> tuple[PyTree, Any] | None:
    """`(state, data_state)` of the latest readable checkpoint, placed on `shardings`; None when there is none.

    `data_state` is this process's entry. A checkpoint that fails to restore, to match its checksums or to pass
    `check_data` is moved aside (`<step>.damaged`) with a `logging.warning` naming the step and the error, and
    the next older one is tried. Every process calls it and reaches the same decision.

    Args:
      abstract_state: `jax.ShapeDtypeStruct`s with the state's structure, shapes and dtypes.
      shardings: a matching tree of `jax.sharding.Sharding`.
      check_data: called with the list of every process's saved data state; raises if one is bad (or they do not
        fit together, e.g. processes out of step). An error whose class has
        `config_change = True` (or a `CheckpointMismatchError`) means another config wrote it: raised, nothing
        moved; any other error marks the checkpoint damaged.

    Raises:
      CheckpointMismatchError: the newest checkpoint's arrays have other shapes or dtypes than `abstract_state`,
        or its data state is another config's (a changed config); nothing is moved.
      CheckpointRestoreError: checkpoints exist but none can be restored (the message lists each failure).
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_state, shardings)
    failures = []
    for step in steps:
        try:
            _check_layout(manager, step, abstract_state)
            restored = _restore_step(manager, step, target, check_data)
        except CheckpointMismatchError:
            raise  # A config problem, not damage: every checkpoint in the folder would fail the same way.
        except Exception as e:  # noqa: BLE001 - tensorstore, orbax and JSON raise many types for damaged files.
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
            failures.append(f"step {step}: {reason}")
            moved = _move_aside(manager, step)
            log.warning(
                "Checkpoint step %d in %s cannot be restored (%s); it was moved to %s and the previous "
                "checkpoint is tried instead.",
                step,
                manager.directory,
                reason,
                moved,
            )
            continue
        if failures:
            manager.reload()  # Forget the moved steps, so that they can be saved again.
            log.warning(
                "Resuming from checkpoint step %d in %s; newer damaged checkpoints: %s.",
                step,
                manager.directory,
                "; ".join(failures),
            )
        return restored
    manager.reload()
    raise CheckpointRestoreError(
        f"No checkpoint in {manager.directory} can be restored:\n  "
        + "\n  ".join(failures)
        + "\nThe damaged folders were renamed to <step>.damaged; run again to start from "
        "step 0, or restore a backup."
    )
