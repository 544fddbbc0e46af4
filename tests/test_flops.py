"""FLOP and byte accounting: hand counts on a 1-layer width-4 model, and counts read off traced gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paligemma_ft import flops
from paligemma_ft.model import Model, get_preset
from paligemma_ft.training import optim
from paligemma_ft.utils import recover_tree, tree_flatten_with_names

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

# Forward, by hand (2·m·k·n per product):
VIT_FWD = (
    2 * 4 * (2 * 2 * 3) * 4  # patchify: P=4 rows, 12 inputs, width 4                          = 384
    + 3 * 2 * 4 * 4 * 4  # query, key, value projections                                    = 384
    + 2 * (2 * 4 * 4 * 4)  # scores q·kᵀ and probs·v over 4x4 tokens, heads x head_dim = 4    = 256
    + 2 * 4 * 4 * 4  # attention output projection                                      = 128
    + 2 * (2 * 4 * 4 * 8)  # MLP in and out                                                   = 512
    + 2 * 4 * 4 * 4
)  # head into the LLM width                                          = 128
LLM_FWD = (
    2 * 7 * 4 * 4  # q: T=7, D=4 -> N·H = 4                                            = 224
    + 2 * (2 * 7 * 4 * 2)  # k and v: D=4 -> K·H = 2                                           = 224
    + 2 * (2 * 7 * 7 * 4)  # scores and values over 7x7, N·H = 4                               = 784
    + 2 * 7 * 4 * 4  # attn_vec_einsum                                                   = 224
    + 3 * (2 * 7 * 4 * 8)
)  # gating (2 products) and linear                                    = 1344
LOGITS_FWD = 2 * 2 * 4 * 16  # 2 loss positions x D=4 x V=16                                     = 256
FWD = VIT_FWD + LLM_FWD + LOGITS_FWD  # 4848

# Full fine-tune: every weight product again for dW, every product but the patchify conv again for dx, and the
# two activation products twice each (both operands) in each tower.
FULL = (
    FWD
    + (VIT_FWD - 256)
    + (LLM_FWD - 784)
    + LOGITS_FWD  # dW: all weight products
    + (VIT_FWD - 384 + 256)
    + (LLM_FWD + 784)
    + LOGITS_FWD
)  # dx: all but patchify; products twice
# Attention-only (the colab recipe): no ViT backward; in the LLM dW of q/kv/out, no dx below q/kv, both operands
# of scores and values, dx through the output projection, the MLP and the logits.
ATTN = FWD + (448 + 224) + (784 + 784) + 224 + 1344 + LOGITS_FWD


def test_hand_counted_forward_full_and_attention_only():
    assert FWD == 4848 and FULL == 14160 and ATTN == 8912  # the arithmetic above, summed
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


def _loss_fn(model, batch, loss_tokens):
    def loss(params):
        pre, _ = model.apply(
            {"params": params}, batch["image"], batch["text"], batch["mask_ar"], method=model.prelogits
        )
        logits = model.apply({"params": params}, pre[:, -loss_tokens:], method=model.compute_logits)
        return optim.softmax_xent(logits, batch["labels"][:, -loss_tokens:], jnp.ones(logits.shape[:2]))

    return loss


def _traced_train_flops(cfg, res, text_len, loss_tokens, pattern, batch_size=2):
    """Matmul FLOPs in the jaxpr of the gradient w.r.t. the trainable leaves only (frozen ones are constants)."""
    model = Model(**cfg)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _shapes(model, res, text_len))
    rng = np.random.default_rng(0)
    batch = dict(
        image=jnp.asarray(rng.uniform(-1, 1, (batch_size, res, res, 3)), jnp.float32),
        text=jnp.asarray(rng.integers(0, 16, (batch_size, text_len)), jnp.int32),
        mask_ar=jnp.asarray(np.tile([0] * (text_len - loss_tokens) + [1] * loss_tokens, (batch_size, 1))),
        labels=jnp.asarray(rng.integers(0, 16, (batch_size, text_len)), jnp.int32),
    )
    loss = _loss_fn(model, batch, loss_tokens)
    flat = tree_flatten_with_names(params)
    is_tr = flops.as_predicate(pattern)
    names = [n for n, _ in flat]

    def of_trainable(tr):
        merged = dict(flat) | tr
        return loss(recover_tree(names, [merged[n] for n in names]))

    tr = {n: v for n, v in flat if is_tr(n)}
    fn = jax.grad(of_trainable) if tr else of_trainable
    return flops.jaxpr_matmul_flops(jax.make_jaxpr(fn)(tr)) / batch_size


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
def test_counts_equal_the_traced_gradient(pattern):
    cfg, res = get_preset("tiny_pg2")  # GQA, post-norms: 2 layers each tower, scan off so layers differ.
    for tower in ("img", "llm"):
        cfg[tower].update(scan=False, remat_policy="none")
    counted = flops.train_flops_per_example(cfg, res, 6, 4, pattern)
    assert counted == _traced_train_flops(cfg, res, 6, 4, pattern)


def test_hand_model_traced_matches_hand_counts():
    assert _traced_train_flops(HAND, RES, TEXT_LEN, LOSS_TOKENS, True) == FULL
    assert _traced_train_flops(HAND, RES, TEXT_LEN, LOSS_TOKENS, "llm/layers/0/attn/.*") == ATTN


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
    # Bytes: every LLM parameter in bf16 once plus K and V of S positions (1 layer, 1 kv head of dim 2).
    llm_params = sum(math.prod(s.shape) for s in jax.tree.leaves(_shapes(model)["llm"]))
    assert flops.decode_bytes_per_step(cfg, 9, batch=3) == llm_params * 2 + 2 * 1 * 3 * 9 * 1 * 2 * 2
    assert flops.decode_bytes_per_step(cfg, 9, param_dtype="float32", cache_dtype="float32") == (
        llm_params * 4 + 2 * 9 * 2 * 4
    )


def test_peaks_and_mfu():
    assert flops.peak_flops("cpu") is None and flops.peak_bandwidth("cpu") is None
    assert flops.mfu(1e12, 10.0, "cpu") is None
    for kind in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-40GB", "TPU v4", "TPU v5 lite"):
        assert flops.peak_flops(kind) > 1e14 and flops.peak_bandwidth(kind) > 5e11
    # The H100 PCIe part is slower than the SXM part it shares a name prefix with.
    assert flops.peak_flops("NVIDIA H100 PCIe") < flops.peak_flops("NVIDIA H100 80GB HBM3")
    peak = flops.peak_flops("TPU v4")
    assert flops.mfu(peak / 4, 2.0, "TPU v4", num_devices=4) == pytest.approx(2.0 / 16)
    assert flops.decode_bandwidth_limit(HAND, 9, 1, "TPU v4") == pytest.approx(
        flops.peak_bandwidth("TPU v4") / flops.decode_bytes_per_step(HAND, 9)
    )
