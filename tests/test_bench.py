"""The benchmarks measure the trainer's computation: bench/bench_train.py jits the trainer's own step."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp

from paligemma_ft.training import step as step_lib

_PATH = pathlib.Path(__file__).parent.parent / "bench" / "bench_train.py"
_spec = importlib.util.spec_from_file_location("bench_train", _PATH)
bench_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_train)


def _compiled_step_flops(pattern: str) -> tuple[float, float]:
    """(XLA's FLOP count of the trainer's compiled step per example, our useful count) for a trainable regex."""
    cfg, res = bench_train.model_config("tiny_pg1", "float32", None, "einsum", scan=False)  # Exact XLA counts.
    model = bench_train.Model(**cfg)
    z = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)), z, z)["params"]
    schedule = [(pattern, {"decay_type": "constant"}), (".*", None)]
    tx, _ = bench_train.optim.make_optimizer(dict(schedule=schedule), shapes, total_steps=10)
    trainable = bench_train.optim.trainable_mask(shapes, schedule)
    state = {
        "params": shapes,
        "opt": jax.eval_shape(tx.init, shapes),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
    }
    batch = bench_train.make_batch(4, res, 8, 5, 1600)
    step = step_lib.jit_train_step(model, tx, trainable)
    compiled = step.lower(state, batch).compile(compiler_options={"xla_backend_optimization_level": 0})
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"] / 4, bench_train.flops.train_flops_per_example(cfg, res, 8, 5, pattern)


def test_compiled_step_skips_the_backward_of_a_frozen_tower():
    """Freezing the ViT removes its backward pass from the compiled step: training one more ViT weight at the
    bottom (the patchify kernel) adds about the ViT's whole backward, as the accounting says."""
    frozen_vit, counted_frozen = _compiled_step_flops("llm/.*")
    with_patch, counted_patch = _compiled_step_flops("llm/.*|img/embedding/kernel")
    vit_backward = counted_patch - counted_frozen
    assert vit_backward > 0.02 * counted_frozen  # Large enough to see.
    # XLA also counts elementwise FLOPs (and the rematerialized logits), hence the wide bounds.
    assert 0.8 * vit_backward < with_patch - frozen_vit < 1.5 * vit_backward


def test_bench_loop_times_the_trainer_and_appends_a_row(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_loop", _PATH.with_name("bench_loop.py"))
    bench_loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_loop)
    results = tmp_path / "RESULTS.md"
    bench_loop.main(["--steps", "12", "--warmup", "2", "--repeats", "1", "--label", "x", "--results", str(results)])
    row = results.read_text().strip().split(" | ")
    assert row[0] == "| x" and row[2] == "tiny_pg1, 32 px, batch 8, text 16" and float(row[3]) > 0
