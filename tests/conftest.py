"""Test setup: 8 simulated CPU devices (must be set before jax is imported), float32 matmuls, fast compiles.

The suite is dominated by XLA compile time on CPU, so LLVM's optimization level is lowered and its expensive passes
are off (compiles ~2.5x faster). Results stay float32-exact where tests compare two computations, since both run
under the same flags; benchmarks never run with these flags.
"""

import os

FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import ml_collections  # noqa: E402
import pytest  # noqa: E402

TINY_DATA = dict(source="shapes", n=64, seed=0, task="caption", image_size=32)


@pytest.fixture
def tiny_config():
    """A factory of tiny random-init runs of the demo config: tiny_pg1 at 32 px, text length 16, batch 8, 4 steps
    with a checkpoint every 2, one caption evaluator on 10 scenes; keyword arguments override top-level keys."""
    from paligemma_ft.config import load_config  # noqa: PLC0415 - after the device flags above.

    def make(**overrides):
        c = load_config("configs/demo.py")
        c.unlock()
        c.model_name_or_preset, c.model_init = "tiny_pg1", ""
        c.input.data = dict(TINY_DATA)
        c.input.res, c.input.text_len, c.input.batch_size = 32, 16, 8
        c.input.prefix = "caption en"
        c.total_steps, c.ckpt_steps, c.quiet = 4, 2, True
        c.evals = dict(
            val=dict(type="caption", batch_size=8, max_decode_len=6, bootstrap=0, data=dict(TINY_DATA, n=10, offset=64))
        )
        plain = c.to_dict()
        plain.update(overrides)  # As a dict: an override may change a field's type (a schedule list for a dict).
        return ml_collections.ConfigDict(plain)

    return make


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A fresh kagglehub cache (its path is the value), no Kaggle credentials from this machine, and no network:
    any connection attempt fails the test. Modules use it for every test with `pytest.mark.usefixtures`."""
    import socket  # noqa: PLC0415

    import kagglehub.config  # noqa: PLC0415

    from paligemma_ft.checkpoints import kaggle  # noqa: PLC0415 - after the device flags above.

    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle_config"))
    for name in (
        "KAGGLE_API_TOKEN",
        "KAGGLE_USERNAME",
        "KAGGLE_KEY",
        "KAGGLE_KERNEL_RUN_TYPE",
        "KAGGLE_DATA_PROXY_URL",
        "TBE_RUNTIME_ADDR",
        "KAGGLE_API_ENVIRONMENT",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(kagglehub.config, "_kaggle_credentials", None)
    monkeypatch.setattr(kaggle, "_RESOLVED", {})
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network blocked in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield tmp_path / "cache"
    assert not attempts, f"a test tried to reach the network: {attempts}"


@pytest.fixture
def traced_train_flops():
    """`fn(model_cfg, res, text_len, loss_tokens, trainable, batch_size=2, lora=None)`: the matmul FLOPs per
    example in the jaxpr of the loss gradient w.r.t. the trainable leaves only (`flops.jaxpr_matmul_flops`), remat
    off; `lora` is a `LoraSpec` for a model with adapters. An
    independent count for `paligemma_ft.flops`: only traced, on abstract shapes, so a 3B model costs no memory."""
    import copy  # noqa: PLC0415

    import jax.numpy as jnp  # noqa: PLC0415

    from paligemma_ft import flops  # noqa: PLC0415 - after the device flags above.
    from paligemma_ft.model import Model  # noqa: PLC0415
    from paligemma_ft.training import optim  # noqa: PLC0415
    from paligemma_ft.utils import recover_tree, tree_flatten_with_names  # noqa: PLC0415

    def traced(model_cfg, res, text_len, loss_tokens, trainable, batch_size=2, lora=None):
        cfg = copy.deepcopy(dict(model_cfg))
        for tower in ("img", "llm"):
            cfg[tower] = dict(cfg[tower], remat_policy="none")  # Recomputation is not useful work.
        model = Model(**cfg, lora=lora)
        z = jnp.zeros((1, text_len), jnp.int32)
        shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)), z, z)["params"]
        flat = tree_flatten_with_names(shapes)
        names = [n for n, _ in flat]
        is_trainable = flops.as_predicate(trainable)
        tr = {n: s for n, s in flat if is_trainable(n)}
        frozen = {n: s for n, s in flat if not is_trainable(n)}
        batch = dict(
            image=jax.ShapeDtypeStruct((batch_size, res, res, 3), jnp.float32),
            text=jax.ShapeDtypeStruct((batch_size, text_len), jnp.int32),
            mask_ar=jax.ShapeDtypeStruct((batch_size, text_len), jnp.int32),
            labels=jax.ShapeDtypeStruct((batch_size, text_len), jnp.int32),
        )

        def loss(tr, frozen, batch):
            merged = frozen | tr
            params = recover_tree(names, [merged[n] for n in names])
            pre, _ = model.apply(
                {"params": params}, batch["image"], batch["text"], batch["mask_ar"], method=model.prelogits
            )
            logits = model.apply({"params": params}, pre[:, -loss_tokens:], method=model.compute_logits)
            return optim.softmax_xent(logits, batch["labels"][:, -loss_tokens:], jnp.ones(logits.shape[:2]))

        fn = jax.grad(loss) if tr else loss  # Gradients w.r.t. the trainable leaves (argument 0) only.
        return flops.jaxpr_matmul_flops(jax.make_jaxpr(fn)(tr, frozen, batch)) / batch_size

    return traced


@pytest.fixture
def fake_plan():
    """`fn(**fields)`: a `plan.Plan` of 4 devices, 52 GiB peak against a 40 GiB limit, with `fields` replaced."""
    from paligemma_ft.commands import plan  # noqa: PLC0415 - after the device flags above.

    def make(**kw):
        base = dict(
            device_kind="test",
            devices=4,
            mesh={"data": 4},
            batch_size=32,
            per_device_batch=8,
            micro_batches=1,
            res=224,
            text_len=32,
            params=1000,
            trainable=1000,
            param_bytes=4 * plan.GiB,
            opt_bytes=8 * plan.GiB,
            batch_bytes=0,
            temp_bytes=40 * plan.GiB,
            peak_bytes=52 * plan.GiB,
            source="test",
            compile_seconds=None,
            memory_limit=40 * plan.GiB,
            memory_source="test",
            flops_per_example=1.0,
            remat={"img": "full", "llm": "full"},
        )
        return plan.Plan(**{**base, **kw})

    return make
