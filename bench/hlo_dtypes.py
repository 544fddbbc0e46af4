"""CPU/HLO evidence for the bfloat16 levers: what the compiled programs hold, float32 vs bfloat16 compute.

    python bench/hlo_dtypes.py                          # tiny_pg2: seconds
    python bench/hlo_dtypes.py --preset pg2_3b_224      # the real sizes: minutes of XLA:CPU compile, no weights

Compiles (from abstract shapes: nothing is allocated) and reads the optimized HLO with `paligemma_ft.hlo`:

* training, the colab recipe (attention weights trained, float32 masters; everything else frozen in float16): the
  arrays of the embedding table's shape [V, D] that the value-and-grad program materializes, by dtype, and XLA's
  temporaries;
* decoding, bfloat16 weights (as `predict` now keeps them): the float32 arrays with an LLM weight's shape inside the
  token loop, and the loop's bytes by dtype. XLA:CPU's `float-normalization-bf16` pass (which upcasts bfloat16 ops it
  has no CPU kernel for and hoists the converts; GPUs and TPUs run them in bfloat16) is turned off for this, as in
  tests/test_decode_dtype.py; the image tower computes in float32 there (no bfloat16 convolution on XLA:CPU
  without that pass).

Appends a table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from paligemma_ft import decode as dec  # noqa: E402
from paligemma_ft import hlo  # noqa: E402
from paligemma_ft.model import Model, get_preset, precision  # noqa: E402
from paligemma_ft.training import losses, optim  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "RESULTS.md")
NO_CPU_BF16_NORMALIZATION = {"xla_disable_hlo_passes": "float-normalization-bf16"}
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}


def _shapes(cfg, res, text_len):
    model = Model(**cfg)
    z = jnp.zeros((1, text_len), jnp.int32)
    return model, jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)), z, z)["params"]


def training(preset: str, compute: str, batch: int, text_len: int) -> dict:
    cfg, res = get_preset(preset)
    model, shapes = _shapes(precision.apply_compute_dtype(cfg, compute), res, text_len)
    schedule = [("llm/layers/attn/.*", {}), (".*", None)]
    mask = optim.trainable_mask(shapes, schedule)
    params = jax.tree.map(lambda s, t: jax.ShapeDtypeStruct(s.shape, jnp.float32 if t else jnp.float16), shapes, mask)
    tok = jax.ShapeDtypeStruct((batch, text_len + 1), jnp.int32)
    data = dict(image=jax.ShapeDtypeStruct((batch, res, res, 3), jnp.float32), text=tok, mask_ar=tok, mask_loss=tok)

    def step(params, data):
        loss, grads = jax.value_and_grad(functools.partial(losses.loss_fn, model=model))(
            params, data, jax.random.PRNGKey(0)
        )
        return loss, jax.tree.map(lambda g, t: g if t else None, grads, mask)

    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(params, data).compile()
    seconds = time.perf_counter() - t0
    table = tuple(params["llm"]["embedder"]["input_embedding"].shape)
    arrays = [a for a in hlo.materialized(compiled.as_text()) if sorted(a.shape) == sorted(table)]
    by_dtype: dict[str, int] = {}
    for a in arrays:
        by_dtype[a.dtype] = by_dtype.get(a.dtype, 0) + 1
    return dict(table=table, by_dtype=by_dtype, temp=compiled.memory_analysis().temp_size_in_bytes, seconds=seconds)


def decoding(preset: str, compute: str, batch: int, steps: int) -> dict:
    cfg, res = get_preset(preset)
    cfg["img"]["dtype_mm"] = "float32"
    model, shapes = _shapes(precision.apply_compute_dtype(cfg, compute), res, 8)
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), shapes)
    tok = jax.ShapeDtypeStruct((batch, 8), jnp.int32)
    data = dict(image=jax.ShapeDtypeStruct((batch, res, res, 3), jnp.float32), text=tok, mask_ar=tok, mask_input=tok)
    fn = dec._get_fn(dec._with_cache_dtype(model, "bfloat16"), steps, dec.parse_sampler("greedy"), -1)  # noqa: SLF001
    t0 = time.perf_counter()
    compiled = fn.lower(params, data, jax.random.PRNGKey(0)).compile(compiler_options=NO_CPU_BF16_NORMALIZATION)
    seconds = time.perf_counter() - t0
    weights = hlo.llm_weight_shapes(params)
    loops = [loop for loop in hlo.while_loops(compiled.as_text()) if loop.nested_loops]
    loop = max(loops, key=lambda lp: (lp.nested_loops, len(lp.arrays)))
    f32_weights = [a for a in loop.arrays if a.dtype == "f32" and a.shape in weights]
    f32_weight_bytes = sum(math.prod(a.shape) * 4 for a in {(a.name, a.shape): a for a in f32_weights}.values())
    bf16_weights = {a.shape for a in loop.arrays if a.dtype == "bf16" and a.shape in weights}
    return dict(
        f32_weights=len(f32_weights), f32_weight_bytes=f32_weight_bytes, bf16_weights=len(bf16_weights), seconds=seconds
    )


def main(argv=None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny_pg2")
    ap.add_argument("--batch", type=int, default=3)  # 3 x 20 loss positions: no chunk shaped like the table.
    ap.add_argument("--text-len", type=int, default=20)
    ap.add_argument("--results", default=RESULTS, help="Markdown file to append to ('' for none)")
    args = ap.parse_args(argv)
    rows = []
    for compute in ("float32", "bfloat16"):
        t = training(args.preset, compute, args.batch, args.text_len)
        d = decoding(args.preset, compute, args.batch, 4)
        tables = ", ".join(f"{k} x{v}" for k, v in sorted(t["by_dtype"].items())) or "none"
        rows.append(
            f"| {compute} | {tables} | {t['temp'] / 2**20:.1f} | {d['f32_weights']} "
            f"({d['f32_weight_bytes'] / 2**20:.1f} MiB) | {d['bf16_weights']} |"
        )
        print(rows[-1], f"(compiled in {t['seconds']:.0f} + {d['seconds']:.0f} s)", flush=True)
    table = t["table"]
    head = (
        f"| compute | training: instructions materializing the table's shape {list(table)}, by dtype (table frozen "
        "in f16) | training temporaries MiB | decoding: f32 instructions of an LLM weight's shape in the token loop "
        "(distinct bytes) | bf16 weight shapes read in the loop |"
    )
    text = (
        f"\n## HLO dtype audit ({datetime.date.today()}, `"
        + " ".join(["python bench/hlo_dtypes.py", *(sys.argv[1:] if argv is None else argv)])
        + "`)\n\nXLA:CPU, compiled from abstract shapes (jax "
        f"{jax.__version__}); {args.preset}, batch {args.batch}, text {args.text_len}; training: the colab recipe "
        "(attention trained with float32 masters, the rest frozen in float16), value and gradients; decoding: "
        "bfloat16 weights, greedy, 4 tokens, `float-normalization-bf16` off (see the script's docstring).\n\n"
        f"{head}\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write(text)
    return rows


if __name__ == "__main__":
    main()
