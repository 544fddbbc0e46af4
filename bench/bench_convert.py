"""Peak host memory and time of `paligemma-ft convert`, both ways, on a PaliGemma-shaped random bf16 checkpoint.

Generates (streaming, one array at a time) a random bfloat16 `.npz` with a preset's exact parameter names and
shapes (`pg2_3b_224`: 3.03 B parameters, ~6 GB), then runs, each in a fresh process that reports its own peak
resident memory (`ru_maxrss`):

  1. `convert FILE.npz DIR` (npz -> Hugging Face folder, 5 GB shards);
  2. `convert DIR BACK.npz` (HF folder -> npz);

checks a sample of arrays bitwise between FILE.npz and BACK.npz, deletes the generated files, and appends a table
to bench/RESULTS.md (with the machine named). The target is a peak below 1.5 x the largest shard written.

Usage: python bench/bench_convert.py [--preset pg2_3b_224] [--dir /tmp] [--shard-size 5GB] [--no-results]
       python bench/bench_convert.py --preset tiny_pg2 --shard-size 100KB --no-results   # a smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_CHILD = """
import resource, sys, time
from paligemma_ft.commands.convert import convert
t = time.perf_counter()
convert(sys.argv[1], sys.argv[2], shard_size=sys.argv[3], progress=False)
print("BENCH", time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def generate(preset: str, path: Path, seed: int = 0) -> int:
    """Writes random bf16 values with `preset`'s parameter names and shapes; returns the number of parameters.

    Values are random bit patterns with a fixed small exponent (|x| in [2^-7, 2^-6)): as fast as memory, never
    inf or NaN. One array is in memory at a time.
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import ml_dtypes  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from paligemma_ft.checkpoints import npz  # noqa: PLC0415
    from paligemma_ft.model import Model, get_preset  # noqa: PLC0415
    from paligemma_ft.utils import tree_flatten_with_names  # noqa: PLC0415

    cfg, res = get_preset(preset)
    z = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: Model(**cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)), z, z))
    rng = np.random.default_rng(seed)
    total = 0
    with npz.NpzWriter(path) as writer:
        for name, leaf in tree_flatten_with_names(shapes["params"]):
            bits = rng.integers(0, 1 << 16, size=leaf.shape, dtype=np.uint16)
            bits &= 0x807F  # Keep sign and mantissa ...
            bits |= 0x3C00  # ... with exponent 2^-7.
            writer.write(name, bits.view(ml_dtypes.bfloat16))
            total += bits.size
            del bits
    return total


def run_child(src: Path, dst: Path, shard_size: str) -> tuple[float, int]:
    """Runs one conversion in a fresh Python; `(seconds, peak RSS bytes)` as the child measured them."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(src), str(dst), shard_size], env=env, capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(f"convert {src} -> {dst} failed:\n{out.stderr[-3000:]}")
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("BENCH"))
    _, seconds, rss = line.split()
    return float(seconds), int(rss)


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    mem = next((int(ln.split()[1]) // 2**20 for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0)
    load = os.getloadavg()
    return (
        f"{platform.platform()} (Python {platform.python_version()}), {os.cpu_count()} cores ({cpu}), {mem} GiB RAM; "
        f"load average {load[0]:.1f} when started"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="pg2_3b_224")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the generated files go (never the repo)")
    parser.add_argument("--shard-size", default="5GB")
    parser.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args(argv)

    from paligemma_ft.checkpoints import hf_files, npz  # noqa: PLC0415

    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.dir))
    about = machine()
    try:
        src, hf_dir, back = work / f"{args.preset}.bf16.npz", work / "hf", work / "back.npz"
        t = time.perf_counter()
        n = generate(args.preset, src)
        gen_s = time.perf_counter() - t
        size = src.stat().st_size
        to_hf_s, to_hf_rss = run_child(src, hf_dir, args.shard_size)
        shards = sorted(p for p in hf_dir.iterdir() if p.suffix == ".safetensors")
        largest = max(p.stat().st_size for p in shards)
        to_npz_s, to_npz_rss = run_child(hf_dir, back, args.shard_size)
        with npz.NpzReader(src) as a, npz.NpzReader(back) as b:
            names = list(a.specs())
            sample = names[:: max(1, len(names) // 8)] + ["llm/embedder/input_embedding"]
            for name in sample:
                if a.read(name).tobytes() != b.read(name).tobytes():
                    raise AssertionError(f"{name} differs after npz -> HF -> npz")
            same = list(a.specs().items()) == list(b.specs().items())
        index = json.loads((hf_dir / hf_files.INDEX).read_text()) if len(shards) > 1 else None
    finally:
        shutil.rmtree(work, ignore_errors=True)  # The generated GBs never stay behind.

    gb = lambda b: f"{b / 1e9:.2f} GB"
    rows = [
        ("npz -> HF", to_hf_s, to_hf_rss),
        ("HF -> npz", to_npz_s, to_npz_rss),
    ]
    table = [
        "| direction | seconds | peak RSS | peak / largest shard |",
        "|---|---|---|---|",
        *[f"| {d} | {s:.1f} | {gb(r)} | {r / largest:.2f} |" for d, s, r in rows],
    ]
    text = "\n".join(
        [
            f"## Checkpoint conversion, both ways ({datetime.date.today()}, `python bench/bench_convert.py "
            f"--preset {args.preset} --shard-size {args.shard_size}`)",
            "",
            f"Machine: {about}.",
            f"Checkpoint: `{args.preset}` shapes, random bfloat16, {n:,} parameters, {gb(size)} `.npz` (generated in "
            f"{gen_s:.0f} s, deleted afterwards); HF folder: {len(shards)} shard(s), largest {gb(largest)}"
            + (f", index of {len(index['weight_map'])} tensors" if index else "")
            + f". Round trip: same names/shapes/dtypes {same}, {len(sample)} arrays compared bitwise.",
            "",
            *table,
            "",
            "Peak RSS is the converting process's own `ru_maxrss` (Python, JAX and transformers imports included); "
            "the target is below 1.5 x the largest shard.",
            "",
        ]
    )
    print(text)
    if not args.no_results:
        with open(HERE / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
