"""The benchmarks measure the trainer's computation: bench/bench_train.py jits the trainer's own step."""

import importlib.util
import pathlib
import re
import shlex

import jax
import jax.numpy as jnp
import pytest

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


@pytest.mark.slow  # fast: test_compiled_step_skips_the_backward_of_a_frozen_tower
def test_bench_loop_times_the_trainer_and_appends_a_row(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_loop", _PATH.with_name("bench_loop.py"))
    bench_loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_loop)
    results = tmp_path / "RESULTS.md"
    bench_loop.main(["--steps", "12", "--warmup", "2", "--repeats", "1", "--label", "x", "--results", str(results)])
    row = results.read_text().strip().split(" | ")
    assert row[0] == "| x" and row[2] == "tiny_pg1, 32 px, batch 8, text 16" and float(row[3]) > 0


# --- The documented GPU commands, smoke-tested on CPU --------------------------------------------------------------

_BENCH = pathlib.Path(__file__).parent.parent / "bench"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, _BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def documented_gpu_commands() -> list[list[str]]:
    """The commands of the bash block under "## GPU commands" in bench/RESULTS.md, as argv lists."""
    text = (_BENCH / "RESULTS.md").read_text()
    section = text.split("\n## GPU commands", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [shlex.split(line.removeprefix("PYTHONPATH=. ")) for line in lines]


_TINY = {"pg1": "tiny_pg1", "pg2": "tiny_pg2"}
_SMALL = {"--batch": lambda v: str(min(int(v), 2)), "--text-len": lambda v: "8", "--len": lambda v: "3"}
_EXTRA = {
    "bench_train": ["--steps", "1"],
    "bench_decode": ["--reps", "1", "--cpu"],
    "bench_compile": [],
}


def smoke_argv(argv: list[str]) -> tuple[str, list[str]]:
    """(script, its arguments) shrunk to the tiny preset: `pg2_*` -> tiny_pg2, `pg1_*` -> tiny_pg1, batch <= 2, a
    few tokens, one step or repetition, no results file. Every option and value the document gives is kept."""
    assert argv[0] == "python" and argv[1].startswith("bench/"), argv
    script = pathlib.Path(argv[1]).stem
    out, option = [], None
    for arg in argv[2:]:
        if arg.startswith("--"):
            option = arg
        elif option == "--preset":
            arg = _TINY.get(arg.split("_")[0], arg)
        elif option in _SMALL:
            arg = _SMALL[option](arg)
        out.append(arg)
    return script, [*out, *_EXTRA[script], "--results", ""]


def test_documented_gpu_commands_are_found():
    commands = documented_gpu_commands()
    scripts = {smoke_argv(c)[0] for c in commands}
    assert scripts == {"bench_train", "bench_decode", "bench_compile"} and len(commands) >= 5
    assert all("pg2_3b_224" in c for c in commands)  # The model.
    assert smoke_argv(["python", "bench/bench_decode.py", "--preset", "pg2_3b_224", "--batch", "1", "64"])[1][:5] == [
        "--preset",
        "tiny_pg2",
        "--batch",
        "1",
        "2",
    ]


def _count(argv: list[str], option: str) -> int:
    """How many values `option` has in argv (1 when absent: the script's single default)."""
    if option not in argv:
        return 1
    i = argv.index(option) + 1
    n = 0
    while i + n < len(argv) and not argv[i + n].startswith("--"):
        n += 1
    return n


@pytest.mark.slow
@pytest.mark.parametrize("command", documented_gpu_commands(), ids=lambda c: " ".join(c[1:]))
def test_documented_gpu_command_runs_on_cpu(command):
    script, argv = smoke_argv(command)
    rows = _load(script).main(argv)
    if script == "bench_train":
        expected = 1
        for option in ("--recipes", "--remat", "--attn", "--loss"):
            expected *= _count(argv, option) if option in argv else (2 if option == "--recipes" else 1)
    elif script == "bench_decode":
        expected = _count(argv, "--batch")
    else:
        expected = _count(argv, "--scan")
    assert len(rows) == expected, rows
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert "OOM" not in cells and "nan" not in row, row
        numbers = [float(c.rstrip("x")) for c in cells if re.fullmatch(r"[\d.]+x?", c)]
        assert numbers and all(x > 0 for x in numbers), row
