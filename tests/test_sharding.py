"""Mesh, regex sharding rules, batch sharding and sharded train steps on 8 simulated devices (conftest)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from paligemma_ft import sharding
from paligemma_ft.training import optim
from paligemma_ft.utils import tree_flatten_with_names


def _shapes(**named):
    """{"a/b": (shape, dtype)} -> nested dict of ShapeDtypeStructs."""
    tree = {}
    for name, (shape, dtype) in named.items():
        node = tree
        *parents, leaf = name.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = jax.ShapeDtypeStruct(shape, dtype)
    return tree


def _specs(shardings):
    return {name: s.spec for name, s in tree_flatten_with_names(shardings)}


def test_device_count():
    assert jax.device_count() == 8


# --- mesh -----------------------------------------------------------------------------------------------------


def test_make_mesh_shapes_and_errors():
    assert dict(sharding.make_mesh([("data", -1)]).shape) == {"data": 8}
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4} and mesh.axis_names == ("data", "fsdp")
    assert dict(sharding.make_mesh([("data", -1), ("model", 2)]).shape) == {"data": 4, "model": 2}
    assert dict(sharding.make_mesh([("data", -1)], devices=jax.devices()[:2]).shape) == {"data": 2}
    with pytest.raises(ValueError, match=r"needs 3 devices but there are 8"):
        sharding.make_mesh([("data", 3)])
    with pytest.raises(ValueError, match=r"8 devices"):
        sharding.make_mesh([("data", -1), ("model", 3)])
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh([("data", -1), ("model", -1)])


# --- rules ------------------------------------------------------------------------------------------------------


def test_fsdp_picks_largest_free_divisible_dim_and_replicates_small():
    mesh = sharding.make_mesh([("data", -1)])
    params = _shapes(
        a=((16, 64), jnp.float32),
        b=((64, 6), jnp.float32),
        c=((6, 10), jnp.float32),
        d=((8, 8, 16), jnp.float32),
        e=((16, 8, 8), jnp.float32),
    )
    specs = _specs(sharding.infer_sharding(params, [(".*", 'fsdp(axis="data", min_size_mb=0)')], mesh))
    assert specs == {
        "a": P(None, "data"),
        "b": P("data", None),
        "c": P(None, None),
        "d": P(None, None, "data"),
        "e": P("data", None, None),
    }
    # Default threshold 4 MiB (inclusive): 8 MiB is sharded, exactly 4 MiB and tiny tensors are not.
    big = _shapes(
        big=((1024, 2048), jnp.float32),
        edge=((1024, 1024), jnp.float32),
        edge16=((1024, 2048), jnp.float16),
        tiny=((16, 64), jnp.float32),
    )
    specs = _specs(sharding.infer_sharding(big, [(".*", 'fsdp(axis="data")')], mesh))
    assert specs == {"big": P(None, "data"), "edge": P(None, None), "edge16": P(None, None), "tiny": P(None, None)}
    # big_vision's keyword and a tuple of axes.
    mesh2 = sharding.make_mesh([("data", 2), ("fsdp", 4)])
    specs = _specs(
        sharding.infer_sharding(params, [(".*", 'fsdp(axis=("data", "fsdp"), min_size_to_shard_mb=0)')], mesh2)
    )
    assert specs["a"] == P(None, ("data", "fsdp"))


def test_shard_dim_chaining_and_first_match_wins():
    mesh = sharding.make_mesh([("data", 2), ("model", 4)])
    params = _shapes(
        img__head__kernel=((6, 8), jnp.float32), llm__w=((6, 8), jnp.float32), llm__v=((4, 6), jnp.float32)
    )
    strategy = [
        ("img/.*", "replicate"),
        ("llm/w", 'shard_dim(axis="model", dim=-1) | fsdp(axis="data", min_size_mb=0)'),
        (".*", 'shard_dim("model", 0)'),
    ]
    specs = _specs(sharding.infer_sharding(params, strategy, mesh))
    assert specs == {"img/head/kernel": P(None, None), "llm/w": P("data", "model"), "llm/v": P("model", None)}


def test_rule_errors_name_parameter_tactic_and_axis():
    mesh = sharding.make_mesh([("data", -1)])
    params = _shapes(img__x=((8, 8), jnp.float32), llm__y=((6, 5), jnp.float32))
    with pytest.raises(ValueError, match="llm/y"):
        sharding.infer_sharding(params, [("img/.*", "replicate")], mesh)
    with pytest.raises(ValueError, match="Unknown sharding tactic 'fdsp'"):
        sharding.infer_sharding(params, [(".*", 'fdsp(axis="data")')], mesh)
    with pytest.raises(ValueError, match="literals"):  # Parsed, never evaluated.
        sharding.parse_tactic('fsdp(axis=__import__("os").getcwd())')
    with pytest.raises(ValueError, match=r"name each argument \(no \*\*\)"):
        sharding.parse_tactic('fsdp(**{"axis": "data"})')
    with pytest.raises(ValueError, match="'model'"):
        sharding.infer_sharding(params, [(".*", 'shard_dim(axis="model", dim=0)')], mesh)
    with pytest.raises(ValueError, match="llm/y.*not divisible"):
        sharding.infer_sharding(params, [(".*", 'shard_dim(axis="data", dim=0)')], mesh)
    with pytest.raises(ValueError, match="only 2 dims"):
        sharding.infer_sharding(params, [(".*", 'shard_dim(axis="data", dim=2)')], mesh)


# --- batches and hosts ----------------------------------------------------------------------------------------------


def test_batch_sharding_and_divisibility():
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert sharding.batch_sharding(mesh, ("data",)).spec == P(("data",))
    mesh_tp = sharding.make_mesh([("data", 2), ("model", 4)])
    assert sharding.batch_sharding(mesh_tp).spec == P(("data",))
    sharding.check_batch_divisible(16, mesh)
    sharding.check_batch_divisible(6, mesh_tp)  # Only the data axis (2) splits the batch.
    with pytest.raises(ValueError, match=r"batch_size=12 .* 8 batch shards.*try 16"):
        sharding.check_batch_divisible(12, mesh)
    with pytest.raises(ValueError, match="not in the mesh"):
        sharding.batch_sharding(mesh, ("replica",))


def test_maybe_initialize_distributed(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    for var in (
        "JAX_COORDINATOR_ADDRESS",
        "BV_JAX_INIT",
        "SLURM_NTASKS",
        "SLURM_JOB_ID",
        "OMPI_MCA_orte_hnp_uri",
        "TPU_WORKER_HOSTNAMES",
        "MEGASCALE_COORDINATOR_ADDRESS",
    ):
        monkeypatch.delenv(var, raising=False)
    assert sharding.maybe_initialize_distributed({}) is False and not calls
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")  # A single TPU host: nothing to do.
    assert sharding.maybe_initialize_distributed({}) is False and not calls
    assert sharding.maybe_initialize_distributed({"distributed": True}) is True and len(calls) == 1
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert sharding.maybe_initialize_distributed({"distributed": False}) is False and len(calls) == 1
    assert sharding.maybe_initialize_distributed({}) is True and len(calls) == 2


# --- sharded train steps ---------------------------------------------------------------------------------------------


def _loss(params, batch):
    logits = batch["x"] @ params["dense"]["kernel"] + params["dense"]["bias"]
    return optim.softmax_xent(logits[:, None, :], batch["y"][:, None], jnp.ones_like(batch["y"])[:, None])


def _run(mesh_cfg, strategy, n_steps=3):
    """Adam steps on a linear classifier; returns losses and final params (as numpy)."""
    rng = np.random.default_rng(0)
    params = {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32), "bias": jnp.zeros((16,), jnp.float32)}
    }
    batches = [
        {
            "x": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
            "y": jnp.asarray(rng.integers(0, 16, size=(16,)), jnp.int32),
        }
        for _ in range(n_steps)
    ]
    config = dict(
        optax_name="scale_by_adam",
        lr=0.1,
        wd=0.01,
        grad_clip_norm=1.0,
        schedule=dict(decay_type="cosine", warmup_steps=1),
    )
    tx, _ = optim.make_optimizer(config, params, total_steps=n_steps)

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(_loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    if mesh_cfg is None:
        fn = jax.jit(step)
    else:
        mesh = sharding.make_mesh(mesh_cfg)
        p_sh = sharding.infer_sharding(params, strategy, mesh)
        o_sh = sharding.opt_state_sharding(jax.eval_shape(tx.init, params), params, strategy, mesh)
        b_sh = sharding.batch_sharding(mesh)
        params, opt_state = jax.device_put(params, p_sh), jax.device_put(opt_state, o_sh)
        batches = [jax.device_put(b, b_sh) for b in batches]
        rep = NamedSharding(mesh, P())
        fn = jax.jit(step, in_shardings=(p_sh, o_sh, b_sh), out_shardings=(p_sh, o_sh, rep), donate_argnums=(0, 1))
    losses = []
    for b in batches:
        params, opt_state, loss = fn(params, opt_state, b)
        losses.append(float(loss))
    if mesh_cfg is not None:
        assert _specs(jax.tree.map(lambda x: x.sharding, params)) == _specs(p_sh)
    return losses, jax.tree.map(np.asarray, params), params


def test_data_parallel_and_fsdp_steps_match_single_device():
    ref_losses, ref_params, _ = _run(None, None)
    dp_losses, dp_params, _ = _run([("data", -1)], [(".*", "replicate")])
    fsdp_losses, fsdp_params, placed = _run([("data", 2), ("fsdp", 4)], [(".*", 'fsdp(axis="fsdp", min_size_mb=0)')])
    assert placed["dense"]["kernel"].sharding.spec == P(None, "fsdp")  # Really sharded, not replicated.
    assert ref_losses[0] != ref_losses[-1]  # Training moved the parameters.
    np.testing.assert_allclose(dp_losses, ref_losses, rtol=1e-6)
    np.testing.assert_allclose(fsdp_losses, ref_losses, rtol=1e-6)
    for a, b, c in zip(jax.tree.leaves(ref_params), jax.tree.leaves(dp_params), jax.tree.leaves(fsdp_params)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(c, a, rtol=1e-6, atol=1e-7)


def test_opt_state_follows_param_sharding():
    mesh = sharding.make_mesh([("data", -1)])
    params = {
        "llm": {"w": jax.ShapeDtypeStruct((16, 64), jnp.float32)},
        "img": {"k": jax.ShapeDtypeStruct((8, 8), jnp.float32)},
    }
    strategy = [("llm/.*", 'fsdp(axis="data", min_size_mb=0)'), (".*", "replicate")]
    tx, _ = optim.make_optimizer(
        dict(optax_name="adafactor", optax=dict(min_dim_size_to_factor=8), schedule=[("llm/.*", {}), (".*", None)]),
        params,
        total_steps=4,
    )
    shardings = sharding.opt_state_sharding(jax.eval_shape(tx.init, params), params, strategy, mesh)
    specs = _specs(shardings)
    # Momentum mirrors the parameter; factored rows/columns get the same tactic on their own shapes.
    assert specs["1/inner_state/2/ema/llm/w"] == P(None, "data")
    assert specs["1/inner_state/0/v_row/llm/w"] == P("data") and specs["1/inner_state/0/v_col/llm/w"] == P("data")
    assert specs["1/inner_state/0/v/llm/w"] == P(None)  # A (1,) placeholder: nothing divisible.
    assert all(spec == P() for n, spec in specs.items() if "count" in n)
    assert not any("img/k" in n for n in specs)  # Frozen: no state to place.
