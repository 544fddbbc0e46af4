"""Decoding in the stored dtype: bfloat16 weights stay bfloat16 inside the token loop; predict loads as stored."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paligemma_ft import decode as dec
from paligemma_ft import hlo
from paligemma_ft import predictor as predictor_lib
from paligemma_ft.checkpoints import npz as ckpt_lib
from paligemma_ft.commands import cli
from paligemma_ft.model import Model, get_preset, precision

# XLA:CPU's `float-normalization-bf16` pass rewrites every bfloat16 op it has no bfloat16 kernel for (slicing a
# scanned weight included) into float32 and then hoists those converts out of the loops: a CPU artefact that GPUs
# and TPUs, which run bfloat16 natively, never see. Turning that one pass off shows the program as the
# accelerator compilers get it (and it still runs on CPU; the test checks it decodes the same tokens).
NO_CPU_BF16_NORMALIZATION = {"xla_disable_hlo_passes": "float-normalization-bf16"}
B, PROMPT, STEPS = 5, 7, 6


def _model(compute):
    cfg, res = get_preset("tiny_pg2")
    # Sizes unlike any activation's, so that a weight's shape in the HLO means that weight.
    cfg["llm"].update(width=48, mlp_dim=80, num_heads=3, num_kv_heads=1, head_dim=8, depth=3)
    cfg["img"]["dtype_mm"] = "float32"  # XLA:CPU has no bfloat16 convolution without the pass above.
    return Model(**precision.apply_compute_dtype(cfg, compute)), res


def _inputs(model, res):
    z = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)), z, z)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.bfloat16), shapes)
    text = rng.integers(3, 1600, (B, PROMPT)).astype(np.int32)
    mask_input = (np.arange(PROMPT)[None] < np.array([[7], [5], [3], [6], [4]])).astype(np.int32)
    batch = dict(
        image=jnp.asarray(rng.uniform(-1, 1, (B, res, res, 3)), jnp.float32),
        text=jnp.asarray(text),
        mask_ar=jnp.zeros((B, PROMPT), jnp.int32),
        mask_input=jnp.asarray(mask_input),
    )
    return params, batch


def _token_loop(compiled_text):
    """The decode loop: the outermost while loop that runs the layers' scan inside it."""
    loops = [loop for loop in hlo.while_loops(compiled_text) if loop.nested_loops]
    assert loops, "no while loop with a nested loop in the decode program"
    return max(loops, key=lambda loop: (loop.nested_loops, len(loop.arrays)))


def _compile(model, params, batch, options):
    fn = dec._get_fn(dec._with_cache_dtype(model, "bfloat16"), STEPS, dec.parse_sampler("greedy"), -1)  # noqa: SLF001
    return fn.lower(params, batch, jax.random.PRNGKey(0)).compile(compiler_options=options)


def test_token_loop_reads_bfloat16_weights_and_only_the_logits_are_float32():
    model, res = _model("bfloat16")
    params, batch = _inputs(model, res)
    compiled = _compile(model, params, batch, NO_CPU_BF16_NORMALIZATION)
    loop = _token_loop(compiled.as_text())
    weights = hlo.llm_weight_shapes(params)
    vocab = params["llm"]["embedder"]["input_embedding"].shape[0]
    f32_weights = [a for a in loop.arrays if a.dtype == "f32" and a.shape in weights]
    assert not f32_weights, f32_weights
    # The check sees the weights: bfloat16 arrays of their shapes are read inside the loop ...
    assert {a.shape for a in loop.arrays if a.dtype == "bf16"} & weights
    # ... and the only float32 arrays with a vocabulary axis are the sampled position's logits.
    f32_vocab = {a.shape for a in loop.arrays if a.dtype == "f32" and vocab in a.shape}
    assert f32_vocab and all(np.prod(s) == B * vocab for s in f32_vocab), f32_vocab
    # The program means the same with XLA:CPU's own bfloat16 handling: same tokens.
    tokens, _ = compiled(params, batch, jax.random.PRNGKey(0))
    default, _ = _compile(model, params, batch, None)(params, batch, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(default))


def test_float32_activations_make_float32_weight_copies_in_the_loop():
    """The check can fail: bfloat16 weights with float32 activations (the old predictor) upcast them."""
    model, res = _model("float32")
    params, batch = _inputs(model, res)
    loop = _token_loop(_compile(model, params, batch, NO_CPU_BF16_NORMALIZATION).as_text())
    assert [a for a in loop.arrays if a.dtype == "f32" and a.shape in hlo.llm_weight_shapes(params)]


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """The demo model saved as a `.bf16.npz` (as the released bfloat16 checkpoints are stored)."""
    params = ckpt_lib.load_params(predictor_lib.resolve_checkpoint("builtin:demo"))
    path = tmp_path_factory.mktemp("ckpt") / "demo.bf16.npz"
    ckpt_lib.save_params(path, jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params))
    return str(path)


@pytest.mark.slow  # fast: the bfloat16 token loop test
def test_predictor_keeps_the_stored_dtype_unless_told(bf16_checkpoint):
    stored = predictor_lib.load_predictor(bf16_checkpoint, "builtin:tiny", preset="demo")
    assert {x.dtype for x in jax.tree.leaves(stored.params)} == {jnp.dtype(jnp.bfloat16)}
    assert stored.model.llm.get("embed_dtype", "float32") == "float32"  # CPU: computes in float32.
    as_f32 = predictor_lib.load_predictor(bf16_checkpoint, "builtin:tiny", preset="demo", dtype="float32")
    assert {x.dtype for x in jax.tree.leaves(as_f32.params)} == {jnp.dtype(jnp.float32)}
    as_bf16 = predictor_lib.load_predictor(bf16_checkpoint, "builtin:tiny", preset="demo", dtype="bfloat16")
    assert as_bf16.model.llm["embed_dtype"] == as_bf16.model.img["dtype_mm"] == "bfloat16"
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3)).astype(np.uint8)
    assert stored.predict_images([image], "caption en", max_decode_len=4)
    assert as_bf16.predict_images([image], "caption en", max_decode_len=4)
    # Stored bfloat16 weights computed in float32 are the float32-cast weights, except the embedding's sqrt(width)
    # factor, rounded to the table's dtype as big_vision does with bfloat16 parameters.
    batch = stored.prompt_batch([image], "caption en")
    logits = [
        p.model.apply({"params": p.params}, jnp.asarray(batch["image"]), batch["text"], batch["mask_ar"])[0]
        for p in (stored, as_f32)
    ]
    assert logits[0].dtype == jnp.float32
    scale = float(jnp.abs(logits[1]).max())
    np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(logits[1]), atol=0.02 * scale)
    with pytest.raises(ValueError, match="--dtype='float16' is not supported"):
        predictor_lib.load_predictor(bf16_checkpoint, "builtin:tiny", preset="demo", dtype="float16")


def test_predict_command_takes_dtype(bf16_checkpoint, tmp_path, capsys):
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(image)
    argv = ["predict", "--checkpoint", bf16_checkpoint, "--tokenizer", "builtin:tiny", "--preset", "demo"]
    argv += ["--image", str(image), "--prompt", "caption en", "--max-decode-len", "3", "--dtype", "bfloat16"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.startswith(f"{image}\t")
