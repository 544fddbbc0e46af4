"""The train step alone, on the tiny model: what one update changes, what it reports, gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paligemma_ft.model import Model, get_preset
from paligemma_ft.training import optim
from paligemma_ft.training import step as step_lib
from paligemma_ft.utils import tree_flatten_with_names

L1 = 10  # Sequence length: text_len + 1.
# Four rows (bos 2, prefix tokens 7..9, separator 5, suffix tokens 11..19, eos 1, padding 0), mask_loss under each.
TEXT = [
    [2, 7, 8, 5, 11, 12, 1, 0, 0, 0],  # Fits, padded: 3 loss tokens (2 suffix + eos).
    [2, 7, 5, 11, 12, 13, 14, 15, 16, 17],  # Suffix cut: no eos at the end, 7 loss tokens.
    [2, 7, 8, 9, 7, 8, 9, 7, 8, 9],  # Prefix fills everything: cut, no loss token.
    [2, 7, 8, 9, 5, 11, 12, 13, 14, 1],  # Fits exactly, ending with eos: 5 loss tokens, not cut.
]
MASK_LOSS = [
    [0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
    [0, 0, 0, 1, 1, 1, 1, 1, 1, 1],
    [0] * 10,
    [0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
]


def _batch(seed: int = 0) -> dict:
    res = get_preset("tiny_pg1")[1]
    mask_loss = np.array(MASK_LOSS, np.int32)
    return {
        "image": jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (4, res, res, 3)), jnp.float32),
        "text": jnp.asarray(TEXT, jnp.int32),
        "mask_ar": jnp.asarray(np.maximum(mask_loss, np.array(TEXT) == 0), jnp.int32),  # Suffix and padding causal.
        "mask_loss": jnp.asarray(mask_loss),
        "_mask": jnp.ones((4,), bool),
    }


def _state_and_pieces(optax_name: str = "scale_by_adam"):
    """A fresh state of the tiny model whose attention layers train (everything else frozen)."""
    cfg, res = get_preset("tiny_pg1")
    model = Model(**cfg)
    z = jnp.zeros((1, L1), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)), z, z)["params"]
    schedule = [("llm/layers/attn/.*", {"decay_type": "cosine"}), (".*", None)]
    config = dict(schedule=schedule, optax_name=optax_name, lr=0.01, wd=0.0)
    tx, sched_fns = optim.make_optimizer(config, params, total_steps=10)
    trainable = optim.trainable_mask(params, schedule)
    state = {"params": params, "opt": tx.init(params), "step": jnp.int32(0), "rng": jax.random.PRNGKey(1)}
    return state, model, tx, trainable, sched_fns[0]


def _host(tree):
    return {name: np.array(x) for name, x in tree_flatten_with_names(tree)}


def test_one_step_changes_trainable_leaves_only_and_reports_its_metrics():
    state, model, tx, trainable, sched = _state_and_pieces()
    before, rng_before = _host(state["params"]), np.array(state["rng"])
    fn = step_lib.jit_train_step(model, tx, trainable, step_lib.StepConfig(lr=0.01, eos_id=1), sched_fn=sched)
    new, metrics = fn(state, _batch())  # The state's buffers are donated: `before` holds host copies.
    after, mask = _host(new["params"]), dict(tree_flatten_with_names(trainable))
    trained = [n for n in after if mask[n]]
    frozen = [n for n in after if not mask[n]]
    assert trained and frozen and all(n.startswith("llm/layers/attn/") for n in trained)
    for n in frozen:
        assert after[n].dtype == before[n].dtype and after[n].tobytes() == before[n].tobytes(), n
    for n in trained:
        assert not np.array_equal(after[n], before[n]), n
    assert int(new["step"]) == 1 and not np.array_equal(np.array(new["rng"]), rng_before)

    metrics = jax.device_get(metrics)
    assert set(metrics) == {"train/loss", "train/grad_norm", "train/lr", "train/loss_tokens", "train/truncated"}
    assert 0 < metrics["train/loss"] < 20 and metrics["train/grad_norm"] > 0
    assert metrics["train/lr"] == pytest.approx(0.01)  # Cosine decay starts at the peak lr, 0.01.
    assert metrics["train/loss_tokens"] == pytest.approx((3 + 7 + 0 + 5) / 4)  # Counted from MASK_LOSS above.
    assert metrics["train/truncated"] == 2  # Rows 1 and 2.


def test_padding_rows_count_for_nothing():
    batch = {**_batch(), "_mask": jnp.array([True, False, False, True])}
    got = jax.device_get(step_lib.data_metrics(batch, eos_id=1))
    assert got["train/truncated"] == 0 and got["train/loss_tokens"] == pytest.approx((3 + 5) / 2)


@pytest.mark.slow  # fast: test_optim's accumulated gradients
def test_gradient_accumulation_gives_the_one_batch_update():
    """Two micro-batches of 2 give the update of the batch of 4 (plain SGD: the update is the gradient)."""
    results = {}
    for micro in (1, 2):
        state, model, tx, trainable, sched = _state_and_pieces("big_vision.sgd")
        state["step"] = jnp.int32(3)  # Any step: the batch's rng and schedule follow it.
        fn = step_lib.jit_train_step(model, tx, trainable, step_lib.StepConfig(micro_batches=micro, lr=0.01))
        new, metrics = fn(state, _batch())
        results[micro] = (_host(new["params"]), jax.device_get(metrics))
    (p1, m1), (p2, m2) = results[1], results[2]
    assert m2["train/loss"] == pytest.approx(m1["train/loss"], rel=1e-6)
    assert m2["train/grad_norm"] == pytest.approx(m1["train/grad_norm"], rel=1e-5)
    start = _host(_state_and_pieces("big_vision.sgd")[0]["params"])
    moved = [n for n in p1 if not np.array_equal(p1[n], start[n])]
    assert moved
    for n in p1:
        np.testing.assert_allclose(p2[n], p1[n], rtol=0, atol=1e-7, err_msg=n)
    # The accumulated update has the size of the one-batch update (not twice it, not half).
    size = lambda p: np.sqrt(sum(np.sum((p[n] - start[n]).astype(np.float64) ** 2) for n in moved))  # noqa: E731
    assert size(p2) == pytest.approx(size(p1), rel=1e-3) and size(p1) > 1e-4
