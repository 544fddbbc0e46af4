"""Training-state checkpoints: exact round trip, damaged checkpoints fall back, failed saves are clear and harmless.

A small pytree stands in for the training state (params, an optax state, step, RNG), sharded over the 8
simulated CPU devices like the trainer's.
"""

import errno
import logging
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from paligemma_ft.checkpoints import state as train_state


def make_state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    params = {
        "w": jnp.asarray(rng.normal(size=(64, 48)), jnp.float32),  # Incompressible: stored as raw bytes.
        "e": jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16),
    }
    opt = optax.adam(1e-3).init(params)
    return {"params": params, "opt": opt, "step": jnp.int32(seed), "rng": jax.random.PRNGKey(seed)}


@pytest.fixture(scope="module")
def layout():
    """(abstract state, shardings): `w` sharded over 8 devices, everything else replicated."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    abstract = jax.eval_shape(lambda: make_state(0))
    shard = jax.tree.map(lambda x: NamedSharding(mesh, P("data") if x.shape == (64, 48) else P()), abstract)
    return abstract, shard


def placed(state, shardings):
    return jax.tree.map(jax.device_put, state, shardings)


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        raw = [np.asarray(v).reshape(-1).view(np.uint8) for v in (x, y)]  # Bits, not values (NaN, -0.0).
        np.testing.assert_array_equal(*raw)


def save_steps(directory, layout, steps, **kw):
    manager = train_state.make_manager(directory, max_to_keep=kw.pop("max_to_keep", 5), **kw)
    for step in steps:
        train_state.save(manager, step, placed(make_state(step), layout[1]), {"pos": step, "fingerprint": {}})
    manager.wait_until_finished()
    return manager


def test_round_trip_is_bitwise_and_keeps_shardings(tmp_path, layout):
    save_steps(tmp_path, layout, [1, 2]).close()
    state, data = train_state.restore_latest(train_state.make_manager(tmp_path), *layout)
    assert data == {"pos": 2, "fingerprint": {}}  # The checksums stay internal.
    assert_same(state, make_state(2))
    assert state["params"]["w"].sharding == layout[1]["params"]["w"]
    assert train_state.restore_latest(train_state.make_manager(tmp_path / "empty"), *layout) is None


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32, jnp.uint8, jnp.bool_])
def test_checksums_see_every_single_bit_flip_and_moved_elements(dtype):
    rng = np.random.default_rng(0)
    x = np.asarray(
        rng.integers(0, 2, (6, 5)) if dtype == jnp.bool_ else rng.normal(size=(6, 5)) * 50, dtype=jnp.dtype(dtype)
    )
    base = train_state.state_checksums({"x": jnp.asarray(x)})
    raw = x.view(np.uint8).reshape(-1)
    for byte in range(0, raw.size, max(1, raw.size // 15)):
        for bit in (0, 7):
            flipped = raw.copy()
            flipped[byte] ^= 1 << bit
            sums = train_state.state_checksums({"x": jnp.asarray(flipped.view(x.dtype).reshape(x.shape))})
            assert sums != base, (byte, bit)
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    if not np.array_equal(swapped, x):
        assert train_state.state_checksums({"x": jnp.asarray(swapped)}) != base


def _largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_byte(step_dir):
    path = _largest_array_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(step_dir):
    path = _largest_array_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def delete_state(step_dir):
    for p in sorted((step_dir / "state").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()


def garble_data_json(step_dir):
    (step_dir / "data" / "metadata").write_text('{"pos": 2, "fingerprint"')


@pytest.mark.parametrize("damage", [flip_byte, truncate, delete_state, garble_data_json])
def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, layout, caplog, damage):
    save_steps(tmp_path, layout, [1, 2]).close()
    damage(tmp_path / "2")
    manager = train_state.make_manager(tmp_path)
    with caplog.at_level(logging.WARNING, logger="paligemma_ft.checkpoints.state"):
        state, data = train_state.restore_latest(manager, *layout)
    assert data["pos"] == 1
    assert_same(state, make_state(1))
    warning = next(
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "paligemma_ft.checkpoints.state"
    )
    assert f"Checkpoint step 2 in {tmp_path} cannot be restored (" in warning  # Step, folder and the error.
    assert (tmp_path / "2.damaged").is_dir() and not (tmp_path / "2").exists()  # Kept for inspection.
    # The run goes on from step 1 and can write step 2 again.
    train_state.save(manager, 2, placed(make_state(7), layout[1]), {"pos": 2})
    manager.close()
    assert_same(train_state.restore_latest(train_state.make_manager(tmp_path), *layout)[0], make_state(7))


def test_a_flipped_byte_is_caught_by_the_checksums(tmp_path, layout, caplog):
    save_steps(tmp_path, layout, [1, 2]).close()
    flip_byte(tmp_path / "2")
    with caplog.at_level(logging.WARNING, logger="paligemma_ft.checkpoints.state"):
        train_state.restore_latest(train_state.make_manager(tmp_path), *layout)
    # Orbax reads the flipped byte without complaint (its files carry no checksum of the array data): the
    # recorded checksums are what catches it.
    assert "CorruptCheckpointError" in caplog.text and "['params']['w']" in caplog.text


def test_every_checkpoint_damaged_is_a_clear_error(tmp_path, layout):
    save_steps(tmp_path, layout, [1, 2]).close()
    truncate(tmp_path / "1")
    flip_byte(tmp_path / "2")
    with pytest.raises(
        train_state.CheckpointRestoreError,
        match=rf"No checkpoint in {tmp_path} can be restored"
        r"(.|\n)*step 2: (.|\n)*step 1: ",
    ):
        train_state.restore_latest(train_state.make_manager(tmp_path), *layout)
    assert train_state.restore_latest(train_state.make_manager(tmp_path), *layout) is None  # Next run: from 0.


def test_checkpoint_of_another_model_is_refused_and_left_alone(tmp_path, layout):
    save_steps(tmp_path, layout, [1]).close()
    other = jax.eval_shape(
        lambda: {**make_state(0), "params": {"w": jnp.zeros((64, 96)), "e": jnp.zeros((16, 8), jnp.bfloat16)}}
    )
    other = {**other, "opt": jax.eval_shape(optax.adam(1e-3).init, other["params"])}
    shard = jax.tree.map(lambda _: layout[1]["step"], other)
    with pytest.raises(
        train_state.CheckpointMismatchError,
        match=r"step 1 .* another model or optimizer.*"
        r"only in the checkpoint: float32\[64, 48\].*only in this config: float32\[64, 96\]",
    ):
        train_state.restore_latest(train_state.make_manager(tmp_path), other, shard)
    assert sorted(os.listdir(tmp_path)) == ["1"]  # Not mistaken for damage.


def _fail_json(self, x, directory):
    raise OSError(errno.ENOSPC, "No space left on device", str(directory))


def _fail_arrays(self, directory, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(directory))


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")  # The patched-out writer,
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # and orbax's abandoned threads.
@pytest.mark.parametrize("async_save", [True, False])
@pytest.mark.parametrize("where", ["arrays", "json"])
def test_disk_full_during_save_is_clear_and_keeps_the_previous_checkpoint(
    tmp_path, layout, monkeypatch, async_save, where
):
    manager = save_steps(tmp_path, layout, [1], max_to_keep=1, async_save=async_save)
    if where == "json":
        monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", _fail_json)
    else:
        monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", _fail_arrays)
    with pytest.raises(
        train_state.CheckpointSaveError,
        match=rf"checkpoint step 2 in {tmp_path}: OSError: .*No space left on device.*"
        r"The previous checkpoint, step 1, is intact",
    ):
        train_state.save(manager, 2, placed(make_state(2), layout[1]), {"pos": 2})
        manager.wait_until_finished()  # With async saves the error surfaces here (or at the next save).
    monkeypatch.undo()
    assert "1" in os.listdir(tmp_path) and "2" not in os.listdir(tmp_path)
    state, data = train_state.restore_latest(train_state.make_manager(tmp_path), *layout)  # A restart.
    assert data["pos"] == 1
    assert_same(state, make_state(1))


def test_folders_of_unfinished_saves_are_removed_when_a_run_opens(tmp_path, layout):
    save_steps(tmp_path, layout, [1]).close()
    shutil.copytree(tmp_path / "1", tmp_path / "2.orbax-checkpoint-tmp")  # What a kill during a save leaves.
    (tmp_path / "2.orbax-checkpoint-tmp" / "commit_success.txt").unlink()
    manager = train_state.make_manager(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["1"] and manager.all_steps() == [1]
