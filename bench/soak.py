"""Soak: a long tiny training run with periodic evaluations and checkpoints, watching host memory for growth.

Trains the demo config shrunk to the tiny preset (random init, 32 px, generated shapes data) for `--steps` steps
with a checkpoint every `--ckpt-every` and an evaluation every `--eval-every`, in this process, while a thread
samples this process's resident memory (VmRSS from /proc/self/status, else psutil) every `--sample-seconds`
together with the last logged step. Memory is compared after a warm-up (compilation, the first checkpoints and
evaluations; default 2 x the longer interval): the baseline of each `--window` of steps is its smallest sample
(evaluations and checkpoints allocate for a moment), and the script reports the baselines of the first and the last
quarter, a least-squares slope in MiB per 1000 steps and the scatter around it. Writes the samples to
`<workdir>/rss.csv` and, unless `--no-write`, appends a section to `bench/RESULTS.md`; `--from-csv` re-analyses
the samples of an earlier run without training.

Usage: python bench/soak.py [--steps 2000] [--ckpt-every 200] [--eval-every 250] [--workdir DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"


def rss_mib() -> float:
    """Resident memory of this process in MiB."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import psutil  # noqa: PLC0415 - only where /proc is missing.

    return psutil.Process().memory_info().rss / 2**20


def last_step(metrics: pathlib.Path) -> int:
    """The step of the last training row of `metrics.jsonl` (0 before the first)."""
    try:
        lines = metrics.read_bytes()[-4096:].splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "train/loss" in row:
            return int(row["step"])
    return 0


class Sampler(threading.Thread):
    """Samples (seconds, step, RSS MiB) every `every` seconds until stopped."""

    def __init__(self, metrics: pathlib.Path, every: float):
        super().__init__(daemon=True)
        self.metrics, self.every, self.samples = metrics, every, []
        self.stop = threading.Event()
        self.t0 = time.perf_counter()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.perf_counter() - self.t0, last_step(self.metrics), rss_mib()))
            self.stop.wait(self.every)


def soak_config(steps: int, ckpt_every: int, eval_every: int):
    """The demo config shrunk to the tiny preset; plain dict values so that `quiet` can be added."""
    import ml_collections  # noqa: PLC0415

    from paligemma_ft.config import load_config  # noqa: PLC0415

    data = "{'source': 'shapes', 'n': 512, 'seed': 0, 'task': 'caption', 'image_size': 32}"
    evals = (
        "{'val': {'type': 'caption', 'batch_size': 16, 'max_decode_len': 12, 'bootstrap': 0, "
        f"'log_steps': {eval_every}, 'data': {{'source': 'shapes', 'n': 32, 'seed': 0, 'task': 'caption', "
        "'image_size': 32, 'offset': 100000}}}"
    )
    c = load_config(
        str(ROOT / "configs" / "demo.py"),
        [
            "--config.model_init=",
            "--config.model_name_or_preset=tiny_pg1",
            "--config.input.res=32",
            f"--config.input.data={data}",
            "--config.input.text_len=24",
            "--config.input.batch_size=8",
            f"--config.total_steps={steps}",
            f"--config.ckpt_steps={ckpt_every}",
            "--config.keep_ckpts=2",
            f"--config.evals={evals}",
        ],
    ).to_dict()
    c["quiet"] = True
    return ml_collections.ConfigDict(c)


def summarize(samples: list[tuple[float, int, float]], steps: int, warmup: int, window: int) -> dict:
    """Growth of the baseline RSS after warm-up.

    Evaluations and checkpoints allocate for a moment, so single samples swing by hundreds of MiB; the baseline
    of each `window` of steps is its smallest sample. Growth compares the median baseline of the first and the
    last quarter after warm-up; the slope is a least-squares fit over the baselines; the noise is the standard
    deviation of the baselines around that fit.
    """
    after = [(s, r) for _, s, r in samples if s >= warmup]
    windows: dict[int, float] = {}
    for step, rss in after:
        windows[step // window] = min(rss, windows.get(step // window, rss))
    if len(windows) < 8:
        raise SystemExit(f"only {len(windows)} windows after warm-up; use more --steps or a smaller --window")
    x = np.array([k * window for k in sorted(windows)], float)
    y = np.array([windows[k] for k in sorted(windows)])
    span = steps - warmup
    first, last = y[x < warmup + span / 4], y[x >= steps - span / 4]
    fit = np.polyfit(x, y, 1)
    all_rss = np.array([r for _, _, r in samples])
    return {
        "samples": len(samples),
        "start_mib": float(all_rss[0]),
        "peak_mib": float(all_rss.max()),
        "peak_after_warmup_mib": float(max(r for _, r in after)),
        "first_quarter_baseline_mib": float(np.median(first)),
        "last_quarter_baseline_mib": float(np.median(last)),
        "growth_mib": float(np.median(last) - np.median(first)),
        "slope_mib_per_1000_steps": float(fit[0] * 1000),
        "noise_mib": float(np.std(y - np.polyval(fit, x))),
        "warmup_steps": warmup,
        "window_steps": window,
    }


def machine() -> str:
    cpu = platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    return f"{platform.platform()} (Python {platform.python_version()}), {usable} usable cores, {cpu}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--ckpt-every", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--sample-seconds", type=float, default=1.0)
    parser.add_argument("--workdir", type=pathlib.Path, default=None, help="default: a temporary folder")
    parser.add_argument("--window", type=int, default=100, help="steps per baseline window")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="steps left out at the start (default: 2 x the longer of the two intervals)",
    )
    parser.add_argument(
        "--from-csv",
        type=pathlib.Path,
        default=None,
        help="only summarize the rss.csv of an earlier soak run (no training)",
    )
    parser.add_argument("--no-write", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else 2 * max(args.ckpt_every, args.eval_every)
    if args.from_csv:
        lines = args.from_csv.read_text().splitlines()[1:]
        samples = [(float(t), int(s), float(r)) for t, s, r in (line.split(",") for line in lines)]
        print(json.dumps(summarize(samples, args.steps, warmup, args.window), indent=2))
        return

    import jax  # noqa: PLC0415

    from paligemma_ft.training import loop as train  # noqa: PLC0415 - after argument parsing: `--help` stays instant.

    workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="soak_"))
    config = soak_config(args.steps, args.ckpt_every, args.eval_every)
    load_before = os.getloadavg()[0]
    sampler = Sampler(workdir / "metrics.jsonl", args.sample_seconds)
    sampler.start()
    t0 = time.perf_counter()
    try:
        train.run(config, workdir)
    finally:  # Keep the samples of a run that failed, too.
        seconds = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
        (workdir / "rss.csv").write_text(
            "seconds,step,rss_mib\n" + "".join(f"{t:.1f},{s},{r:.1f}\n" for t, s, r in sampler.samples)
        )
    summary = summarize(sampler.samples, args.steps, warmup, args.window)
    summary.update(seconds=seconds, load_before=load_before, load_after=os.getloadavg()[0])
    print(json.dumps(summary, indent=2))
    if not args.no_write:
        write_results(summary, args, jax.devices()[0].device_kind)


def write_results(s: dict, args: argparse.Namespace, device: str) -> None:
    text = (
        f"\n## Soak: host memory over {args.steps} training steps ({datetime.date.today()})\n\n"
        f"Machine: {machine()}; jax {device} backend. Load average {s['load_before']:.1f} before, "
        f"{s['load_after']:.1f} after (shared machine).\n"
        f"Command: `python bench/soak.py --steps {args.steps} --ckpt-every {args.ckpt_every} "
        f"--eval-every {args.eval_every}` (the demo config on the tiny preset, random init, 32 px, batch 8; "
        f"{args.steps // args.ckpt_every} checkpoints, {args.steps // args.eval_every + 1} evaluations of 32 "
        f"examples; RSS sampled every {args.sample_seconds:g} s; {s['seconds']:.0f} s in all).\n\n"
        "| RSS at start | peak (all) | peak after warm-up | baseline, first quarter | baseline, last quarter | "
        "growth | slope (MiB / 1000 steps) | noise (std around the fit) |\n|---|---|---|---|---|---|---|---|\n"
        f"| {s['start_mib']:.0f} MiB | {s['peak_mib']:.0f} MiB | {s['peak_after_warmup_mib']:.0f} MiB | "
        f"{s['first_quarter_baseline_mib']:.1f} MiB | {s['last_quarter_baseline_mib']:.1f} MiB | "
        f"{s['growth_mib']:+.1f} MiB | {s['slope_mib_per_1000_steps']:+.1f} | {s['noise_mib']:.1f} MiB |\n\n"
        f"Warm-up: the first {s['warmup_steps']} steps (compilation, first checkpoints and evaluations) are left "
        f"out; the baseline of each {s['window_steps']}-step window is its smallest sample (evaluations and "
        "checkpoints allocate for a moment).\n"
    )
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(text)
    print(f"Appended to {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
