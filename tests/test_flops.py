"""FLOP and byte accounting: hand counts on a 1-layer width-4 model, and counts read off traced gradients."""

import math

import jax
import jax.numpy as jnp
import pytest

from paligemma_ft import flops
from paligemma_ft.model import Model, get_preset
from paligemma_ft.training import optim
from paligemma_ft.utils import tree_flatten_with_names

# ViT: 4 px images in 2 px patches -> P = 4 tokens of width 4, MLP 8, 2 heads. LLM: width 4, 2 heads sharing 1 kv
# head of dim 2, MLP 8, vocab 16. Text length L = 3 (T = 7), loss on the last 2 positions.
HAND = dict(
    img=dict(
        width=4, depth=1, mlp_dim=8, num_heads=2, patch_size=(2, 2), pool_type="none", scan=False, remat_policy="none"
    ),
    llm=dict(
        variant=None,
        width=4,
        depth=1,
        mlp_dim=8,
        num_heads=2,
        num_kv_heads=1,
        head_dim=2,
        vocab_size=16,
        scan=False,
        remat_policy="none",
        attn_logits_softcap=0.0,
        final_logits_softcap=0.0,
        post_norms=False,
    ),
)
RES, TEXT_LEN, LOSS_TOKENS = 4, 3, 2

# By hand, 2·m·k·n per product. Forward of the ViT (P = 4 tokens, width 4): patchify 2·4·12·4 = 384; query, key,
# value 3·(2·4·4·4) = 384; scores q·kᵀ and probs·v over 4x4 tokens, heads x head_dim = 4: 2·(2·4·4·4) = 256;
# output projection 2·4·4·4 = 128; MLP in and out 2·(2·4·4·8) = 512; head into the LLM width 2·4·4·4 = 128.
VIT_FWD = 1792
# Forward of the LLM (T = 7, D = 4, N·H = 4, K·H = 2): q 2·7·4·4 = 224; k and v 2·(2·7·4·2) = 224; scores and
# values over 7x7 2·(2·7·7·4) = 784; attn_vec_einsum 2·7·4·4 = 224; gating (2 products) and linear 3·(2·7·4·8) = 1344.
LLM_FWD = 2800
LOGITS_FWD = 256  # 2 loss positions x D=4 x V=16: 2·2·4·16.
FWD = 4848  # 1792 + 2800 + 256.

# Full fine-tune backward: dW of every weight product; dx of every product whose input depends on a parameter (all
# but the patchify convolution, whose input is the image); both operands of the scores and values products.
# ViT: patchify dW 384; q, k, v 2·384; scores and values 2·256; output 2·128; MLP 2·512; head 2·128 = 3200.
# LLM: q 2·224; k, v 2·224; scores and values 2·784; attn_vec 2·224; MLP 2·1344 = 5600. Logits: dW and dx 2·256.
FULL = 14160  # 4848 + 3200 + 5600 + 512.
# Attention-only (the colab recipe, llm/layers/0/attn/.*): no ViT backward; in the LLM dW of q, kv and the output
# projection 3·224 = 672, both operands of scores and values 2·784 = 1568, dx through the output projection 224,
# the MLP 1344 and the logits 256; no dx below q and kv (their input depends on nothing trainable).
ATTN = 8912  # 4848 + 672 + 1568 + 224 + 1344 + 256.


def test_hand_counted_forward_full_and_attention_only():
    assert flops.forward_flops_per_example(HAND, RES, TEXT_LEN, LOSS_TOKENS) == FWD
    assert flops.train_flops_per_example(HAND, RES, TEXT_LEN, LOSS_TOKENS, trainable=True) == FULL
    assert flops.train_flops_per_example(HAND, RES, TEXT_LEN, LOSS_TOKENS, "llm/layers/0/attn/.*") == ATTN
    parts = flops.train_flops_breakdown(HAND, RES, TEXT_LEN, LOSS_TOKENS, "llm/layers/0/attn/.*")
    assert parts["img/forward"] == VIT_FWD and "img/backward_act" not in parts and "img/backward_weight" not in parts
    assert parts["logits/backward_act"] == LOGITS_FWD and "logits/backward_weight" not in parts


def test_trainable_forms_agree_and_bad_tree_is_named():
    model = Model(**HAND)
    shapes = _shapes(model)
    mask = optim.trainable_mask(shapes, [("llm/layers/0/attn/.*", {}), (".*", None)])
    by_tree = flops.train_flops_per_example(HAND, RES, TEXT_LEN, LOSS_TOKENS, mask)
    by_fn = flops.train_flops_per_example(HAND, RES, TEXT_LEN, LOSS_TOKENS, lambda n: "/attn/" in n)
    assert by_tree == by_fn == ATTN
    with pytest.raises(ValueError, match="no parameter .img/embedding/kernel"):
        flops.train_flops_per_example(HAND, RES, TEXT_LEN, LOSS_TOKENS, {"img": {"head": {"kernel": True}}})


def _shapes(model, res=RES, text_len=TEXT_LEN):
    z = jnp.zeros((1, text_len), jnp.int32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)), z, z)["params"]


@pytest.mark.parametrize(
    "preset,scan", [("tiny_pg1", True), ("tiny_pg1_mha", False), ("tiny_pg2", True), ("pg2_3b_224", True)]
)
def test_parameter_names_and_sizes_match_the_model(preset, scan):
    cfg, res = get_preset(preset)
    cfg["img"]["scan"] = cfg["llm"]["scan"] = scan
    shapes = {n: math.prod(s.shape) for n, s in tree_flatten_with_names(_shapes(Model(**cfg), res, 4))}
    assert flops.parameter_names(cfg, res) == shapes
    counts = flops.param_counts(cfg, res, "img/.*")
    assert counts["total"] == sum(shapes.values()) and counts["trainable"] == counts["img"]


@pytest.mark.parametrize(
    "pattern",
    [
        True,
        False,
        "llm/layers/.*/attn/.*",
        "img/.*",
        "img/pos_embedding",
        "llm/embedder/input_embedding",
        "img/head/.*",
        "llm/layers/1/mlp/linear",
        "llm/final_norm/scale",
        "img/Transformer/encoderblock_1/LayerNorm_1/bias",
    ],
)
def test_counts_equal_the_traced_gradient(pattern, traced_train_flops):
    cfg, res = get_preset("tiny_pg2")  # GQA, post-norms: 2 layers each tower, scan off so layers differ.
    for tower in ("img", "llm"):
        cfg[tower].update(scan=False, remat_policy="none")
    counted = flops.train_flops_per_example(cfg, res, 6, 4, pattern)
    assert counted == traced_train_flops(cfg, res, 6, 4, pattern)


def test_hand_model_traced_matches_hand_counts(traced_train_flops):
    assert traced_train_flops(HAND, RES, TEXT_LEN, LOSS_TOKENS, True) == FULL
    assert traced_train_flops(HAND, RES, TEXT_LEN, LOSS_TOKENS, "llm/layers/0/attn/.*") == ATTN


def test_decode_flops_and_bytes():
    # Per token at S keys, by hand: q 2·4·4 + k, v 2·(2·4·2) + out 2·4·4 + MLP 3·2·4·8 = 288; attention 2·2·S·4;
    # logits 2·4·16 = 128.
    for s in (1, 5, 9):
        assert flops.decode_flops_per_token(HAND, s) == 288 + 16 * s + 128
    # ... and what one cached step traces to, with a cache of exactly S = 9 slots.
    cfg = {"img": dict(HAND["img"], scan=True), "llm": dict(HAND["llm"], scan=True)}
    model = Model(**cfg)
    params = _shapes(model)  # Abstract: only traced.
    prefill = lambda p: model.apply(
        {"params": p},
        jnp.zeros((1, 8, 4)),
        jnp.ones((1, 8), bool),  # noqa: E731
        jnp.zeros((1, 8), jnp.int32),
        cache_size=9,
        method=model.prefill_cache,
        mutable=["cache"],
    )[1]
    extend = lambda p, c: model.apply(
        {"params": p, **c},
        jnp.zeros((1, 1, 4)),
        method=model.extend_cache,  # noqa: E731
        mutable=["cache"],
    )
    step = jax.make_jaxpr(extend)(params, jax.eval_shape(prefill, params))
    assert flops.jaxpr_matmul_flops(step) == flops.decode_flops_per_token(cfg, 9)
    # Bytes: every LLM parameter once plus K and V of S positions. The LLM's 220 parameters, by hand: embedding
    # 16·4 = 64, q 2·4·2 = 16, kv 2·1·4·2 = 16, attn_vec 2·2·4 = 16, gating 2·4·8 = 64, linear 8·4 = 32, three
    # norm scales 3·4 = 12. The cache: K and V x 1 layer x batch x 9 positions x 1 kv head x head dim 2.
    assert sum(math.prod(s.shape) for s in jax.tree.leaves(_shapes(model)["llm"])) == 220
    assert flops.decode_bytes_per_step(cfg, 9, batch=3) == 220 * 2 + 2 * 3 * 9 * 2 * 2  # bfloat16: 656.
    assert flops.decode_bytes_per_step(cfg, 9, param_dtype="float32", cache_dtype="float32") == 220 * 4 + 2 * 9 * 2 * 4


def test_peaks_and_mfu():
    assert flops.peak_flops("cpu") is None and flops.peak_bandwidth("cpu") is None
    assert flops.mfu(1e12, 10.0, "cpu") is None
    for kind in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-40GB", "TPU v4", "TPU v5 lite"):
        assert flops.peak_flops(kind) > 1e14 and flops.peak_bandwidth(kind) > 5e11
    # The H100 PCIe part is slower than the SXM part it shares a name prefix with.
    assert flops.peak_flops("NVIDIA H100 PCIe") < flops.peak_flops("NVIDIA H100 80GB HBM3")
    peak = flops.peak_flops("TPU v4")
    assert flops.mfu(peak / 4, 2.0, "TPU v4", num_devices=4) == pytest.approx(2.0 / 16)
    # One row at 9 positions reads 220·2 + 2·9·2·2 = 512 bytes a token; TPU v4 moves 1.2288 TB/s.
    assert flops.decode_bandwidth_limit(HAND, 9, 1, "TPU v4") == pytest.approx(1.2288e12 / 512)
