"""Schedules, durations, the optax chain, trainable sets, losses and gradient accumulation
(paligemma_ft.training.optim)."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from paligemma_ft.training import optim
from paligemma_ft.utils import tree_flatten_with_names

ATTN_ONLY = [("llm/layers/attn/.*", dict(decay_type="constant")), (".*", None)]


def _params(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    mk = lambda *s: jnp.asarray(rng.normal(size=s), dtype)  # noqa: E731
    return {
        "img": {"head": {"bias": mk(2), "kernel": mk(3, 2)}},
        "llm": {"layers": {"attn": {"q_einsum": {"w": mk(2, 3)}}, "mlp": {"linear": mk(3, 3)}}},
    }


def _grads(params, scale=1.0):
    return jax.tree.map(
        lambda p: jnp.full_like(p, scale) + 0.1 * jnp.arange(p.size, dtype=p.dtype).reshape(p.shape), params
    )


# --- schedules ------------------------------------------------------------------------------------------------


def test_colab_cosine_schedule_values():
    fn = optim.create_learning_rate_schedule(total_steps=65, base=0.03, decay_type="cosine", warmup_percent=0.10)
    # round(6.5) == 6 warmup steps (banker's rounding), then a cosine over the remaining 59 steps.
    assert float(fn(1)) == pytest.approx(0.03 / 6, rel=1e-6)
    assert float(fn(3)) == pytest.approx(0.03 * 3 / 6, rel=1e-6)
    assert float(fn(6)) == pytest.approx(0.03, rel=1e-6)
    assert float(fn(7)) == pytest.approx(0.03 * 0.5 * (1 + math.cos(math.pi / 59)), rel=1e-6)
    expected_64 = 0.03 * 0.5 * (1 + math.cos(math.pi * 58 / 59))
    assert float(fn(64)) == pytest.approx(expected_64, rel=1e-4)
    assert 1.5e-5 < expected_64 < 2.5e-5
    assert float(fn(0)) == 0.0


def test_schedule_warmup_steps_linear_polynomial():
    lin = optim.create_learning_rate_schedule(100, base=2.0, decay_type="linear", warmup_steps=10)
    assert float(lin(5)) == pytest.approx(1.0)  # 2.0 * 5/10 warmup
    assert float(lin(55)) == pytest.approx(1.0)  # half way through the decay
    assert float(lin(100)) == pytest.approx(0.0)
    poly = optim.create_learning_rate_schedule(100, base=1.0, decay_type="polynomial", power=2, end=0.1)
    assert float(poly(50)) == pytest.approx(0.1 + 0.9 * 0.25)


def test_schedule_rsqrt_constant_stair_cooldown():
    rs = optim.create_learning_rate_schedule(100, base=1.0, decay_type="rsqrt", warmup_steps=4, timescale_steps=10)
    assert float(rs(2)) == pytest.approx(0.5)
    assert float(rs(14)) == pytest.approx(1 / math.sqrt(2.0))
    const = optim.create_learning_rate_schedule(100, base=0.3, decay_type="constant", warmup_steps=3, cooldown_steps=10)
    assert [float(const(s)) for s in (1, 50, 95)] == pytest.approx([0.1, 0.3, 0.15])
    stair = optim.create_learning_rate_schedule(30, base=1.0, decay_type="stair", steps=[10, 20], mults=[0.1, 0.01])
    assert [float(stair(s)) for s in (5, 15, 25)] == pytest.approx([1.0, 0.1, 0.01])
    pct = optim.create_learning_rate_schedule(20, base=1.0, decay_type="constant", warmup_percent=0.25)
    assert float(pct(1)) == pytest.approx(0.2)  # 5 warmup steps


def test_schedule_rejects_typos_and_bad_warmup():
    with pytest.raises(ValueError, match="warmup_pecent"):
        optim.create_learning_rate_schedule(10, decay_type="cosine", warmup_pecent=0.1)
    with pytest.raises(ValueError, match="decay_type"):
        optim.create_learning_rate_schedule(10, decay_type="cosyne")
    with pytest.raises(ValueError, match="shorter than total_steps"):
        optim.create_learning_rate_schedule(10, decay_type="cosine", warmup_steps=10)
    with pytest.raises(ValueError, match="scale_with_batchsize=True needs the batch size"):
        optim.create_learning_rate_schedule(10, decay_type="cosine", scale_with_batchsize=True)


def test_steps_conversions():
    assert optim.steps("total", {"total_steps": 7}) == 7
    assert optim.steps("total", {"total_epochs": 2}, data_size=90, batch_size=8) == 22  # round(22.5)
    assert optim.steps("total", {"total_examples": 100}, batch_size=8) == 12  # round(12.5)
    assert optim.steps("warmup", {"warmup_percent": 0.1}, total_steps=65) == 6
    assert optim.steps("warmup", {"warmup_percent": 0.001}, total_steps=65) == 1  # never rounds to 0
    assert optim.steps("warmup", {}, total_steps=65, default=0) == 0
    with pytest.raises(ValueError, match="Only one of"):
        optim.steps("total", {"total_steps": 1, "total_epochs": 1.0})
    with pytest.raises(ValueError, match="Cannot convert 'total'"):
        optim.steps("total", {"total_epochs": 1.0})  # no data_size / batch_size
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        optim.steps("warmup", {"warmup_percent": 5}, total_steps=10)


# --- trainable sets and dtypes -----------------------------------------------------------------------------------


def test_trainable_mask_and_dtypes():
    params = _params()
    mask = dict(tree_flatten_with_names(optim.trainable_mask(params, ATTN_ONLY)))
    assert mask == {
        "img/head/bias": False,
        "img/head/kernel": False,
        "llm/layers/attn/q_einsum/w": True,
        "llm/layers/mlp/linear": False,
    }
    assert all(dict(tree_flatten_with_names(optim.trainable_mask(params, {"decay_type": "cosine"}))).values())
    bools = optim.trainable_mask(params, [("img/.*", True), (".*", False)])
    assert dict(tree_flatten_with_names(bools))["img/head/kernel"] is True
    shapes = jax.eval_shape(lambda: _params(jnp.bfloat16))
    dtypes = dict(
        tree_flatten_with_names(optim.param_dtypes(shapes, {"schedule": ATTN_ONLY, "frozen_dtype": "float16"}))
    )
    assert dtypes["llm/layers/attn/q_einsum/w"] == np.float32 and dtypes["llm/layers/mlp/linear"] == np.float16
    kept = dict(tree_flatten_with_names(optim.param_dtypes(shapes, {"schedule": ATTN_ONLY})))
    assert kept["img/head/kernel"] == jnp.bfloat16 and kept["llm/layers/attn/q_einsum/w"] == np.float32
    with pytest.raises(ValueError, match="img/head/bias"):
        optim.trainable_mask(params, [("llm/.*", {})])
    assert optim.describe_trainable(params, {"schedule": ATTN_ONLY}) == {"trainable": 6, "frozen": 2 + 6 + 9}


def test_locked_configdict_drives_the_optimizer():
    config = ml_collections.ConfigDict(
        dict(optax_name="big_vision.sgd", lr=0.5, total_steps=4, schedule=ATTN_ONLY, optax={})
    )
    config.lock()  # The trainer locks configs; optional keys must be read with defaults.
    params = _params()
    tx, scheds = optim.make_optimizer(config, params)
    updates, _ = tx.update(_grads(params), tx.init(params), params)
    np.testing.assert_allclose(
        updates["llm"]["layers"]["attn"]["q_einsum"]["w"],
        -0.5 * np.asarray(_grads(params)["llm"]["layers"]["attn"]["q_einsum"]["w"]),
    )
    assert len(scheds) == 1


# --- the optax chain ----------------------------------------------------------------------------------------------


def _one_update(config, params, grads):
    tx, scheds = optim.make_optimizer(config, params, total_steps=10)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    return updates, state, scheds, tx


def test_frozen_parameters_have_no_state_and_no_update():
    params = _params()
    params["img"]["head"]["bias"] = params["img"]["head"]["bias"].at[0].set(-0.0)
    config = dict(optax_name="scale_by_adam", lr=0.1, wd=0.5, grad_clip_norm=1.0, schedule=ATTN_ONLY)
    updates, state, _, _ = _one_update(config, params, _grads(params))
    array_names = [(n, x.shape) for n, x in tree_flatten_with_names(state)]
    mirrored = [n for n, shape in array_names if shape]
    # Only Adam's mu and nu of the one trainable leaf; everything else is a scalar count.
    assert len(mirrored) == 2 and all(n.endswith("llm/layers/attn/q_einsum/w") for n in mirrored), array_names
    full = optim.make_optimizer({**config, "schedule": {"decay_type": "constant"}}, params, total_steps=10)[0]
    assert optim.count_state_arrays(full.init(params)) == optim.count_state_arrays(state) + 2 * 3
    new = optax.apply_updates(params, updates)
    for name, (p, q) in zip(dict(tree_flatten_with_names(params)), zip(jax.tree.leaves(params), jax.tree.leaves(new))):
        same = np.array_equal(np.asarray(p).view(np.uint32), np.asarray(q).view(np.uint32))  # bitwise, keeps -0.0
        assert same == (name != "llm/layers/attn/q_einsum/w"), name


def test_plain_sgd_matches_hand_update():
    params = _params()
    grads = _grads(params)
    config = dict(optax_name="big_vision.sgd", lr=0.03, schedule=ATTN_ONLY)
    updates, _, _, _ = _one_update(config, params, grads)
    q = "llm/layers/attn/q_einsum/w"
    u = dict(tree_flatten_with_names(updates))
    g = dict(tree_flatten_with_names(grads))
    np.testing.assert_allclose(u[q], -0.03 * np.asarray(g[q]), rtol=1e-6)
    assert not np.any(np.asarray(u["llm/layers/mlp/linear"]))


def test_colab_recipe_first_updates_use_offset_schedule():
    params = _params()
    config = dict(
        optax_name="big_vision.sgd",
        lr=0.03,
        total_steps=64,
        schedule_step_offset=1,
        schedule=[("llm/layers/attn/.*", dict(decay_type="cosine", warmup_percent=0.10)), (".*", None)],
    )
    tx, scheds = optim.make_optimizer(config, params)
    lrs = [0.03 * float(scheds[0](c)) for c in range(64)]
    assert lrs[0] == pytest.approx(0.005, rel=1e-6) and lrs[5] == pytest.approx(0.03, rel=1e-6)
    assert lrs[63] == pytest.approx(0.03 * 0.5 * (1 + math.cos(math.pi * 58 / 59)), rel=1e-4)
    grads = _grads(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(
        updates["llm"]["layers"]["attn"]["q_einsum"]["w"],
        -0.005 * np.asarray(grads["llm"]["layers"]["attn"]["q_einsum"]["w"]),
        rtol=1e-5,
    )


def test_adam_matches_optax_adam():
    params = _params()
    config = dict(optax_name="scale_by_adam", optax=dict(b2=0.999), lr=0.01, schedule=dict(decay_type="constant"))
    tx, _ = optim.make_optimizer(config, params, total_steps=10)
    ref = optax.adam(0.01, b2=0.999)
    s, r = tx.init(params), ref.init(params)
    p_ours = p_ref = params
    for k in range(3):
        g = _grads(params, scale=1.0 + k)
        u, s = tx.update(g, s, p_ours)
        v, r = ref.update(g, r, p_ref)
        p_ours, p_ref = optax.apply_updates(p_ours, u), optax.apply_updates(p_ref, v)
    for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_weight_decay_only_on_kernels_not_multiplied_by_lr():
    params = _params()
    grads = _grads(params)
    # A warmup of 2 steps makes the schedule 0.5 at the second update: the decay is scaled by it, not by lr.
    config = dict(optax_name="big_vision.sgd", lr=0.1, wd=0.01, schedule=dict(decay_type="constant", warmup_steps=2))
    tx, _ = optim.make_optimizer(config, params, total_steps=10)
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    updates, _ = tx.update(grads, state, params)
    u, g, p = (dict(tree_flatten_with_names(t)) for t in (updates, grads, params))
    k = "img/head/kernel"
    np.testing.assert_allclose(u[k], -0.5 * (0.1 * np.asarray(g[k]) + 0.01 * np.asarray(p[k])), rtol=1e-6)
    for name in ("img/head/bias", "llm/layers/attn/q_einsum/w", "llm/layers/mlp/linear"):
        np.testing.assert_allclose(u[name], -0.5 * 0.1 * np.asarray(g[name]), rtol=1e-6)


def test_clipping_ignores_frozen_grads_and_lr_mults():
    params = _params()
    grads = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), params)
    config = dict(
        optax_name="big_vision.sgd",
        lr=1.0,
        grad_clip_norm=1.0,
        schedule=ATTN_ONLY,
        lr_mults=[("llm/layers/attn/.*", 0.5)],
    )
    updates, _, _, _ = _one_update(config, params, grads)
    w = np.asarray(updates["llm"]["layers"]["attn"]["q_einsum"]["w"])
    # The trainable grad alone has norm 100 * sqrt(6): clipped to norm 1, then the 0.5 lr multiplier.
    np.testing.assert_allclose(np.linalg.norm(w), 0.5, rtol=1e-6)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("big_vision.momentum_hp", {}),
        ("adafactor", {}),
        ("scale_by_adafactor", dict(momentum=None)),
        ("adamw", dict(b2=0.95)),
    ],
)
def test_other_optimizers_step_and_keep_frozen_stateless(name, kwargs):
    params = _params()
    config = dict(optax_name=name, optax=kwargs, lr=0.1, schedule=ATTN_ONLY)
    updates, state, _, _ = _one_update(config, params, _grads(params))
    assert all(n.startswith(("0/", "1/", "2/", "3/", "4/", "5/", "6/")) for n, _ in tree_flatten_with_names(state))
    assert not any("mlp" in n or "img/" in n for n, _ in tree_flatten_with_names(state))
    assert np.any(np.asarray(updates["llm"]["layers"]["attn"]["q_einsum"]["w"]))
    assert not np.any(np.asarray(updates["img"]["head"]["kernel"]))


def test_config_errors_name_the_problem():
    params = _params()
    with pytest.raises(ValueError, match="img/head/bias"):
        optim.make_optimizer(dict(schedule=[("llm/.*", {})]), params, total_steps=10)
    with pytest.raises(ValueError, match="optax_name 'adamz'"):
        optim.make_optimizer(dict(optax_name="adamz"), params, total_steps=10)
    with pytest.raises(ValueError, match="config.lr"):
        optim.make_optimizer(dict(optax=dict(learning_rate=1.0)), params, total_steps=10)
    with pytest.raises(ValueError, match="lr_mults"):
        optim.make_optimizer(dict(lr_mults=[(".*", 0.0)]), params, total_steps=10)


# --- losses ---------------------------------------------------------------------------------------------------

LOGITS = np.array(
    [[[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]], [[2.0, 1.0, 1.0], [0.5, 0.5, 0.5]]], np.float32
)  # [B=2, T=2, V=3]
LABELS = np.array([[1, 2], [0, 1]], np.int32)


def _hand_nll(ls=0.0):
    logits = LOGITS.astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = np.eye(3)[LABELS] * (1 - ls) + (1 - np.eye(3)[LABELS]) * ls / 2
    return -(logp * targets).sum(-1)  # [B, T]


def test_softmax_xent_by_hand_example_and_token_mean():
    mask = np.array([[1, 1], [0, 1]])
    nll = _hand_nll()
    expected = (nll[0].sum() / 2 + nll[1, 1] / 1) / 2
    assert float(optim.softmax_xent(LOGITS, LABELS, mask)) == pytest.approx(expected, rel=1e-6)
    assert float(optim.softmax_xent(LOGITS, LABELS, mask, reduction="token_mean")) == pytest.approx(
        (nll[0].sum() + nll[1, 1]) / 3, rel=1e-6
    )
    np.testing.assert_allclose(
        optim.softmax_xent(LOGITS, LABELS, mask, reduction="none"), nll * mask, rtol=1e-6, atol=1e-6
    )


def test_softmax_xent_label_smoothing_and_all_masked_example():
    mask = np.array([[1, 1], [0, 0]])  # The second example supervises nothing: it counts as 0 in the mean.
    nll = _hand_nll(ls=0.2)
    assert float(optim.softmax_xent(LOGITS, LABELS, mask, label_smoothing=0.2)) == pytest.approx(
        nll[0].sum() / 2 / 2, rel=1e-6
    )
    assert float(optim.softmax_xent(LOGITS, LABELS, np.zeros((2, 2)))) == 0.0


def test_chunked_xent_equals_plain_values_and_grads():
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(11, 8)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 11, size=(2, 5)))
    mask = jnp.asarray([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    for reduction in ("example_mean", "token_mean"):
        plain = lambda h, e: optim.softmax_xent(
            h @ e.T,
            labels,
            mask,
            label_smoothing=0.1,  # noqa: E731
            reduction=reduction,
        )
        chunked = lambda h, e: optim.chunked_softmax_xent(
            h,
            e,
            labels,
            mask,
            chunk=3,  # noqa: E731
            label_smoothing=0.1,
            reduction=reduction,
        )
        (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, emb) for f in (plain, chunked))
        np.testing.assert_allclose(a, b, rtol=1e-6)
        for x, y in zip(ga, gb):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    flat = optim.chunked_softmax_xent(
        h.reshape(10, 8), emb, labels.reshape(10), mask.reshape(10), chunk=4, reduction="token_mean"
    )
    np.testing.assert_allclose(flat, optim.softmax_xent(h @ emb.T, labels, mask, reduction="token_mean"), rtol=1e-6)


def _sub_jaxprs(params):
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(v, "eqns"):  # Jaxpr
                yield v
            elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):  # ClosedJaxpr
                yield v.jaxpr


def _max_intermediate_size(jaxpr) -> int:
    """Largest number of elements of any value computed in `jaxpr`, nested jaxprs (scan, remat) included."""
    biggest = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            biggest = max(biggest, int(np.prod(getattr(v.aval, "shape", ()))))
        for sub in _sub_jaxprs(eqn.params):
            biggest = max(biggest, _max_intermediate_size(sub))
    return biggest


def test_chunked_xent_never_builds_all_logits():
    n_tokens, vocab, width, chunk = 64, 512, 8, 16
    h = jnp.ones((4, n_tokens // 4, width))
    emb = jnp.ones((vocab, width))
    labels = jnp.zeros((4, n_tokens // 4), jnp.int32)
    mask = jnp.ones((4, n_tokens // 4))
    grad_fn = jax.grad(lambda h, e: optim.chunked_softmax_xent(h, e, labels, mask, chunk=chunk), argnums=(0, 1))
    biggest = _max_intermediate_size(jax.make_jaxpr(grad_fn)(h, emb).jaxpr)
    assert chunk * vocab <= biggest < n_tokens * vocab
    plain = jax.grad(lambda h, e: optim.softmax_xent(h @ e.T, labels, mask), argnums=(0, 1))
    assert _max_intermediate_size(jax.make_jaxpr(plain)(h, emb).jaxpr) >= n_tokens * vocab  # the check can fail


# --- gradient accumulation -----------------------------------------------------------------------------------


def test_accumulated_gradients_equal_full_batch():
    rng = np.random.default_rng(2)
    params = {"w": jnp.asarray(rng.normal(size=(4, 7)), jnp.float32), "b": jnp.zeros((7,), jnp.float32)}
    batch = {
        "x": jnp.asarray(rng.normal(size=(6, 3, 4)), jnp.float32),
        "y": jnp.asarray(rng.integers(0, 7, size=(6, 3))),
        "m": jnp.asarray([[1, 1, 1], [1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 1]]),
    }

    def loss(p, b):
        return optim.softmax_xent(b["x"] @ p["w"] + p["b"], b["y"], b["m"])

    vg = jax.value_and_grad(loss)
    full_loss, full_grads = jax.jit(vg)(params, batch)
    acc_loss, acc_grads = jax.jit(lambda p, b: optim.accumulate_gradients(vg, p, b, 2))(params, batch)
    np.testing.assert_allclose(acc_loss, full_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(acc_grads), jax.tree.leaves(full_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="micro_batches=4"):
        optim.accumulate_gradients(vg, params, batch, 4)
