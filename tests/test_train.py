"""The trainer end to end: run(), resume, the parameter-export contract, sharded meshes, frozen parameters."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from paligemma_ft import predictor as predictor_lib
from paligemma_ft.checkpoints import loading
from paligemma_ft.checkpoints import npz as ckpt_lib
from paligemma_ft.training import loop as train
from paligemma_ft.training.workdir import ConfigChangeError
from paligemma_ft.utils import tree_flatten_with_names


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_everything_and_a_second_run_resumes(tiny_config, tmp_path, capsys):
    workdir = tmp_path / "run"
    config = tiny_config()
    last = train.run(config, workdir)
    rows = _rows(workdir)
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == [1, 2, 3, 4]
    for r in rows:
        if "train/loss" in r:
            assert {"train/lr", "train/grad_norm", "train/examples_per_sec"} <= set(r)
            assert np.isfinite(r["train/loss"])
    eval_rows = [r for r in rows if "val/cider" in r]
    assert [r["step"] for r in eval_rows] == [0, 4] and all(r["val/n"] == 10 for r in eval_rows)
    assert last["train/loss"] == [r for r in rows if "train/loss" in r][-1]["train/loss"]
    assert last["val/cider"] == eval_rows[-1]["val/cider"]
    # Checkpoints at steps 2 and 4 (orbax step folders), the config, the report and the curves.
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["total_steps"] == 4 and saved["model_name_or_preset"] == "tiny_pg1"
    report = (workdir / "report.md").read_text()
    assert "## Parameters" in report and "val/cider" in report and "tiny_pg1" in report
    assert (workdir / "curves.png").stat().st_size > 1000
    assert list((workdir / "eval").glob("predictions_val_step4.jsonl"))
    # params.npz is big_vision's layout: it loads into the model as it is, and a predictor runs on it.
    p = predictor_lib.load_predictor(str(workdir), "builtin:tiny")
    assert set(ckpt_lib.names_and_shapes(p.params)) == set(
        ckpt_lib.names_and_shapes(loading.init_shapes(p.model, 32, 8))
    )
    capsys.readouterr()

    # Same command again: it resumes at step 4, trains nothing and keeps one row per training step.
    before = np.load(workdir / "params.npz")
    train.run(tiny_config(), workdir)
    out = capsys.readouterr().out
    assert "Resuming" in out and "from step 4" in out
    rows2 = _rows(workdir)
    assert [r["step"] for r in rows2 if "train/loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows2 if "val/cider" in r] == [0, 4]
    after = np.load(workdir / "params.npz")
    assert all(np.array_equal(before[k], after[k]) for k in before.files)

    # More steps on the same workdir: a changed config, refused (config.json untouched) unless allowed; then the
    # run continues from the checkpoint instead of restarting, and the report records the change.
    saved_config = (workdir / "config.json").read_bytes()
    with pytest.raises(ConfigChangeError, match=r"total_steps: 4 -> 6\. Pass --allow-config-change"):
        train.run(tiny_config(total_steps=6, ckpt_steps=2), workdir)
    assert (workdir / "config.json").read_bytes() == saved_config
    train.run(tiny_config(total_steps=6, ckpt_steps=2, allow_config_change=True), workdir)
    assert [r["step"] for r in _rows(workdir) if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == 6
    report = (workdir / "report.md").read_text()
    assert "Resumed at step 4 with a changed config" in report and "| `total_steps` | `4` | `6` |" in report
    assert '"total_steps": 4' in report  # The config before the change, in full.


@pytest.mark.slow  # fast: test_run_writes_everything_and_a_second_run_resumes
def test_resumed_run_equals_uninterrupted_run(tiny_config, tmp_path, monkeypatch):
    config = lambda: tiny_config(total_steps=6, ckpt_steps=3, evals={})  # noqa: E731
    full = tmp_path / "full"
    train.run(config(), full)

    # Interrupt the same run right after its step-3 checkpoint is written, then start it again.
    real_save = train.train_state.save

    def save_then_die(manager, step, state, data_state):
        real_save(manager, step, state, data_state)
        if step == 3:
            manager.wait_until_finished()
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(train.train_state, "save", save_then_die)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        train.run(config(), part)
    assert not (part / "params.npz").exists()
    monkeypatch.setattr(train.train_state, "save", real_save)
    train.run(config(), part)
    a, b = np.load(full / "params.npz"), np.load(part / "params.npz")
    assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
    loss = lambda d: [(r["step"], r["train/loss"]) for r in _rows(d) if "train/loss" in r]  # noqa: E731
    assert loss(full) == loss(part) and len(loss(part)) == 6


@pytest.mark.slow  # fast: test_sharding's data-parallel and FSDP steps
def test_data_parallel_and_fsdp_meshes_give_single_device_losses(tiny_config, tmp_path):
    assert jax.device_count() == 8
    common = dict(total_steps=5, ckpt_steps=0, evals={})
    runs = {
        "one": dict(num_devices=1, mesh=[("data", 1)]),
        "data_parallel": dict(mesh=[("data", 8)], sharding_strategy=[(".*", "replicate")]),
        "fsdp": dict(mesh=[("data", 2), ("fsdp", 4)], sharding_strategy=[(".*", 'fsdp(axis="fsdp", min_size_mb=0)')]),
    }
    losses = {}
    for name, overrides in runs.items():
        train.run(tiny_config(**common, **overrides), tmp_path / name)
        losses[name] = [r["train/loss"] for r in _rows(tmp_path / name) if "train/loss" in r]
    assert len(losses["one"]) == 5
    np.testing.assert_allclose(losses["data_parallel"], losses["one"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(losses["fsdp"], losses["one"], rtol=0, atol=1e-5)


@pytest.mark.slow  # fast: test_step's one step (frozen leaves bitwise unchanged, trainable ones changed)
def test_frozen_parameters_unchanged_trainable_changed_only_trainable_have_state(tiny_config, tmp_path):
    # The demo model with the image tower and embeddings frozen (stored float16); the LLM layers train.
    config = tiny_config(
        model_init="builtin:demo",
        model_name_or_preset="",
        total_steps=3,
        ckpt_steps=3,
        evals={},
        frozen_dtype="float16",
        schedule=[("img/.*", None), ("llm/embedder/.*", None), (".*", dict(decay_type="cosine", warmup_steps=1))],
    )
    config.input.res = 64
    config.input.data = dict(config.input.data, image_size=64)
    workdir = tmp_path / "frozen"
    train.run(config, workdir)
    start = ckpt_lib.load_params(loading.checkpoint_path("builtin:demo"))
    end = ckpt_lib.load_params(workdir / "params.npz")
    start, end = dict(tree_flatten_with_names(start)), dict(tree_flatten_with_names(end))
    frozen = [n for n in end if n.startswith(("img/", "llm/embedder/"))]
    trained = [n for n in end if n not in frozen]
    assert frozen and trained
    for n in frozen:
        assert end[n].dtype == np.float16, n
        assert np.array_equal(np.asarray(end[n]), np.asarray(start[n]).astype(np.float16)), n
    for n in trained:
        assert end[n].dtype == np.float32, n
    assert sum(not np.array_equal(end[n], np.asarray(start[n], np.float32)) for n in trained) == len(trained)

    # The optimizer state (Adam's mu and nu) exists for trainable parameters only.
    s = train.setup(config)
    opt_leaves = jax.tree.leaves(jax.eval_shape(s.tx.init, s.shapes))
    n_trainable = sum(jax.tree.leaves(s.trainable))
    assert len([x for x in opt_leaves if x.shape]) == 2 * n_trainable


def test_non_finite_loss_stops_naming_step_and_checkpoint(tiny_config, tmp_path):
    """lr=inf: step 1 starts from finite parameters, step 2 does not. The loop reads metrics one step late, yet
    the error names step 2, and step 2's checkpoint is never written (a checkpoint every step)."""
    workdir = tmp_path / "nan"
    with pytest.raises(train.NonFiniteLossError, match=r"at step 2 .*last good checkpoint: step 1 in .*checkpoints"):
        train.run(tiny_config(lr=float("inf"), evals={}, ckpt_steps=1), workdir)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1"]
    assert not (workdir / "run.lock").exists()  # The lock goes with the run, however it ends.
