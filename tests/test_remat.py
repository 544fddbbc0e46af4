"""Rematerialization policies (`model.*.remat_policy`): every name gives the same numbers, and keeps less or more."""

import contextlib
import functools
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from paligemma_ft.model import Model, get_preset, precision, remat
from paligemma_ft.training import losses

# Both sides of each comparison compile with the same options; these cut XLA:CPU compile time about 3x.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "i32": 4, "u32": 4, "bool": 1}


def _model(policy, compute="float32"):
    cfg, res = get_preset("tiny_pg2")  # GQA, post-norms, attention soft-cap: every block kind.
    cfg["img"]["remat_policy"] = cfg["llm"]["remat_policy"] = policy
    return Model(**precision.apply_compute_dtype(cfg, compute)), res


def _inputs(model, res):
    z = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)), z, z)["params"]
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype), shapes)
    mask_ar = jnp.asarray(np.tile([0, 0, 0, 1, 1, 1, 1, 1, 1], (2, 1)), jnp.int32)
    batch = dict(
        image=jnp.asarray(rng.uniform(-1, 1, (2, res, res, 3)), jnp.float32),
        text=jnp.asarray(rng.integers(3, 1600, (2, 9)), jnp.int32),
        mask_ar=mask_ar,
        mask_loss=mask_ar,
    )
    return params, batch


def _loss_and_grads(model, params, batch):
    fn = jax.value_and_grad(functools.partial(losses.loss_fn, model=model))
    compiled = jax.jit(fn).lower(params, batch, jax.random.PRNGKey(0)).compile(compiler_options=FAST_COMPILE)
    return compiled(params, batch, jax.random.PRNGKey(0))


def test_policy_names():
    assert [remat.short_name(n) for n in ("everything_saveable", "dots_saveable", "checkpoint_dots", None)] == [
        "none",
        "dots",
        "dots",
        "full",
    ]
    assert remat.short_name("checkpoint_dots_with_no_batch_dims") == "dots_with_no_batch_dims_saveable"
    assert remat.remat_policy("none") is None and remat.remat_policy("full") is jax.checkpoint_policies.nothing_saveable
    with pytest.raises(ValueError, match=r"Unknown remat_policy 'save_only_these_names'.*none, dots"):
        remat.remat_policy("save_only_these_names")  # A policy factory, not a policy.


@pytest.mark.slow  # fast: test_model_options' remat policies
@pytest.mark.parametrize("compute, tol", [("float32", 1e-6), ("bfloat16", 1e-2)])
def test_every_policy_gives_the_same_loss_and_gradients(compute, tol):
    ref_model, res = _model("full", compute)
    params, batch = _inputs(ref_model, res)
    ref_loss, ref_grads = _loss_and_grads(ref_model, params, batch)
    assert float(ref_loss) > 0
    for policy in ("none", "dots", "dots_with_no_batch_dims_saveable"):
        loss, grads = _loss_and_grads(_model(policy, compute)[0], params, batch)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=tol, err_msg=policy)
        # Relative to each leaf's size, but not below rounding noise: a key bias's true gradient is 0.
        floor = 1e-3 * max(float(jnp.abs(r).max()) for r in jax.tree.leaves(ref_grads))
        for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)):
            scale = max(float(jnp.abs(r).max()), floor)
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=tol * scale, err_msg=f"{policy} {path}")


def _saved_bytes(model, params, batch):
    """Bytes the backward pass keeps (JAX's own listing, arguments left out)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(functools.partial(losses.loss_fn, model=model), params, batch, jax.random.PRNGKey(0))
    total = 0
    for line in out.getvalue().splitlines():
        if "from the argument" not in line:
            dtype, dims = re.match(r"(\w+)\[([\d,]*)\]", line).groups()
            total += int(np.prod([int(d) for d in dims.split(",") if d])) * _BYTES[dtype]
    return total


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_policies_keep_less_from_none_to_full(compute):
    """In bfloat16 too: the 16-bit products are custom VJPs that JAX's dots policies cannot see, so their named
    results must be what "dots" keeps (else "dots" would silently mean "full")."""
    params, batch = _inputs(*_model("full", compute))
    saved = [_saved_bytes(_model(p, compute)[0], params, batch) for p in remat.STANDARD]
    assert saved == sorted(saved, reverse=True) and len(set(saved)) == 4, dict(zip(remat.STANDARD, saved))
