"""Kill anywhere, lose nothing: SIGKILL a training run while it steps, checkpoints and evaluates, restart it with
the same command each time, and end bitwise where an uninterrupted run ends.

The run is the demo config shrunk by overrides (the tiny preset from random init, 12 steps, a checkpoint every 3,
an evaluation every 4) on 2 simulated CPU devices. Where the run is gets read from its workdir: the rows of
`metrics.jsonl` and orbax's temporary folder of a checkpoint being written. The runs share a JAX compilation
cache, so only the first one compiles. Credentials in the environment must not show up in any output.
"""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import FAST_COMPILE_FLAGS

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOTAL, CKPT, EVAL_EVERY = 12, 3, 4
DATA = "{'source': 'shapes', 'n': 64, 'seed': 0, 'task': 'caption', 'image_size': 32}"
EVALS = (
    "{'val': {'type': 'caption', 'batch_size': 8, 'max_decode_len': 8, 'bootstrap': 0, "
    f"'log_steps': {EVAL_EVERY}, 'data': {{'source': 'shapes', 'n': 8, 'seed': 0, 'task': 'caption', "
    "'image_size': 32, 'offset': 100000}}}"
)
# The demo's fields, each set here (whole `input.data` and `evals` dicts), so the demo may change its data.
OVERRIDES = [
    "--config.model_init=",
    "--config.model_name_or_preset=tiny_pg1",
    "--config.input.res=32",
    f"--config.input.data={DATA}",
    "--config.input.text_len=24",
    "--config.input.batch_size=4",
    f"--config.total_steps={TOTAL}",
    f"--config.ckpt_steps={CKPT}",
    "--config.keep_ckpts=2",
    f"--config.evals={EVALS}",
]
TIMING_KEYS = {"train/step_seconds", "train/examples_per_sec", "eval/seconds"}
SECRET = "s3cr3t-kill-test-0123456789"
LIMIT = 300  # Seconds any one run may take.


def command(workdir: pathlib.Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "paligemma_ft.commands.cli",
        "train",
        "--config",
        str(ROOT / "configs" / "demo.py"),
        "--workdir",
        str(workdir),
        *OVERRIDES,
    ]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {FAST_COMPILE_FLAGS}",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "KAGGLE_USERNAME": "someone",
        "KAGGLE_KEY": SECRET,
        "KAGGLE_API_TOKEN": SECRET,
        "HF_TOKEN": SECRET,
    }


_PARSED: dict = {}  # (path, inode, size) -> rows: the poll loop re-reads the file only when it changed.


def rows(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    try:
        stat = path.stat()
    except FileNotFoundError:
        return []
    key = (str(path), stat.st_ino, stat.st_size)
    if key not in _PARSED:
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # A line being written.
                pass
        _PARSED.clear()
        _PARSED[key] = out
    return _PARSED[key]


def train_steps(workdir: pathlib.Path) -> set[int]:
    return {r["step"] for r in rows(workdir) if "train/loss" in r}


def saving(workdir: pathlib.Path) -> bool:
    folder = workdir / "checkpoints"
    return folder.is_dir() and any("orbax-checkpoint-tmp" in p for p in os.listdir(folder))


def start(workdir, env, log):
    return subprocess.Popen(command(workdir), env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def run_to_end(workdir, env, log_path) -> None:
    with open(log_path, "ab") as log:
        proc = start(workdir, env, log)
        try:
            assert proc.wait(timeout=LIMIT) == 0, log_path.read_text()[-3000:]
        finally:
            proc.kill()


def run_and_kill(workdir, env, log_path, trigger, jitter: float) -> str:
    """Starts the run, polls the workdir until `trigger(workdir)` names a phase, waits `jitter` s, SIGKILLs it.

    Returns the phase seen at the kill ("" if the run ended first). The workdir is read only once this run has
    rewritten `metrics.jsonl` (a resumed run first drops the rows after its checkpoint; a fresh one starts it
    anew), so rows left by the previous run cannot trigger the kill.
    """
    metrics = workdir / "metrics.jsonl"
    before = metrics.stat().st_ino if metrics.exists() else None
    with open(log_path, "ab") as log:
        proc = start(workdir, env, log)
        deadline = time.monotonic() + LIMIT
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    ours = metrics.stat().st_ino != before
                except FileNotFoundError:
                    ours = False
                phase = trigger(workdir) if ours else ""
                if phase:
                    time.sleep(jitter)
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return phase
                time.sleep(0.005)
            assert proc.poll() is not None, "the run neither reached its kill point nor ended"
            return ""
        finally:
            proc.kill()


def during_steps(workdir):
    """Between checkpoints: a step after the first checkpoint, and not a checkpoint step."""
    done = train_steps(workdir)
    return "steps" if any(s > CKPT and s % CKPT for s in done) else ""


def during_checkpoint(workdir):
    """While orbax writes a checkpoint (its temporary folder exists), or right as a checkpoint step logs."""
    if saving(workdir):
        return "checkpoint (temporary folder present)"
    done = train_steps(workdir)
    return "checkpoint step logged" if done and max(done) % CKPT == 0 and max(done) > CKPT else ""


def during_evaluation(workdir):
    """An evaluation step's training row is written and its evaluation row is not: the evaluation is running."""
    done, evals = train_steps(workdir), {r["step"] for r in rows(workdir) if "eval/seconds" in r}
    if not done:
        return ""
    last = max(done)
    return "evaluation" if last % EVAL_EVERY == 0 and last < TOTAL and last not in evals else ""


def comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


@pytest.mark.slow
def test_killed_anywhere_and_restarted_ends_bitwise_like_an_uninterrupted_run(tmp_path, env):
    seed = int(os.environ.get("PALIGEMMA_FT_KILL_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_to_end(reference, env, tmp_path / "reference.log")  # Also fills the compilation cache.

    phases = []
    for trigger, jitter in (
        (during_steps, rng.uniform(0, 0.3)),
        (during_checkpoint, rng.uniform(0, 0.01)),
        (during_evaluation, rng.uniform(0, 0.05)),
    ):
        phases.append(run_and_kill(killed, env, tmp_path / "killed.log", trigger, jitter))
    run_to_end(killed, env, tmp_path / "killed.log")
    note = f"(seed {seed}, kills at: {phases}; log {tmp_path / 'killed.log'})"
    assert sum(bool(p) for p in phases) >= 2, f"the run ended before most kills {note}"

    want = np.load(reference / "params.npz", allow_pickle=False)
    got = np.load(killed / "params.npz", allow_pickle=False)
    assert sorted(got.files) == sorted(want.files)
    for name in want.files:
        assert got[name].dtype == want[name].dtype and got[name].tobytes() == want[name].tobytes(), f"{name} {note}"

    ref_rows, got_rows = rows(reference), rows(killed)
    steps = [r["step"] for r in got_rows if "train/loss" in r]
    assert steps == list(range(1, TOTAL + 1)), f"duplicated or missing training steps {note}"
    assert [comparable(r) for r in got_rows] == [comparable(r) for r in ref_rows], note  # Losses, evals, order.

    leftovers = sorted(os.listdir(killed / "checkpoints"), key=lambda name: (len(name), name))
    assert leftovers == [str(TOTAL - CKPT), str(TOTAL)], f"unfinished or extra checkpoint folders {note}"
    for path in [*killed.rglob("*"), *reference.rglob("*"), tmp_path / "killed.log", tmp_path / "reference.log"]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"a credential leaked into {path}"
