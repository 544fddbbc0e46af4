"""The compute dtype (`config.compute_dtype`): bfloat16 builds and trains, float32 masters, no float32 copies.

The HLO checks read the program XLA compiled (`paligemma_ft.hlo`): what a device would hold, not what the Python
code looks like.
"""

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from paligemma_ft import decode as dec
from paligemma_ft import hlo
from paligemma_ft.config import load_config
from paligemma_ft.model import PRESETS, Model, get_preset, precision
from paligemma_ft.training import loop as train
from paligemma_ft.training import losses, optim

_DATA = dict(source="shapes", n=64, seed=0, task="caption", image_size=32)


def test_compute_dtype_resolution_and_config():
    assert precision.resolve_compute_dtype(None, "cpu") == "float32"
    assert precision.resolve_compute_dtype("auto", "gpu") == precision.resolve_compute_dtype(None, "tpu") == "bfloat16"
    assert precision.resolve_compute_dtype("bf16", "cpu") == "bfloat16"
    with pytest.raises(ValueError, match=r"config.compute_dtype='float16' is not supported"):
        precision.resolve_compute_dtype("float16")
    assert precision.device_platform("H100") == "gpu" and precision.device_platform("TPU v5 lite") == "tpu"
    cfg, _ = get_preset("tiny_pg2")
    assert precision.apply_compute_dtype(cfg, "float32") == cfg  # float32: the config as it was.
    bf = precision.apply_compute_dtype(cfg, "bfloat16")
    assert bf["img"]["dtype_mm"] == bf["llm"]["embed_dtype"] == "bfloat16" and "embed_dtype" not in cfg["llm"]
    cfg["img"]["dtype_mm"] = "float16"  # A key the config sets itself wins (the colab's float16 ViT).
    assert precision.apply_compute_dtype(cfg, "bfloat16")["img"]["dtype_mm"] == "float16"
    assert precision.apply_compute_dtype({"llm": {}}, "bfloat16")["img"]["variant"] == "So400m/14"


def _abstract_step(preset, compute, frozen=None, text_len=12, batch=2, schedule=None):
    """(model, abstract params, abstract batch, trainable mask) with float32 trainable masters."""
    cfg, res = get_preset(preset)
    model = Model(**precision.apply_compute_dtype(cfg, compute))
    z = jnp.zeros((1, text_len), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)), z, z)["params"]
    mask = optim.trainable_mask(shapes, schedule or [(".*", {})])
    dt = lambda t: jnp.float32 if t or frozen is None else jnp.dtype(frozen)  # noqa: E731
    params = jax.tree.map(lambda s, t: jax.ShapeDtypeStruct(s.shape, dt(t)), shapes, mask)
    tok = jax.ShapeDtypeStruct((batch, text_len + 1), jnp.int32)
    images = jax.ShapeDtypeStruct((batch, res, res, 3), jnp.float32)
    return model, params, dict(image=images, text=tok, mask_ar=tok, mask_loss=tok), mask


# One preset per architecture (the resolution does not change the layers).
_ARCHS = [p for p in PRESETS if not p.endswith(("_448", "_896"))]


@pytest.mark.parametrize("preset", _ARCHS)
def test_bfloat16_loss_and_gradients_build_for_every_preset(preset):
    """The scan carries stay bfloat16 through every layer kind (MQA, GQA, post-norms, soft-caps): the loss and its
    gradients trace for each preset, and each gradient has its float32 master's dtype."""
    model, params, batch, _ = _abstract_step(preset, "bfloat16")
    loss, grads = jax.eval_shape(
        jax.value_and_grad(functools.partial(losses.loss_fn, model=model)), params, batch, jax.random.PRNGKey(0)
    )
    assert loss.dtype == jnp.float32
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    text = jax.ShapeDtypeStruct((2, 12), jnp.int32)
    pre_logits, out = jax.eval_shape(
        functools.partial(model.apply, method=model.prelogits), {"params": params}, batch["image"], text, text
    )
    assert pre_logits.dtype == out["img/zimg"].dtype == jnp.bfloat16
    # Decoding builds too, with the weights stored in bfloat16 (as `predict` keeps a .bf16.npz).
    stored = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.bfloat16), params)
    prompt = dict(image=batch["image"], text=text, mask_ar=text, mask_input=text)
    fn = dec._get_fn(dec._with_cache_dtype(model, "bfloat16"), 2, dec.parse_sampler("greedy"), 1)  # noqa: SLF001
    tokens, logp = jax.eval_shape(fn, stored, prompt, jax.random.PRNGKey(0))
    assert tokens.shape == (2, 2) and logp.dtype == jnp.float32


def _materialized_tables(compiled_text, vocab, width):
    return [a for a in hlo.materialized(compiled_text) if sorted(a.shape) == sorted((vocab, width))]


@pytest.mark.slow  # fast: the other precision tests
def test_bfloat16_gradient_holds_no_float32_copy_of_the_table():
    """The colab recipe (attention trained in float32, everything else frozen in float16): in bfloat16 the
    compiled value-and-grad holds the float16 table and one bfloat16 copy, never a float32 one; in float32
    compute the same check finds the float32 copies (so it can fail)."""
    schedule = [("llm/layers/attn/.*", {}), (".*", None)]
    found = {}
    for compute in ("bfloat16", "float32"):
        model, params, batch, mask = _abstract_step(
            "tiny_pg2", compute, frozen="float16", text_len=20, batch=3, schedule=schedule
        )

        def step(params, batch, model=model, mask=mask):
            loss_fn = functools.partial(losses.loss_fn, model=model)
            loss, grads = jax.value_and_grad(loss_fn)(params, batch, jax.random.PRNGKey(0))
            return loss, jax.tree.map(lambda g, t: g if t else None, grads, mask)  # Trainable gradients only.

        text = jax.jit(step).lower(params, batch).compile().as_text()
        vocab, width = params["llm"]["embedder"]["input_embedding"].shape
        found[compute] = {a.dtype for a in _materialized_tables(text, vocab, width)}
    assert "f16" in found["bfloat16"] and "f32" not in found["bfloat16"], found
    assert "f32" in found["float32"], found


def test_bfloat16_product_gradients_match_float32():
    """`precision.einsum`'s hand-written backward (16-bit operands, float32 accumulation) agrees with float32
    autodiff, for a weight product and a batched activation product, and returns the master's dtype."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 16, 8)) / 4, jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 7, 4, 8)), jnp.float32)

    def f(x, w, k, out_dtype):
        q = precision.einsum("BTD,NDH->BTNH", x, w)
        s = precision.einsum("BTNH,BSNH->BNTS", q, k.astype(q.dtype), out_dtype=out_dtype)
        return jnp.sum(jnp.tanh(s.astype(jnp.float32)))

    ref = jax.grad(f, argnums=(0, 1, 2))(x, w, k, None)
    low = jax.grad(lambda x, w, k: f(x.astype(jnp.bfloat16), w, k, jnp.float32), argnums=(0, 1, 2))(x, w, k)
    assert [g.dtype for g in low] == [jnp.float32] * 3
    for a, b in zip(low, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0.05, atol=0.05 * float(jnp.abs(b).max()))
    assert float(jnp.abs(ref[1]).max()) > 0.1


def _demo_config(compute_dtype, workdir_steps=4):
    c = load_config("configs/demo.py")
    c.unlock()
    c.model_name_or_preset, c.model_init = "tiny_pg2", ""
    c.input.data = dict(_DATA)
    c.input.res, c.input.text_len, c.input.batch_size = 32, 16, 8
    c.total_steps, c.ckpt_steps, c.quiet = workdir_steps, workdir_steps, True
    c.evals = dict(
        val=dict(type="caption", batch_size=8, max_decode_len=4, bootstrap=0, data=dict(_DATA, n=8, offset=64))
    )
    plain = c.to_dict()
    plain["compute_dtype"] = compute_dtype  # Declared by config_base; set directly here.
    return ml_collections.ConfigDict(plain)


@pytest.mark.slow
def test_trainer_trains_in_bfloat16_close_to_float32(tmp_path):
    """The trainer in bfloat16 on CPU: float32 parameters in and out, and a loss curve within bfloat16 rounding of
    the float32 one (same data, same init)."""
    losses_by = {}
    for compute in ("float32", "bfloat16"):
        last = train.run(_demo_config(compute), tmp_path / compute)
        rows = [json.loads(line) for line in (tmp_path / compute / "metrics.jsonl").read_text().splitlines()]
        losses_by[compute] = np.array([r["train/loss"] for r in rows if "train/loss" in r])
        assert np.isfinite(last["val/cider"])
    s = train.setup(_demo_config("bfloat16"))
    assert s.model.llm["embed_dtype"] == "bfloat16" and s.model.img["dtype_mm"] == "bfloat16"
    assert {np.dtype(d) for d in jax.tree.leaves(s.dtypes)} == {np.dtype(np.float32)}  # Master copies.
    f32, bf16 = losses_by["float32"], losses_by["bfloat16"]
    assert len(f32) == len(bf16) == 4 and f32[-1] < f32[0]  # It learns.
    np.testing.assert_allclose(bf16, f32, rtol=0.02)
    assert not np.array_equal(bf16, f32)  # The bfloat16 run did compute in bfloat16.
