"""The model: parameter trees of every preset (shapes only), masks, and forward-pass invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paligemma_ft.model import Model, get_preset, infer_config_from_shapes, make_attn_mask
from paligemma_ft.utils import tree_flatten_with_names


def _shapes(name, scan=True):
    cfg, res = get_preset(name)
    if not scan:
        cfg["img"]["scan"] = cfg["llm"]["scan"] = False
    model = Model(**cfg)
    tree = jax.eval_shape(
        model.init,
        jax.random.PRNGKey(0),
        jnp.zeros((1, res, res, 3)),
        jnp.zeros((1, 4), jnp.int32),
        jnp.zeros((1, 4), jnp.int32),
    )["params"]
    return {k: tuple(v.shape) for k, v in tree_flatten_with_names(tree)}


# Reference 3.1 (PaliGemma 1 3B, 224): every path and shape.
PG1_3B_224 = {
    "img/embedding/kernel": (14, 14, 3, 1152),
    "img/embedding/bias": (1152,),
    "img/pos_embedding": (1, 256, 1152),
    "img/Transformer/encoderblock/LayerNorm_0/scale": (27, 1152),
    "img/Transformer/encoderblock/LayerNorm_0/bias": (27, 1152),
    "img/Transformer/encoderblock/LayerNorm_1/scale": (27, 1152),
    "img/Transformer/encoderblock/LayerNorm_1/bias": (27, 1152),
    **{
        f"img/Transformer/encoderblock/MultiHeadDotProductAttention_0/{n}/kernel": (27, 1152, 16, 72)
        for n in ("query", "key", "value")
    },
    **{
        f"img/Transformer/encoderblock/MultiHeadDotProductAttention_0/{n}/bias": (27, 16, 72)
        for n in ("query", "key", "value")
    },
    "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/out/kernel": (27, 16, 72, 1152),
    "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/out/bias": (27, 1152),
    "img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel": (27, 1152, 4304),
    "img/Transformer/encoderblock/MlpBlock_0/Dense_0/bias": (27, 4304),
    "img/Transformer/encoderblock/MlpBlock_0/Dense_1/kernel": (27, 4304, 1152),
    "img/Transformer/encoderblock/MlpBlock_0/Dense_1/bias": (27, 1152),
    "img/Transformer/encoder_norm/scale": (1152,),
    "img/Transformer/encoder_norm/bias": (1152,),
    "img/head/kernel": (1152, 2048),
    "img/head/bias": (2048,),
    "llm/embedder/input_embedding": (257152, 2048),
    "llm/layers/pre_attention_norm/scale": (18, 2048),
    "llm/layers/attn/q_einsum/w": (18, 8, 2048, 256),
    "llm/layers/attn/kv_einsum/w": (18, 2, 1, 2048, 256),
    "llm/layers/attn/attn_vec_einsum/w": (18, 8, 256, 2048),
    "llm/layers/pre_ffw_norm/scale": (18, 2048),
    "llm/layers/mlp/gating_einsum": (18, 2, 2048, 16384),
    "llm/layers/mlp/linear": (18, 16384, 2048),
    "llm/final_norm/scale": (2048,),
}

# Reference 3.2: L, W, N, K, H, F of the PaliGemma 2 LLMs.
PG2 = {"3b": (26, 2304, 8, 4, 256, 9216), "10b": (42, 3584, 16, 8, 256, 14336), "28b": (46, 4608, 32, 16, 128, 36864)}

# Reference 3.3: parameter totals at 224 / 448 / 896 and the img share at 224.
TOTALS = {
    "pg1_3b": (2_923_335_408, 2_924_220_144, 2_927_759_088, 414_803_696),
    "pg2_3b": (3_032_094_960, 3_032_979_696, 3_036_518_640, 415_098_864),
    "pg2_10b": (9_662_409_456, 9_663_294_192, 9_666_833_136, 416_574_704),
    "pg2_28b": (27_650_192_112, 27_651_076_848, 27_654_615_792, 417_755_376),
}


@pytest.mark.parametrize("res", [224, 448, 896])
def test_pg1_tree_matches_reference(res):
    shapes = _shapes(f"pg1_3b_{res}")
    expected = dict(PG1_3B_224, **{"img/pos_embedding": (1, (res // 14) ** 2, 1152)})
    assert shapes == expected
    assert sum(k.startswith("img/") for k in shapes) == 23 and sum(k.startswith("llm/") for k in shapes) == 9


@pytest.mark.parametrize("size", ["3b", "10b", "28b"])
@pytest.mark.parametrize("res", [224, 448, 896])
def test_pg2_tree_matches_reference(size, res):
    shapes = _shapes(f"pg2_{size}_{res}")
    L, W, N, K, H, F = PG2[size]
    expected = {k: v for k, v in PG1_3B_224.items() if k.startswith("img/")}
    expected.update(
        {
            "img/pos_embedding": (1, (res // 14) ** 2, 1152),
            "img/head/kernel": (1152, W),
            "img/head/bias": (W,),
            "llm/embedder/input_embedding": (257152, W),
            "llm/final_norm/scale": (W,),
            "llm/layers/attn/q_einsum/w": (L, N, W, H),
            "llm/layers/attn/kv_einsum/w": (L, 2, K, W, H),
            "llm/layers/attn/attn_vec_einsum/w": (L, N, H, W),
            "llm/layers/mlp/gating_einsum": (L, 2, W, F),
            "llm/layers/mlp/linear": (L, F, W),
            **{
                f"llm/layers/{n}/scale": (L, W)
                for n in ("pre_attention_norm", "pre_ffw_norm", "post_attention_norm", "post_ffw_norm")
            },
        }
    )
    assert shapes == expected


@pytest.mark.parametrize("model", list(TOTALS))
def test_parameter_totals(model):
    *totals, img = TOTALS[model]
    for res, total in zip((224, 448, 896), totals):
        shapes = _shapes(f"{model}_{res}")
        assert sum(int(np.prod(s)) for s in shapes.values()) == total
    shapes = _shapes(f"{model}_224")
    assert sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("img/")) == img


def test_unscanned_names():
    shapes = _shapes("tiny_pg2", scan=False)
    assert "img/Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel" in shapes
    assert "llm/layers/1/attn/kv_einsum/w" in shapes
    assert shapes["llm/layers/0/attn/kv_einsum/w"] == (2, 2, 64, 16)
    assert not any("encoderblock/" in k for k in shapes)


def test_fused_qkv_only_when_heads_equal_kv_heads():
    assert "llm/layers/attn/qkv_einsum/w" in _shapes("tiny_pg1_mha")
    assert "llm/layers/attn/qkv_einsum/w" not in _shapes("tiny_pg1")


def test_infer_config_from_shapes_roundtrip():
    for name in ("pg1_3b_448", "pg2_10b_224", "tiny_pg2", "tiny_pg1"):
        shapes = _shapes(name)
        cfg, res = infer_config_from_shapes(shapes)
        assert res == get_preset(name)[1]
        m = Model(**cfg)
        tree = jax.eval_shape(
            m.init,
            jax.random.PRNGKey(0),
            jnp.zeros((1, res, res, 3)),
            jnp.zeros((1, 4), jnp.int32),
            jnp.zeros((1, 4), jnp.int32),
        )["params"]
        assert {k: tuple(v.shape) for k, v in tree_flatten_with_names(tree)} == shapes


def test_unknown_key_is_named():
    cfg, _ = get_preset("tiny_pg1")
    cfg["llm"]["num_kv_head"] = 2
    with pytest.raises(ValueError, match="num_kv_head"):
        jax.eval_shape(
            Model(**cfg).init,
            jax.random.PRNGKey(0),
            jnp.zeros((1, 32, 32, 3)),
            jnp.zeros((1, 4), jnp.int32),
            jnp.zeros((1, 4), jnp.int32),
        )


def test_make_attn_mask_prefix_lm():
    input_mask = jnp.array([[1, 1, 1, 1, 1, 0]], bool)
    mask_ar = jnp.array([[0, 0, 1, 1, 1, 1]])
    expected = np.array(
        [
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0],
        ],
        bool,
    )
    np.testing.assert_array_equal(make_attn_mask(input_mask, mask_ar)[0], expected)


@pytest.fixture(scope="module")
def tiny():
    cfg, res = get_preset("tiny_pg2")
    model = Model(**cfg)
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.uniform(-1, 1, (2, res, res, 3)), jnp.float32)
    text = jnp.asarray(rng.integers(0, 500, (2, 7)), jnp.int32)
    mask_ar = jnp.array([[0, 0, 0, 1, 1, 1, 1]] * 2)
    params = model.init(jax.random.PRNGKey(1), image, text, mask_ar)["params"]
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
    return model, params, image, text, mask_ar


def test_forward_outputs_and_prefix_lm(tiny):
    model, params, image, text, mask_ar = tiny
    logits, out = model.apply({"params": params}, image, text, mask_ar)
    assert logits.shape == (2, 7, 1664) and logits.dtype == jnp.float32
    assert out["img/zimg"].shape == (2, 16, 64)
    # The tied output layer by hand (float64): pre-logits times the embedding table's transpose, no bias and no
    # final soft-cap; `text_tokens` (big_vision's output) is its argmax at every text position.
    pre_logits, _ = model.apply({"params": params}, image, text, mask_ar, method=model.prelogits)
    table = np.asarray(params["llm"]["embedder"]["input_embedding"], np.float64)
    by_hand = np.asarray(pre_logits, np.float64) @ table.T
    np.testing.assert_allclose(logits, by_hand, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["text_tokens"], by_hand.argmax(-1))
    # Changing a suffix token must not change logits at earlier positions (causal suffix) ...
    logits2, _ = model.apply({"params": params}, image, text.at[:, 5].set(7), mask_ar)
    np.testing.assert_allclose(logits[:, :5], logits2[:, :5], atol=1e-6)
    assert not np.allclose(logits[:, 5:], logits2[:, 5:])
    # ... while changing a prefix token changes every position (bidirectional prefix).
    logits3, _ = model.apply({"params": params}, image, text.at[:, 2].set(7), mask_ar)
    assert not np.allclose(logits[:, 0], logits3[:, 0])


def test_scan_and_loop_agree(tiny):
    model, params, image, text, mask_ar = tiny
    from paligemma_ft.checkpoints.fit import adapt_params  # scan → unscanned conversion

    cfg = {"img": dict(model.img, scan=False), "llm": dict(model.llm, scan=False)}
    loop_model = Model(**cfg)
    expected = jax.eval_shape(loop_model.init, jax.random.PRNGKey(0), image, text, mask_ar)["params"]
    loop_params = adapt_params(jax.tree.map(np.asarray, params), expected)
    a, _ = model.apply({"params": params}, image, text, mask_ar)
    b, _ = loop_model.apply({"params": loop_params}, image, text, mask_ar)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_bfloat16_params_run(tiny):
    model, params, image, text, mask_ar = tiny
    bf = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    a, _ = model.apply({"params": params}, image, text, mask_ar)
    b, _ = model.apply({"params": bf}, image, text, mask_ar)
    assert b.dtype == jnp.float32
    assert np.max(np.abs(np.asarray(a) - np.asarray(b))) < 0.5  # bf16-rounded weights, same function.
