"""Speed options that must not change results: rematerialization policies and the attention implementation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paligemma_ft import decode
from paligemma_ft.model import Model, get_preset
from paligemma_ft.training.losses import loss_fn

TEXT_LEN = 8
# Both sides of each comparison compile with the same options; these cut XLA:CPU compile time about 3x.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _batch(res, b=2, seed=0):
    rng = np.random.default_rng(seed)
    # Prefix of 3 tokens (bidirectional with the image), then 5 causal suffix tokens; loss on the suffix.
    mask_ar = np.tile([0, 0, 0, 1, 1, 1, 1, 1, 1], (b, 1)).astype(np.int32)
    return dict(
        image=jnp.asarray(rng.uniform(-1, 1, (b, res, res, 3)), jnp.float32),
        text=jnp.asarray(rng.integers(3, 1600, (b, TEXT_LEN + 1)), jnp.int32),
        mask_ar=jnp.asarray(mask_ar),
        mask_loss=jnp.asarray(mask_ar),
        _mask=jnp.ones((b,), bool),
    )


def _model(preset, **llm):
    cfg, res = get_preset(preset)
    cfg["llm"].update(llm)
    if "remat_policy" in llm:
        cfg["img"]["remat_policy"] = llm["remat_policy"]
    return Model(**cfg), res


def _params(model, res):
    """Random parameters without compiling `init`: normal(0, 0.05) on every leaf (none left at zero, which
    would hide layout mistakes)."""
    z = jnp.zeros((1, TEXT_LEN), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)), z, z)["params"]
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype), shapes)


def _outputs(model, params, batch):
    """(text logits, loss, gradients) in one compiled function."""

    def fn(params, batch):
        logits, _ = model.apply({"params": params}, batch["image"], batch["text"][:, :-1], batch["mask_ar"][:, :-1])
        loss, grads = jax.value_and_grad(functools.partial(loss_fn, model=model))(params, batch, jax.random.PRNGKey(0))
        return logits, loss, grads

    return jax.jit(fn).lower(params, batch).compile(compiler_options=FAST_COMPILE)(params, batch)


def _assert_close(a, b, tol=1e-5):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol, err_msg=str(path))


def test_remat_policies_give_the_same_loss_and_gradients():
    ref_model, res = _model("tiny_pg2", remat_policy="full")
    params, batch = _params(ref_model, res), _batch(res)
    ref = _outputs(ref_model, params, batch)
    assert float(ref[1]) > 0
    model, _ = _model("tiny_pg2", remat_policy="none")
    _assert_close(_outputs(model, params, batch), ref)


def test_remat_policy_changes_what_is_saved():
    """The option is not a no-op: with remat, the gradient's jaxpr holds checkpointed (recomputed) blocks."""

    def remats(policy):
        model, res = _model("tiny_pg1", remat_policy=policy)
        params, batch = _params(model, res), _batch(res)
        jaxpr = jax.make_jaxpr(jax.grad(functools.partial(loss_fn, model=model)))(params, batch, jax.random.PRNGKey(0))
        return str(jaxpr).count("checkpoint") + str(jaxpr).count("remat")

    assert remats("full") > remats("none")


def test_dot_product_attention_matches_einsum():
    ref_model, res = _model("tiny_pg1")  # MQA: 4 query heads share 1 kv head.
    model, _ = _model("tiny_pg1", attn_impl="xla")
    params, batch = _params(ref_model, res), _batch(res)
    ref = _outputs(ref_model, params, batch)
    _assert_close(_outputs(model, params, batch), ref)
    assert float(jnp.max(jnp.abs(ref[0]))) > 1e-3  # Not trivially equal zeros.


def test_kv_cache_passes_keep_the_einsum_path():
    """Decoding with attn_impl="xla" traces to exactly the einsum model's computation."""

    def traced(model, res):
        params = jax.eval_shape(lambda: _params(model, res))
        prompt = dict(
            image=jnp.zeros((2, res, res, 3)),
            text=jnp.ones((2, 4), jnp.int32),
            mask_ar=jnp.zeros((2, 4), jnp.int32),
            mask_input=jnp.ones((2, 4), jnp.int32),
        )
        return str(jax.make_jaxpr(lambda p: decode.decode(model, p, prompt, max_decode_len=2))(params))

    ref_model, res = _model("tiny_pg1")
    xla_jaxpr = traced(_model("tiny_pg1", attn_impl="xla")[0], res)
    assert xla_jaxpr == traced(ref_model, res)
    # ... while the teacher-forced pass does change (the check can fail).
    batch = _batch(res)
    forward = lambda m: str(
        jax.make_jaxpr(
            lambda p: m.apply(
                {"params": p},
                batch["image"],
                batch["text"],  # noqa: E731
                batch["mask_ar"],
            )
        )(jax.eval_shape(lambda: _params(m, res)))
    )
    assert forward(_model("tiny_pg1", attn_impl="xla")[0]) != forward(ref_model)


def test_attention_options_fail_naming_the_key():
    model, res = _model("tiny_pg2", attn_impl="xla")  # Gemma 2 soft-caps attention logits.
    with pytest.raises(ValueError, match="attn_impl='xla' cannot apply attn_logits_softcap"):
        _params(model, res)
    model, res = _model("tiny_pg1", attn_impl="flash")
    with pytest.raises(ValueError, match="Unknown model.llm.attn_impl 'flash'"):
        _params(model, res)
    model, res = _model("tiny_pg1", remat_policy="sometimes")
    with pytest.raises(ValueError, match="Unknown remat_policy 'sometimes'"):
        _params(model, res)
