"""The fused attention kernel (`model.llm.attn_impl="pallas"`), run by Pallas' interpreter on CPU, equals the
einsum path forward and backward: prefix-LM masks with padding rows, Gemma 2's soft-cap, MQA / GQA / MHA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paligemma_ft.model import Model, get_preset, precision
from paligemma_ft.model.flash_attention import flash_attention
from paligemma_ft.training import losses


def _reference(q, k, v, mask, cap):
    """The einsum path's attention core (gemma.Attention), written out."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q.reshape(b, t, kh, n // kh, h), k, preferred_element_type=jnp.float32)
    if cap:
        logits = jnp.tanh(logits / cap) * cap
    logits = jnp.where(mask[:, None, None], logits, -2.3819763e38)
    probs = jax.nn.softmax(logits, axis=-1).astype(k.dtype)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)


def _inputs(n, kh, t=37, h=8, b=2, scale=1.0, dtype=jnp.float32):
    rng = np.random.default_rng(n * 10 + kh)
    q = jnp.asarray(scale * rng.normal(size=(b, t, n, h)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(b, t, kh, h)), dtype) for _ in range(2))
    mask_ar = np.zeros((b, t), np.int32)
    mask_ar[:, 20:] = 1  # 20 prefix tokens (bidirectional), then causal.
    valid = np.ones((b, t), bool)
    valid[1, 30:] = False  # Padding: all-masked query rows, keys nobody attends.
    cum = np.cumsum(mask_ar, 1)
    mask = (cum[:, None, :] <= cum[:, :, None]) & valid[:, None, :] & valid[:, :, None]
    return q, k, v, jnp.asarray(mask)


@pytest.mark.parametrize(
    "n, kh",
    [
        pytest.param(4, 1, id="mqa"),
        pytest.param(4, 2, id="gqa", marks=pytest.mark.slow),  # The mqa case keeps the kernel in the fast set.
        pytest.param(2, 2, id="mha", marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("cap", [0.0, 50.0])
def test_kernel_equals_the_einsum_path_forward_and_backward(n, kh, cap):
    # Logits around +-50 so that a soft-cap of 50 bends them; blocks of 16 over 37 positions (padding).
    q, k, v, mask = _inputs(n, kh, scale=6.0 if cap else 1.0)
    fused = functools.partial(flash_attention, mask=mask, softcap=cap, block_q=16, block_k=16)
    ref = functools.partial(_reference, mask=mask, cap=cap)
    np.testing.assert_allclose(fused(q, k, v), ref(q, k, v), atol=2e-5)
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))  # noqa: E731
    got = jax.grad(loss(fused), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", got, want):
        np.testing.assert_allclose(a, b, atol=2e-5 * float(jnp.abs(b).max()), err_msg=f"d{name}")
    # The padding row's output is the mean of the values, as big_vision's -2.4e38 mask gives.
    np.testing.assert_allclose(fused(q, k, v)[1, 33], jnp.repeat(v[1].mean(0), n // kh, axis=0), atol=1e-5)


def test_kernel_in_bfloat16():
    q, k, v, mask = _inputs(4, 2, dtype=jnp.bfloat16)
    out = flash_attention(q, k, v, mask, softcap=50.0, block_q=16, block_k=16)
    assert out.dtype == jnp.bfloat16
    ref = _reference(*(x.astype(jnp.float32) for x in (q, k, v)), mask, 50.0)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.05)


@pytest.mark.slow  # fast: test_kernel_equals_the_einsum_path_forward_and_backward[mqa]
@pytest.mark.parametrize("preset", ["tiny_pg2", "tiny_pg1"])
def test_model_with_pallas_attention_matches_einsum(preset):
    cfg, res = get_preset(preset)
    models = {}
    for impl in ("einsum", "pallas"):
        c = {"img": dict(cfg["img"]), "llm": dict(cfg["llm"], attn_impl=impl)}
        models[impl] = Model(**precision.apply_compute_dtype(c, "float32"))
    z = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(models["einsum"].init, jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)), z, z)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype), shapes["params"])
    mask_ar = jnp.asarray(np.tile([0, 0, 0, 1, 1, 1, 1, 1, 1], (2, 1)), jnp.int32)
    batch = dict(
        image=jnp.asarray(rng.uniform(-1, 1, (2, res, res, 3)), jnp.float32),
        text=jnp.asarray(rng.integers(3, 1600, (2, 9)), jnp.int32),
        mask_ar=mask_ar,
        mask_loss=mask_ar,
    )
    out = {
        impl: jax.jit(jax.value_and_grad(functools.partial(losses.loss_fn, model=m)))(
            params, batch, jax.random.PRNGKey(0)
        )
        for impl, m in models.items()
    }
    np.testing.assert_allclose(out["pallas"][0], out["einsum"][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out["pallas"][1]), jax.tree.leaves(out["einsum"][1])):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(float(jnp.abs(b).max()), 1e-3))
