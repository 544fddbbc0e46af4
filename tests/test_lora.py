"""LoRA / QLoRA inside the model (model/lora.py, model/layers.py, model/quant.py)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paligemma_ft.model import Model, get_preset, layers, lora, precision, quant
from paligemma_ft.utils import recover_tree, tree_flatten_with_names

ALL = (("llm/.*", True), ("img/.*", True))


def _inputs(res: int, seed: int = 0, text_len: int = 7):
    rng = np.random.default_rng(seed)
    image = jnp.asarray(rng.uniform(-1, 1, (2, res, res, 3)), jnp.float32)
    text = jnp.asarray(rng.integers(0, 1000, (2, text_len)), jnp.int32)
    mask_ar = jnp.asarray([[0, 0, 0, 1, 1, 1, 1]] * 2, jnp.int32)
    return image, text, mask_ar


def _models(preset: str, spec: lora.LoraSpec, scan: bool = True):
    cfg, res = get_preset(preset)
    cfg = {t: {**cfg[t], "scan": scan} for t in cfg}
    return Model(**cfg), Model(**cfg, lora=spec), res


def _flat(tree) -> dict:
    return dict(tree_flatten_with_names(tree))


def _randomize_b(params, seed: int = 1):
    flat = _flat(params)
    rng = np.random.default_rng(seed)
    for k in flat:
        if k.endswith(lora.ADAPTER_B):
            flat[k] = jnp.asarray(rng.normal(0, 0.05, flat[k].shape), jnp.float32)
    return recover_tree(list(flat), list(flat.values()))


# --- The ViT layers are flax's, bit for bit -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_and_attention_equal_flax_bitwise(dtype):
    """The replicas compute what flax computes, in float32 and in the ViT's bfloat16 setting (dtype_mm bfloat16,
    softmax forced to float32, as model/vit.py builds them)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 32))
    init = dict(kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.normal(1e-2), dtype=dtype)
    ref, ours = nn.Dense(24, **init), layers.Dense(24, **init)
    p = ref.init(jax.random.PRNGKey(1), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(1), x)) == jax.tree.map(jnp.shape, p)
    np.testing.assert_array_equal(ref.apply(p, x), ours.apply(p, x))

    kw = dict(num_heads=4, kernel_init=nn.initializers.xavier_uniform(), deterministic=True, dtype=dtype)
    kw["force_fp32_for_softmax"] = dtype != "float32"
    ref_a, ours_a = nn.MultiHeadDotProductAttention(**kw), layers.MultiHeadDotProductAttention(**kw)
    pa = ref_a.init(jax.random.PRNGKey(2), x, x)
    pa = jax.tree.map(lambda v: v + 0.01 * jax.random.normal(jax.random.PRNGKey(3), v.shape), pa)  # Non-zero bias.
    mine = ours_a.init(jax.random.PRNGKey(2), x, x)
    assert jax.tree.map(jnp.shape, mine) == jax.tree.map(jnp.shape, pa)
    # Same initial values too (flax's flat kernel init), so random-init models are unchanged.
    jax.tree.map(np.testing.assert_array_equal, mine, ref_a.init(jax.random.PRNGKey(2), x, x))
    got, want = ours_a.apply(pa, x, x), ref_a.apply(pa, x, x)
    assert got.dtype == want.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


# --- Adapters: names, shapes, zero init, merge ---------------------------------------------------------------


def test_adapter_names_and_head_layout():
    spec = lora.LoraSpec(rank=3, alpha=6.0, targets=ALL)
    _, model, res = _models("tiny_pg2", spec)
    shapes = _flat(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *_inputs(res))["params"]))
    # tiny_pg2: 2 layers, width 64, 4 heads over 2 kv heads of 16, mlp 128; ViT width 32, 2 heads, mlp 64.
    want = {
        "llm/layers/attn/q_einsum/w_lora_a": (2, 64, 3),
        "llm/layers/attn/q_einsum/w_lora_b": (2, 3, 4, 16),
        "llm/layers/attn/kv_einsum/w_lora_a": (2, 2, 64, 3),  # k and v: separate adapters.
        "llm/layers/attn/kv_einsum/w_lora_b": (2, 2, 3, 2, 16),
        "llm/layers/attn/attn_vec_einsum/w_lora_a": (2, 4, 16, 3),
        "llm/layers/attn/attn_vec_einsum/w_lora_b": (2, 3, 64),
        "llm/layers/mlp/gating_einsum_lora_a": (2, 2, 64, 3),
        "llm/layers/mlp/gating_einsum_lora_b": (2, 2, 3, 128),
        "llm/layers/mlp/linear_lora_a": (2, 128, 3),
        "llm/layers/mlp/linear_lora_b": (2, 3, 64),
        "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel_lora_a": (2, 32, 3),
        "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel_lora_b": (2, 3, 2, 16),
        "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/out/kernel_lora_a": (2, 2, 16, 3),
        "img/Transformer/encoderblock/MlpBlock_0/Dense_1/kernel_lora_b": (2, 3, 32),
        "img/head/kernel_lora_a": (32, 3),
    }
    for name, shape in want.items():
        assert shapes[name].shape == shape, name
        assert shapes[name].dtype == jnp.float32, name
    adapters = {k for k in shapes if lora.is_adapter(k)}
    # Every adaptable weight of both towers, and nothing else (no embedding, norm, bias, conv, posemb).
    assert len(adapters) == 2 * (5 + 4 + 2 + 1)  # LLM q, kv, o, gating, linear; ViT q, k, v, o, fc1, fc2, head.
    assert all(k.rsplit("_lora_", 1)[0] in shapes for k in adapters)


@pytest.mark.parametrize("preset,scan", [("tiny_pg1", True), ("tiny_pg2", False), ("tiny_pg1_mha", True)])
def test_zero_init_is_the_base_model_exactly(preset, scan):
    spec = lora.LoraSpec(rank=4, alpha=8.0, targets=ALL, dropout=0.1)
    base, adapted, res = _models(preset, spec, scan)
    inputs = _inputs(res)
    params = adapted.init(jax.random.PRNGKey(0), *inputs)["params"]
    base_params = {k: v for k, v in _flat(params).items() if not lora.is_adapter(k)}
    base_params = recover_tree(list(base_params), list(base_params.values()))
    want, _ = base.apply({"params": base_params}, *inputs)
    got, _ = adapted.apply({"params": params}, *inputs)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("quant_mode", ["none", "nf4"])
def test_bfloat16_compute_zero_init_and_float32_adapter_gradients(quant_mode):
    """Under the bfloat16 compute dtype (`model/precision.py`) adapters change nothing at step 0, and their
    float32 masters get float32 gradients (the adapter products go through `precision.einsum` too)."""
    spec = lora.LoraSpec(rank=4, targets=ALL, quant=quant_mode)
    cfg, res = get_preset("tiny_pg2")
    cfg = precision.apply_compute_dtype(cfg, "bfloat16")
    base, adapted = Model(**cfg, lora=lora.LoraSpec(quant=quant_mode)), Model(**cfg, lora=spec)
    inputs = _inputs(res)
    flat = _flat(adapted.init(jax.random.PRNGKey(0), *inputs)["params"])
    # The preset's projection starts at zero, which would cut every ViT gradient: give it values.
    shape = (flat["img/head/kernel_lora_a"].shape[0], flat["img/head/kernel_lora_b"].shape[1])  # [D_img, D_llm]
    head = 0.05 * np.asarray(jax.random.normal(jax.random.PRNGKey(1), shape))
    if quant_mode == "none":
        flat["img/head/kernel"] = jnp.asarray(head)
    else:
        codes, scales = lora.quantize_weight("img/head/kernel", head, quant_mode)
        flat["img/head/kernel_q"], flat["img/head/kernel_qscale"] = jnp.asarray(codes), jnp.asarray(scales)
    params = recover_tree(list(flat), list(flat.values()))
    base_params = {k: v for k, v in flat.items() if not lora.is_adapter(k)}
    want, _ = base.apply({"params": recover_tree(list(base_params), list(base_params.values()))}, *inputs)
    got, _ = adapted.apply({"params": params}, *inputs)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    adapters = {k: v for k, v in _flat(params).items() if lora.is_adapter(k)}

    def loss(a):
        logits, _ = adapted.apply({"params": recover_tree(*zip(*{**_flat(params), **a}.items()))}, *inputs)
        return jnp.mean(jnp.square(logits.astype(jnp.float32)))

    grads = jax.grad(loss)(adapters)
    assert {g.dtype for g in grads.values()} == {jnp.dtype(jnp.float32)}
    assert all(np.isfinite(np.asarray(g)).all() for g in grads.values())
    assert all(np.abs(np.asarray(g)).max() > 0 for k, g in grads.items() if k.endswith(lora.ADAPTER_B))


@pytest.mark.parametrize("preset", ["tiny_pg1", "tiny_pg2", "tiny_pg1_mha"])
def test_merged_equals_unmerged(preset):
    spec = lora.LoraSpec(rank=4, alpha=8.0, targets=ALL)
    base, adapted, res = _models(preset, spec)
    inputs = _inputs(res)
    params = _randomize_b(adapted.init(jax.random.PRNGKey(0), *inputs)["params"])
    got, _ = adapted.apply({"params": params}, *inputs)
    merged = lora.merge(_flat(params), spec.scale)
    assert not any(lora.is_adapter(k) for k in merged)
    want, _ = base.apply({"params": recover_tree(list(merged), list(merged.values()))}, *inputs)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    base_only = {k: v for k, v in _flat(params).items() if not lora.is_adapter(k)}
    plain, _ = base.apply({"params": recover_tree(list(base_only), list(base_only.values()))}, *inputs)
    assert np.abs(np.asarray(plain) - np.asarray(got)).max() > 1e-3  # The adapters do change the outputs.


def test_targets_select_and_exclude_in_order():
    spec = lora.LoraSpec(
        rank=2, targets=lora.parse_targets([("llm/layers/attn/kv_einsum/w", False), "llm/layers/attn/.*"])
    )
    _, model, res = _models("tiny_pg1", spec)
    names = _flat(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *_inputs(res))["params"]))
    adapted = sorted({k.rsplit("_lora_", 1)[0] for k in names if lora.is_adapter(k)})
    assert adapted == ["llm/layers/attn/attn_vec_einsum/w", "llm/layers/attn/q_einsum/w"]
    with pytest.raises(ValueError, match=r"targets\[0\]"):
        lora.parse_targets([("x", "yes")])
    with pytest.raises(ValueError, match="quant"):
        lora.LoraSpec(rank=1, quant="nf3")


@pytest.mark.slow
def test_dropout_only_in_training():
    spec = lora.LoraSpec(rank=4, alpha=8.0, targets=ALL, dropout=0.5)
    _, model, res = _models("tiny_pg1", spec)
    inputs = _inputs(res)
    params = _randomize_b(model.init(jax.random.PRNGKey(0), *inputs)["params"])
    eval_a, _ = model.apply({"params": params}, *inputs)
    eval_b, _ = model.apply({"params": params}, *inputs)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a, _ = model.apply({"params": params}, *inputs, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    train_b, _ = model.apply({"params": params}, *inputs, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    assert np.abs(np.asarray(train_a) - np.asarray(train_b)).max() > 1e-4


# --- Quantization -----------------------------------------------------------------------------------------------


def test_nf4_matches_bitsandbytes():
    torch = pytest.importorskip("torch")
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (256, 48)).astype(np.float32)  # Ours [in, out]; bitsandbytes blocks torch's [out, in].
    w[:64, 0] = 0.0  # An all-zero block.
    codes, absmax = quant.quantize(w, axis=0, mode="nf4")
    assert codes.shape == (128, 48) and codes.dtype == np.uint8 and absmax.shape == (4, 48)
    q, state = bnb_f.quantize_4bit(torch.from_numpy(np.ascontiguousarray(w.T)), blocksize=64, quant_type="nf4")
    np.testing.assert_array_equal(state.code.numpy(), quant.NF4_LEVELS)
    ref = bnb_f.dequantize_4bit(q, state).numpy().T
    ours = np.asarray(quant.dequantize(jnp.asarray(codes), jnp.asarray(absmax), 0, "nf4"))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-7)
    # Packed bytes equal bitsandbytes' too (element 2j in the high nibble).
    np.testing.assert_array_equal(codes.T.reshape(-1), q.numpy().reshape(-1))
    # The jnp path (used inside the model's init) gives the same codes.
    codes_j, absmax_j = quant.quantize(jnp.asarray(w), 0, "nf4", xp=jnp)
    np.testing.assert_array_equal(np.asarray(codes_j), codes)
    np.testing.assert_array_equal(np.asarray(absmax_j), absmax)


def test_int8_matches_bitsandbytes_rowwise():
    torch = pytest.importorskip("torch")
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.02, (64, 10)).astype(np.float32)  # One 64-entry block per output column = bnb's rows.
    codes, absmax = quant.quantize(w, axis=0, mode="int8")
    ref_codes, ref_stats, _ = bnb_f.int8_vectorwise_quant(torch.from_numpy(np.ascontiguousarray(w.T)))
    np.testing.assert_array_equal(codes.T, ref_codes.numpy())
    np.testing.assert_allclose(absmax[0], ref_stats.numpy(), rtol=1e-7)
    back = np.asarray(quant.dequantize(jnp.asarray(codes), jnp.asarray(absmax), 0, "int8"))
    np.testing.assert_allclose(back, w, atol=np.abs(w).max() / 127 / 2 + 1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_base_with_adapters(mode):
    spec = lora.LoraSpec(rank=4, alpha=8.0, targets=ALL, quant=mode)
    base, qmodel, res = _models("tiny_pg2", spec)
    inputs = _inputs(res)
    params = qmodel.init(jax.random.PRNGKey(0), *inputs)["params"]
    flat = _flat(params)
    assert flat["llm/layers/attn/q_einsum/w_q"].dtype == (jnp.uint8 if mode == "nf4" else jnp.int8)
    assert "llm/layers/attn/q_einsum/w" not in flat and "llm/embedder/input_embedding" in flat
    # A quantized base equals the float model built from its dequantized weights (zero-init B adds nothing).
    deq = lora.merge(flat, spec.scale, mode)
    want, _ = base.apply({"params": recover_tree(list(deq), list(deq.values()))}, *inputs)
    got, _ = qmodel.apply({"params": params}, *inputs)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # Host quantization of the dequantized float base reproduces the codes (a checkpoint transform).
    host = lora.quantize_flat({k: np.asarray(v) for k, v in deq.items()}, spec)
    np.testing.assert_array_equal(host["llm/layers/mlp/linear_q"], np.asarray(flat["llm/layers/mlp/linear_q"]))
    # Gradients reach the adapters through the dequantized weights.
    adapters = {k: v for k, v in flat.items() if lora.is_adapter(k)}
    frozen = {k: v for k, v in flat.items() if not lora.is_adapter(k)}

    def loss(a):
        both = {**frozen, **a}
        return qmodel.apply({"params": recover_tree(list(both), list(both.values()))}, *inputs)[0].sum()

    grads = jax.grad(loss)(adapters)
    assert float(jnp.abs(grads["llm/layers/attn/q_einsum/w_lora_b"]).max()) > 0


# --- FLOPs count the adapters ------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny_pg2", "tiny_pg1_mha"])
def test_train_flops_count_adapters_like_the_traced_gradient(preset, traced_train_flops):
    from paligemma_ft import flops  # noqa: PLC0415

    cfg, res = get_preset(preset)
    for tower in ("img", "llm"):
        cfg[tower].update(scan=False, remat_policy="none")
    spec = lora.LoraSpec(rank=3, targets=lora.parse_targets(["llm/layers/1/.*", "img/.*"]))
    text_len, loss_tokens = 6, 4
    traced = traced_train_flops(cfg, res, text_len, loss_tokens, lora.is_adapter, lora=spec)
    counted = flops.train_flops_per_example(cfg, res, text_len, loss_tokens, trainable=lora.is_adapter, lora=spec)
    assert counted == traced
    assert counted > flops.train_flops_per_example(cfg, res, text_len, loss_tokens, trainable=False)
