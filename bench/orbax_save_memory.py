"""Host memory kept by orbax per checkpoint save, with no paligemma_ft code (an upstream reproduction).

`bench/soak.py` shows host memory rising slowly with each checkpoint save and not with training steps or
evaluations. This script saves a pytree of `--arrays` float32 jax arrays of `--size` elements `--saves` times with
`orbax.checkpoint.StandardCheckpointer` (each save waited for, the older folders deleted as a `CheckpointManager`
with `max_to_keep=2` does) and prints the resident memory after `gc.collect()` and glibc's `malloc_trim(0)`, so
that allocator fragmentation is not counted. What remains grows with the number of arrays saved, not their size.

Usage: python bench/orbax_save_memory.py [--arrays 100] [--size 1000] [--saves 200]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import pathlib
import shutil
import tempfile


def rss_mib() -> float:
    """Resident memory in MiB (like bench/soak.py's, kept here so that this file stands alone in a bug report)."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise OSError("no VmRSS in /proc/self/status (Linux only)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arrays", type=int, default=100)
    parser.add_argument("--size", type=int, default=1000, help="float32 elements per array")
    parser.add_argument("--saves", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20, help="saves before the baseline is taken")
    args = parser.parse_args(argv)

    import importlib.metadata  # noqa: PLC0415 - after argument parsing: `--help` stays instant.

    import jax.numpy as jnp  # noqa: PLC0415
    import orbax.checkpoint as ocp  # noqa: PLC0415

    trim = ctypes.CDLL("libc.so.6").malloc_trim  # glibc: give freed heap pages back, so only live memory counts.
    state = {f"a{i}": jnp.full((args.size,), i, jnp.float32) for i in range(args.arrays)}
    root = pathlib.Path(tempfile.mkdtemp(prefix="orbax_mem_"))
    checkpointer = ocp.StandardCheckpointer()

    def save(i: int) -> None:
        checkpointer.save(root / str(i), state)
        checkpointer.wait_until_finished()
        shutil.rmtree(root / str(i - 2), ignore_errors=True)

    for i in range(args.warmup):
        save(i)
    gc.collect()
    trim(0)
    base = rss_mib()
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("jax", "orbax-checkpoint", "tensorstore"))
    print(f"{versions}; {args.arrays} arrays x {args.size} float32; baseline {base:.0f} MiB after {args.warmup} saves")
    every = max(args.saves // 4, 1)
    for n in range(1, args.saves + 1):
        save(args.warmup + n)
        if n % every == 0 or n == args.saves:
            gc.collect()
            trim(0)
            grown = rss_mib() - base
            print(f"after {n:4d} more saves: {grown:+6.1f} MiB ({grown * 1024 / n:5.1f} KiB per save)", flush=True)
    checkpointer.close()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
