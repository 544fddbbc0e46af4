"""LoRA in the trainer: frozen base, adapters only in the optimizer, meshes, accumulation, exports."""

from __future__ import annotations

import io
import json

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from paligemma_ft import adapters as adapters_lib
from paligemma_ft import config_base
from paligemma_ft.checkpoints import loading
from paligemma_ft.checkpoints import npz as ckpt_lib
from paligemma_ft.commands import app_logic, plan, predict
from paligemma_ft.config import load_config
from paligemma_ft.evaluate.runner import evaluate_command
from paligemma_ft.model import lora
from paligemma_ft.training import loop as train
from paligemma_ft.training import setup as setup_lib
from paligemma_ft.utils import tree_flatten_with_names

_DATA = dict(source="shapes", n=64, seed=0, task="long_caption", image_size=64)


def lora_config(**overrides):
    """configs/demo_lora.py from builtin:demo, shrunk: 3 steps of batch 8, text 24, no evaluation."""
    c = load_config("configs/demo_lora.py")
    c.unlock()
    c.input.data = dict(_DATA)
    c.input.text_len, c.input.batch_size = 24, 8
    c.total_steps, c.ckpt_steps, c.quiet, c.evals = 3, 3, True, {}
    plain = c.to_dict()
    for key, value in overrides.items():
        node = plain
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return ml_collections.ConfigDict(plain)


def _flat(path):
    return dict(tree_flatten_with_names(ckpt_lib.load_params(path)))


@pytest.mark.slow
def test_lora_run_freezes_the_base_and_exports(tmp_path, capsys):
    workdir = tmp_path / "run"
    config = lora_config(**{"lora.dropout": 0.1})
    train.run(config, workdir)
    s = train.setup(config)
    flat_train = dict(tree_flatten_with_names(s.trainable))
    assert all(t == lora.is_adapter(k) for k, t in flat_train.items())  # Only adapters train ...
    opt_leaves = jax.tree.leaves(s.state_abstract["opt"])
    n_adapter_leaves = sum(lora.is_adapter(k) for k in flat_train)
    assert len([x for x in opt_leaves if x.ndim]) == 2 * n_adapter_leaves  # ... and carry Adam's mu and nu.
    # The base in the final checkpoint is bitwise the shipped model.
    from paligemma_ft.checkpoints import state as train_state  # noqa: PLC0415

    manager = train_state.make_manager(workdir / "checkpoints")
    state, _ = train_state.restore_latest(manager, s.state_abstract, s.state_shard)
    manager.close()
    base = _flat(s.path.file)
    final = dict(tree_flatten_with_names(jax.device_get(state["params"])))
    for k, v in base.items():
        np.testing.assert_array_equal(final[k], v, err_msg=k)
    assert any(np.abs(final[k]).max() > 0 for k in final if k.endswith(lora.ADAPTER_B))  # Adapters moved.
    # Exports: merged params.npz (base names only), adapters.npz (adapters + identity).
    merged = _flat(workdir / "params.npz")
    assert set(merged) == set(base)
    adapters, meta = adapters_lib.load_adapters(workdir / "adapters.npz")
    assert set(adapters) == {k for k in final if lora.is_adapter(k)}
    assert meta["rank"] == 8 and meta["base"]["name"].endswith("demo.npz")
    assert (workdir / "adapters.npz").stat().st_size < (workdir / "params.npz").stat().st_size / 3
    # The base loaded through the loading path with the adapters merged on the device is the merged export.
    again = dict(tree_flatten_with_names(loading.load_model("builtin:demo", adapters=workdir / "adapters.npz").params))
    assert set(again) == set(merged)
    for k in merged:
        np.testing.assert_allclose(again[k], merged[k], atol=1e-6, err_msg=k)
    # The report's overview counts the adapters.
    out = capsys.readouterr().out + (workdir / "report.md").read_text()
    assert "LoRA adapters" in out
    # predict: the merged export, base + --adapters, and adapters.npz alone (it names its base) agree.
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(image)
    lines = []
    for checkpoint, adapters in (
        (str(workdir), None),
        ("builtin:demo", str(workdir / "adapters.npz")),
        (str(workdir / "adapters.npz"), None),
    ):
        buf = io.StringIO()
        predict.predict_command(
            checkpoint, "builtin:tiny", [str(image)], "caption en", adapters=adapters, stdout=buf, max_decode_len=8
        )
        lines.append(buf.getvalue())
    assert lines[0] == lines[1] == lines[2] and lines[0].startswith(str(image))
    # The app (--adapters) loads the same merged parameters.
    app_predictor, _ = app_logic.load_model("builtin:demo", None, str(workdir / "adapters.npz"))
    for k, v in tree_flatten_with_names(app_predictor.params):
        np.testing.assert_array_equal(v, again[k], err_msg=k)
    # evaluate: the base + --adapters scores exactly like the run's merged export.
    evals = {"val": dict(type="caption", batch_size=8, max_decode_len=8, bootstrap=0, data=dict(_DATA, n=8))}
    scores = [
        evaluate_command(
            lora_config(evals=evals), None, spec, outdir=tmp_path / f"eval{i}", adapters=adapters, stdout=io.StringIO()
        )
        for i, (spec, adapters) in enumerate(((str(workdir), None), ("builtin:demo", str(workdir / "adapters.npz"))))
    ]
    assert scores[0] == scores[1] and "val/cider" in scores[0]
    # The PEFT folder is there (tests/test_lora_peft.py checks it against transformers + peft).
    assert json.loads((workdir / "peft" / "adapter_config.json").read_text())["r"] == 8


def test_adapters_refuse_another_base(tmp_path):
    base = {"llm/layers/mlp/linear": np.ones((2, 8, 4), np.float32)}
    identity = adapters_lib.base_identity(base, "base.npz")
    adapters_lib.check_base(identity, {k: v.astype(np.float32) for k, v in base.items()}, adapters="a", base="b")
    other = {"llm/layers/mlp/linear": np.full((2, 8, 4), 2.0, np.float32)}
    with pytest.raises(ValueError, match="same shapes and different weights"):
        adapters_lib.check_base(identity, other, adapters="a.npz", base="other.npz")
    with pytest.raises(ValueError, match="parameters differ"):
        adapters_lib.check_base(identity, {"llm/layers/mlp/linear": np.ones((2, 8, 5))}, adapters="a", base="b")
    ckpt_lib.save_params(tmp_path / "p.npz", {"llm": {"w": np.ones(3)}})
    with pytest.raises(ValueError, match="not an adapters file"):
        adapters_lib.load_adapters(tmp_path / "p.npz")


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.mark.slow
def test_lora_meshes_and_accumulation_give_single_device_losses(tmp_path):
    assert jax.device_count() == 8
    fsdp = [(".*", 'fsdp(axis="fsdp", min_size_mb=0)')]
    runs = {
        "one": dict(num_devices=1, mesh=[("data", 1)]),
        "data_parallel": dict(mesh=[("data", 8)]),
        "fsdp": dict(mesh=[("data", 2), ("fsdp", 4)], sharding_strategy=fsdp),
        "accumulated": dict(num_devices=1, mesh=[("data", 1)], grad_accum_steps=2),
    }
    losses = {}
    for name, overrides in runs.items():
        train.run(lora_config(**overrides), tmp_path / name)
        losses[name] = _losses(tmp_path / name)
    assert len(losses["one"]) == 3 and losses["one"][-1] < losses["one"][0]
    for name in ("data_parallel", "fsdp", "accumulated"):
        np.testing.assert_allclose(losses[name], losses["one"], rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_qlora_nf4_run_trains_and_merges_from_the_original_base(tmp_path):
    workdir = tmp_path / "q"
    train.run(lora_config(**{"lora.quant": "nf4", "lora.base_dtype": "bfloat16", "total_steps": 4}), workdir)
    losses = _losses(workdir)
    assert losses[-1] < losses[0]
    s = train.setup(lora_config(**{"lora.quant": "nf4"}))
    shapes = dict(tree_flatten_with_names(s.state_abstract["params"]))
    assert shapes["llm/layers/attn/q_einsum/w_q"].dtype == np.uint8
    assert shapes["llm/layers/attn/q_einsum/w_qscale"].dtype == np.float32  # base_dtype float32 by default.
    # The quantized base is bitwise what quantizing the demo checkpoint gives, after training too.
    from paligemma_ft.checkpoints import state as train_state  # noqa: PLC0415

    s4 = train.setup(lora_config(**{"lora.quant": "nf4", "lora.base_dtype": "bfloat16", "total_steps": 4}))
    manager = train_state.make_manager(workdir / "checkpoints")
    state, _ = train_state.restore_latest(manager, s4.state_abstract, s4.state_shard)
    manager.close()
    final = dict(tree_flatten_with_names(jax.device_get(state["params"])))
    base = _flat(s.path.file)
    want_q = lora.quantize_flat(base, s4.model.lora)
    for k in [k for k in final if k.endswith(lora.CODES)]:
        assert final[k].tobytes() == want_q[k].tobytes(), k
        np.testing.assert_array_equal(final[k + "scale"], want_q[k + "scale"].astype(final[k + "scale"].dtype))
    # params.npz merges the adapters into the original (unquantized) demo weights.
    adapters, meta = adapters_lib.load_adapters(workdir / "adapters.npz")
    assert meta["quant"] == "nf4"
    want = dict(tree_flatten_with_names(loading.load_model("builtin:demo", adapters=workdir / "adapters.npz").params))
    merged = _flat(workdir / "params.npz")
    for k in want:
        np.testing.assert_allclose(merged[k], want[k], atol=1e-6, err_msg=k)


def test_plan_counts_adapters_and_a_quantized_base():
    plans = {q: plan.make_plan(lora_config(**{"lora.quant": q}), memory_gib=1) for q in ("none", "nf4")}
    s = train.setup(lora_config())
    n_adapters = sum(
        int(np.prod(x.shape)) for k, x in tree_flatten_with_names(s.state_abstract["params"]) if lora.is_adapter(k)
    )
    assert plans["none"].trainable == plans["nf4"].trainable == n_adapters
    assert plans["nf4"].params == plans["none"].params  # Weights counted, not the bytes that store them.
    # NF4 codes take half a byte per weight (plus block scales) instead of float32's four.
    assert plans["nf4"].param_bytes < 0.55 * plans["none"].param_bytes
    assert plans["nf4"].opt_bytes == plans["none"].opt_bytes  # Only the adapters carry optimizer state.


def test_loading_path_quantizes_the_base_as_read_and_initialises_what_it_lacks():
    """setup.init_params -> loading.load_params: the QLoRA codes are the checkpoint's weights quantized, adapters
    come from the model's init (B = 0), and a `dont_load` float weight gets the model's own codes and scales."""
    config = lora_config(**{"lora.quant": "nf4", "dont_load": ["llm/layers/mlp/linear"]})
    s = setup_lib.setup(config)
    params = dict(tree_flatten_with_names(jax.device_get(setup_lib.init_params(s, seed=0))))
    base = _flat(s.path.file)
    want = lora.quantize_flat(base, s.model.lora)
    z = np.zeros((1, s.text_len + 1), np.int32)
    fresh = jax.device_get(s.model.init(jax.random.PRNGKey(0), np.zeros((1, s.res, s.res, 3), np.float32), z, z))
    fresh = dict(tree_flatten_with_names(fresh["params"]))
    assert {k for k in params if k.endswith(lora.CODES)} == {k for k in want if k.endswith(lora.CODES)}
    for k, v in params.items():
        if lora.is_adapter(k):
            np.testing.assert_array_equal(v, fresh[k], err_msg=k)  # The model's init: A random, B zero.
            assert k.endswith(lora.ADAPTER_A) or not v.any(), k
        elif k.startswith("llm/layers/mlp/linear"):  # dont_load: initialised, not the checkpoint's.
            assert v.astype(np.float32).tobytes() == fresh[k].astype(np.float32).tobytes(), k
            assert v.tobytes() != want[k].astype(v.dtype).tobytes(), k
        else:
            assert v.tobytes() == want[k].astype(v.dtype).tobytes(), k


@pytest.mark.parametrize(
    "override,message",
    [
        (["--config.lora.rank=0", "--config.lora.quant=nf4"], "lora.quant='nf4' needs config.lora.rank >= 1"),
        (["--config.lora.quant=nf5"], "lora.quant='nf5': must be one of none, int8, nf4"),
        (["--config.lora.dropout=1.0"], r"lora.dropout=1.0: must be in \[0, 1\)"),
        (["--config.lora.targets=['llm/(']"], r"config.lora.targets\[0\] = 'llm/\(' is not a regex"),
        (["--config.lora.targets=[]"], "config.lora.targets is empty"),
        (["--config.lora.alpha=-1.0"], r"lora.alpha=-1.0: must be > 0"),
    ],
)
def test_lora_values_are_checked_before_compute(override, message):
    assert load_config("demo_lora").to_dict() == load_config("configs/demo_lora.py").to_dict()  # Declared keys only.
    config_base.validate(load_config("demo_lora"))
    with pytest.raises(ValueError, match=message):
        config_base.validate(load_config("demo_lora", override))
