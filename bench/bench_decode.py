"""Decode throughput: tokens/s against the memory-bandwidth roofline, optionally vs HF `generate`.

    python bench/bench_decode.py --preset demo --batch 1 8 --cpu        # CPU, the builtin:demo architecture
    python bench/bench_decode.py --preset pg2_3b_224 --batch 1 64 --hf  # GPU, full size, random bf16 weights

Random weights stored in `--dtype` (bfloat16 by default, as the released checkpoints and as `predict` keeps
them), computed in the compute dtype (`--compute-dtype`, default bfloat16 on GPU/TPU, float32 on CPU), bfloat16
KV cache, greedy; every row decodes exactly `--len` tokens (EOS disabled), so the numbers measure the loop, not
what the model says.

Columns: end to end (prefill included) tokens/s and images/s; the decode step alone (tokens after the first:
(time for `--len` tokens - time for 1 token) / (len - 1), which leaves the ViT and the prefill out); the
roofline, the tokens/s that reading every LLM weight and the KV cache once per step allows at the chip's peak
bandwidth (`paligemma_ft.flops.decode_bandwidth_limit`, mean context over the decode), and the decode step's
share of it. HF: `transformers` generate on the same weights in the torch dtype of `--dtype`, its default
attention for Gemma 2 (eager) and SDPA for Gemma 1. Appends a table to bench/RESULTS.md with the device named.
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
sys.path.insert(0, os.path.dirname(__file__))
import bench_train  # noqa: E402 - shares the HF attention choice and the OOM test.

from paligemma_ft import decode as dec  # noqa: E402
from paligemma_ft import flops  # noqa: E402
from paligemma_ft.model import Model, get_preset, precision  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "RESULTS.md")


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


def _timed(fn, reps):
    """(first call seconds, median of `reps` further calls)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times))


def bench_jax(model, params, res, b, n_tokens, reps, prompt_len=8):
    batch = _batch(b, res, prompt_len)
    run = lambda n: lambda: dec.decode(model, params, batch, max_decode_len=n, eos_token=-1)  # noqa: E731
    first, t = _timed(run(n_tokens), reps)
    _, t1 = _timed(run(1), reps)  # Prefill (ViT included) and one token.
    step = (t - t1) / max(n_tokens - 1, 1)
    return dict(
        tokens_per_s=b * n_tokens / t,
        images_per_s=b / t,
        step_tokens_per_s=b / step if step > 0 else None,  # None: too short to tell apart from the prefill.
        first_call_s=first,
    )


def bench_hf(params, cfg, res, b, n_tokens, reps, dtype, prompt_len=8):
    import torch

    from paligemma_ft.checkpoints import hf

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
    host = jax.tree.map(lambda p: np.asarray(p.astype(jnp.float32)), params)
    m = hf.to_hf_model(host, cfg, image_size=res, attn_implementation=bench_train.hf_attention(cfg))
    m = m.to(device, tdtype).eval()
    del host
    n_img = flops.image_tokens(cfg, res)
    image_id = hf.to_hf_config(cfg, image_size=res).image_token_index
    ids = torch.tensor([[image_id] * n_img + [2, 100, 200, 300]] * b, device=device)
    pix = torch.rand((b, 3, res, res), device=device, dtype=tdtype) * 2 - 1
    kw = dict(
        input_ids=ids,
        pixel_values=pix,
        attention_mask=torch.ones_like(ids),
        token_type_ids=torch.zeros_like(ids),
        max_new_tokens=n_tokens,
        min_new_tokens=n_tokens,
        do_sample=False,
    )
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        m.generate(**kw)
        times = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            m.generate(**kw)
            sync()
            times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    del m
    return dict(tokens_per_s=b * n_tokens / t, images_per_s=b / t, seconds=t)


def _fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny_pg1")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--len", type=int, default=32, help="tokens decoded per row")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", help="the weights' stored dtype (default bfloat16)")
    ap.add_argument("--compute-dtype", default=None, help="default bfloat16 on GPU/TPU, float32 on CPU")
    ap.add_argument("--hf", action="store_true", help="also time transformers generate on the same weights")
    ap.add_argument("--results", default=RESULTS, help="Markdown file to append to ('' for none)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even where an accelerator is present")
    args = ap.parse_args(argv)
    if args.cpu:
        jax.config.update("jax_platforms", "cpu")  # Before the first device query initializes the backends.
    compute = precision.resolve_compute_dtype(args.compute_dtype, key="--compute-dtype")
    cfg, res = get_preset(args.preset)
    cfg = precision.apply_compute_dtype(cfg, compute)
    model = Model(**cfg)
    params = _random_params(model, res, jnp.dtype(args.dtype))
    prompt_len = 8
    rows = []
    for b in args.batch:
        r = bench_jax(model, params, res, b, args.len, args.reps, prompt_len)
        context = flops.image_tokens(cfg, res) + prompt_len + args.len / 2  # Mean keys attended per step.
        roof = flops.decode_bandwidth_limit(cfg, round(context), b, param_dtype=args.dtype)
        step = r["step_tokens_per_s"]
        share = None if roof is None or step is None else step / roof
        row = (
            f"| {args.preset} | {b} | {args.len} | {r['tokens_per_s']:.1f} | {r['images_per_s']:.2f} | "
            f"{_fmt(step, '.1f')} | {_fmt(roof, '.0f')} | {_fmt(share, '.1%')} | {r['first_call_s']:.1f} |"
        )
        if args.hf:
            try:
                h = bench_hf(params, cfg, res, b, args.len, args.reps, args.dtype)
                row += f" {h['tokens_per_s']:.1f} | {r['tokens_per_s'] / h['tokens_per_s']:.2f}x |"
            except Exception as e:  # noqa: BLE001 - an OOM is a result; anything else raises.
                if not bench_train.is_oom(e):
                    raise
                row += " OOM | |"
        print(row, flush=True)
        rows.append(row)
    head = (
        "| model | batch | tokens | tokens/s | images/s | decode-step tokens/s | roofline tokens/s | of roofline | "
        "first call (compile) s |"
    )
    sep = "|---" * 9 + "|"
    if args.hf:
        head += " HF generate tokens/s | ratio (end to end) |"
        sep += "---|---|"
    text = (
        f"\n## Decode throughput ({datetime.date.today()}, `python bench/bench_decode.py "
        f"{' '.join(sys.argv[1:] if argv is None else argv)}`)\n\nDevice: {_device_name()}; weights "
        f"{args.dtype}, compute {compute}, random weights, greedy, KV cache bf16, EOS disabled, prompt "
        f"{prompt_len} tokens. Roofline: every LLM weight and the KV cache read once per step at the chip's "
        f"peak bandwidth (n/a on CPU).\n\n{head}\n{sep}\n" + "\n".join(rows) + "\n"
    )
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write(text)
    return rows


if __name__ == "__main__":
    main()
