"""Compile time of the train step: cold, and warm from JAX's persistent compilation cache, each in a new process.

    python bench/bench_compile.py                          # CPU: tiny_pg1
    python bench/bench_compile.py --preset pg2_3b_224 --batch 32      # one GPU (bfloat16 compute by default)
    python bench/bench_compile.py --scan true false        # layers scanned (the default) vs unrolled

For each setting a fresh cache folder is made and two child processes lower and compile the same step from
abstract shapes (nothing is allocated or run): the first fills the cache (cold), the second reads it (warm), as a
restarted or resumed run would with `config.compilation_cache_dir`. Timings: trace + lower, and XLA compile (or
cache load). The step is bench_train's (the trainer's computation). Appends a table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(args: argparse.Namespace) -> None:
    """Runs in the child process: one lower + compile with the persistent cache at `args.cache`."""
    import jax

    jax.config.update("jax_compilation_cache_dir", args.cache)
    # Cache every executable, however fast it compiled (the defaults skip those under 1 s).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    sys.path.insert(0, HERE)
    import bench_train  # noqa: PLC0415

    t0 = time.perf_counter()
    cfg_scan = args.scan == "true"
    step, abstract, _, batch, _, _ = bench_train.build(
        args.preset,
        args.dtype,
        None,
        "einsum",
        args.recipe,
        "chunked",
        args.batch,
        args.text_len,
        args.text_len - 4,
        scan=cfg_scan,
    )
    lowered = step.lower(abstract, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch))
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    print(json.dumps({"lower_s": t1 - t0, "compile_s": t2 - t1, "device": bench_train.device_name()}))


def run_child(args: argparse.Namespace, cache: str, scan: str) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        "--cache",
        cache,
        "--scan",
        scan,
        "--preset",
        args.preset,
        "--batch",
        str(args.batch),
        "--text-len",
        str(args.text_len),
        "--dtype",
        args.dtype,
        "--recipe",
        args.recipe,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny_pg1")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--dtype", default=None, help="compute dtype: default bfloat16 on accelerators, float32 on CPU")
    ap.add_argument("--recipe", default="full", choices=["full", "attn"])
    ap.add_argument("--scan", nargs="+", default=["true"], help="true (layers in one scan) and/or false")
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.scan = args.scan[0]
        child(args)
        return []
    if args.dtype is None:
        import jax

        args.dtype = "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"
    rows, device = [], "?"
    head = "| layers | cold: trace+lower s | cold: compile s | warm: trace+lower s | warm: compile (cache) s |"
    print(head, flush=True)
    for scan in args.scan:
        with tempfile.TemporaryDirectory() as cache:
            cold = run_child(args, cache, scan)
            warm = run_child(args, cache, scan)
        device = cold["device"]
        row = (
            f"| {'scanned' if scan == 'true' else 'unrolled'} | {cold['lower_s']:.1f} | {cold['compile_s']:.1f} | "
            f"{warm['lower_s']:.1f} | {warm['compile_s']:.2f} |"
        )
        print(row, flush=True)
        rows.append(row)
    text = (
        f"\n## Train-step compile time ({datetime.date.today()}, `python bench/bench_compile.py "
        f"{' '.join(sys.argv[1:] if argv is None else argv)}`)\n\nDevice: {device}; {args.preset}, batch "
        f"{args.batch}, text "
        f"{args.text_len}, {args.dtype}, recipe {args.recipe}; each column from a new process, warm = the "
        f"same step again with the persistent compilation cache filled by the cold run.\n\n{head}\n"
        "|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write(text)
    return rows


if __name__ == "__main__":
    main()
