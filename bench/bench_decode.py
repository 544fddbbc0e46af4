"""Decode throughput: tokens/s and images/s for greedy decoding with the KV cache, optionally vs HF `generate`.

    python bench/bench_decode.py --preset demo --batch 1 8 --cpu        # CPU, the builtin:demo architecture
    python bench/bench_decode.py --preset pg2_3b_224 --batch 1 64 --hf  # GPU, full size, random bf16 weights

Random weights: every row decodes exactly `--len` tokens (EOS disabled), so the numbers measure the loop, not
what the model says. Appends a table to bench/RESULTS.md with the device named.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

# Allocate GPU memory on demand rather than 75 % up front: PyTorch (--hf) needs its share, and the device's
# peak-memory figure then means what decoding used.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from paligemma_ft import decode as dec  # noqa: E402
from paligemma_ft.model import Model, get_preset  # noqa: E402


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return names[0] if names else platform.processor()
    except OSError:
        return platform.processor()


def _device_name() -> str:
    d = jax.devices()[0]
    name = f"{d.platform}:{getattr(d, 'device_kind', '?')} x{jax.device_count()} ({platform.node()})"
    if d.platform == "cpu":  # Name the machine: CPU timings mean little without the cores behind them.
        name += f", {len(os.sched_getaffinity(0))} usable cores, {_cpu_model()}"
    return name


def _random_params(model, res, dtype):
    init = jax.jit(
        lambda k: jax.tree.map(
            lambda p: p.astype(dtype),
            model.init(k, jnp.zeros((1, res, res, 3)), jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4), jnp.int32))[
                "params"
            ],
        )
    )
    params = init(jax.random.PRNGKey(0))
    # Zero-initialized leaves (ViT head, norms) would make every image identical: perturb them.
    return jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.PRNGKey(1), p.shape, p.dtype), params)


def _batch(b, res, prompt_len=8):
    text = np.zeros((b, prompt_len), np.int32)
    text[:, 0] = 2
    text[:, 1:4] = [100, 200, 300]
    mask_input = (np.arange(prompt_len)[None] < 4).astype(np.int32).repeat(b, 0)
    return dict(
        image=np.random.default_rng(0).uniform(-1, 1, (b, res, res, 3)).astype(np.float32),
        text=text,
        mask_ar=1 - mask_input,
        mask_input=mask_input,
        _mask=np.ones(b, bool),
    )


def bench_jax(model, params, res, b, n_tokens, reps):
    batch = _batch(b, res)
    t0 = time.perf_counter()
    jax.block_until_ready(dec.decode(model, params, batch, max_decode_len=n_tokens, eos_token=-1))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(dec.decode(model, params, batch, max_decode_len=n_tokens, eos_token=-1))
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    return dict(tokens_per_s=b * n_tokens / t, images_per_s=b / t, seconds=t, first_call_s=compile_s)


def bench_hf(params, cfg, res, b, n_tokens, reps):
    import torch

    from paligemma_ft.checkpoints import hf

    host = jax.tree.map(lambda p: np.asarray(p.astype(jnp.float32)), params)
    m = hf.to_hf_model(host, cfg, image_size=res).to("cuda", torch.bfloat16).eval()
    del host
    n_img = (res // 14) ** 2
    image_id = cfg["llm"]["vocab_size"]
    ids = torch.tensor([[image_id] * n_img + [2, 100, 200, 300]] * b, device="cuda")
    pix = torch.rand((b, 3, res, res), device="cuda", dtype=torch.bfloat16) * 2 - 1
    kw = dict(
        input_ids=ids,
        pixel_values=pix,
        attention_mask=torch.ones_like(ids),
        token_type_ids=torch.zeros_like(ids),
        max_new_tokens=n_tokens,
        min_new_tokens=n_tokens,
        do_sample=False,
    )
    with torch.no_grad():
        m.generate(**kw)
        times = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            m.generate(**kw)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    return dict(tokens_per_s=b * n_tokens / t, images_per_s=b / t, seconds=t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny_pg1")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--len", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--hf", action="store_true", help="also time transformers generate (needs CUDA torch)")
    ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even where an accelerator is present")
    args = ap.parse_args()
    if args.cpu:
        jax.config.update("jax_platforms", "cpu")  # Before the first device query initializes the backends.
    cfg, res = get_preset(args.preset)
    model = Model(**cfg)
    params = _random_params(model, res, jnp.dtype(args.dtype))
    rows = []
    for b in args.batch:
        r = bench_jax(model, params, res, b, args.len, args.reps)
        row = (
            f"| {args.preset} | {b} | {args.len} | {r['tokens_per_s']:.1f} | {r['images_per_s']:.2f} "
            f"| {r['first_call_s']:.1f} |"
        )
        if args.hf:
            h = bench_hf(params, cfg, res, b, args.len, args.reps)
            row += f" {h['tokens_per_s']:.1f} | {r['tokens_per_s'] / h['tokens_per_s']:.2f}x |"
        print(row, flush=True)
        rows.append(row)
    head = "| model | batch | tokens | tokens/s | images/s | first call (compile) s |"
    sep = "|---|---|---|---|---|---|"
    if args.hf:
        head += " HF generate tokens/s | ratio |"
        sep += "---|---|"
    text = (
        f"\n## Decode throughput ({datetime.date.today()}, `python bench/bench_decode.py "
        f"{' '.join(sys.argv[1:])}`)\n\nDevice: {_device_name()}; params {args.dtype}, random weights, greedy, "
        f"KV cache bf16, EOS disabled.\n\n{head}\n{sep}\n" + "\n".join(rows) + "\n"
    )
    print(text)
    with open(args.results, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
