"""Training-loop throughput: steps/s of the whole trainer (`paligemma_ft.training.loop.run`) in steady state.

    python bench/bench_loop.py                                    # CPU: tiny_pg1, 32 px, batch 8, 200 steps, x3
    python bench/bench_loop.py --steps 500 --label after                        # GPU: the loop's own overhead
    python bench/bench_loop.py --preset pg2_3b_224 --res 224 --batch 8 --text-len 64 --steps 60 --repeats 2 \
        --config.schedule="[('img/.*', None), ('.*', {'decay_type': 'cosine'})]"   # GPU: a real model

Unlike `bench_train.py` (the compiled step alone), this times what a run does between steps: reading the next
batch, moving it to the devices, dispatching the step, reading its metrics back, logging. A run of the demo
config (random init of `--preset`, generated shapes scenes, no evaluations, one checkpoint at the end) is timed by
the moments its `metrics.jsonl` rows are written; the first `--warmup` rows (compilation, pipeline start) are
left out. Each repeat is a fresh run in a fresh workdir (the compilation cache is not used). Other `--config.x=y`
items are passed to the config. Prints one line per repeat and a summary with the spread and the host's load
average (other processes skew CPU timings); appends the summary to bench/RESULTS.md unless `--results ''`.

To compare with another version of the trainer, run this same file from that version's tree, e.g.
`git archive <commit> | tar -x -C /tmp/before && cp bench/bench_loop.py /tmp/before/bench/ && cd /tmp/before &&
python bench/bench_loop.py --label before` (the script imports the package next to it).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

RESULTS = os.path.join(os.path.dirname(__file__), "RESULTS.md")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def overrides(args: argparse.Namespace) -> list[str]:
    data = f"{{'source': 'shapes', 'n': 256, 'seed': 0, 'task': 'caption', 'image_size': {args.res}}}"
    return [
        "--config.model_init=",
        f"--config.model_name_or_preset={args.preset}",
        f"--config.input.res={args.res}",
        f"--config.input.data={data}",
        f"--config.input.text_len={args.text_len}",
        f"--config.input.batch_size={args.batch}",
        f"--config.total_steps={args.steps}",
        "--config.ckpt_steps=0",
        "--config.evals={}",
        "--config.quiet=True",
        *args.config,
    ]


def one_run(args: argparse.Namespace, workdir: pathlib.Path) -> float:
    """Steps per second between row `args.warmup` and the last row of one fresh run."""
    from paligemma_ft.config import load_config  # noqa: PLC0415 - after argument parsing: `--help` stays instant.
    from paligemma_ft.training import loop, report  # noqa: PLC0415

    times: list[float] = []
    write = report.MetricsLog.write

    def timed_write(self, step, metrics):
        if "train/loss" in metrics:
            times.append(time.perf_counter())
        return write(self, step, metrics)

    report.MetricsLog.write = timed_write  # Times rows as the trainer writes them (also one step late).
    try:
        loop.run(load_config(str(ROOT / "configs" / "demo.py"), overrides(args)), workdir)
    finally:
        report.MetricsLog.write = write
    timed = times[args.warmup :]
    return (len(timed) - 1) / (timed[-1] - timed[0])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny_pg1")
    ap.add_argument("--res", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-len", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10, help="rows left out at the start")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--label", default="", help="what is measured (e.g. the commit), for the results line")
    ap.add_argument("--results", default=RESULTS, help="Markdown file to append to ('' for none)")
    args, extra = ap.parse_known_args(argv)
    if bad := [a for a in extra if not a.startswith("--config.")]:
        ap.error(f"unrecognized arguments: {' '.join(bad)}")
    args.config = extra
    import jax  # noqa: PLC0415

    load = [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []
    rates = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            rates.append(one_run(args, pathlib.Path(tmp) / "run"))
        load += [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []
        print(f"repeat {i + 1}: {rates[-1]:.1f} steps/s", flush=True)
    d = jax.devices()[0]
    spread = f"min {min(rates):.1f}, max {max(rates):.1f}"
    loads = f", load average {min(load):.1f}-{max(load):.1f}" if load else ""
    line = (
        f"| {args.label or '-'} | {d.platform}:{d.device_kind} x{jax.device_count()} ({platform.node()}, "
        f"{os.cpu_count()} CPUs{loads}) | {args.preset}, {args.res} px, batch {args.batch}, text {args.text_len} | "
        f"{statistics.median(rates):.1f} | {spread} ({args.repeats} runs of {args.steps} steps, first "
        f"{args.warmup} left out) |"
    )
    print(line)
    if args.results:
        with open(args.results, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
