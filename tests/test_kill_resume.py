"""Kill anywhere, lose nothing: SIGKILL a training run while it steps, checkpoints and evaluates, restart it with
the same command each time, and end bitwise where an uninterrupted run ends. SIGTERM and Ctrl-C (SIGINT) stop it
after saving the step in flight (exit 143 / 130, nothing redone); a second signal stops it at once.

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


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env) -> pathlib.Path:
    """The uninterrupted run's workdir (the first run also fills the compilation cache)."""
    folder = tmp_path_factory.mktemp("reference")
    run_to_end(folder / "run", env, folder / "reference.log")
    return folder / "run"


def assert_same_end(got: pathlib.Path, want: pathlib.Path, note: str) -> None:
    """`params.npz` bitwise equal, every training step once, the same losses, evaluations and order."""
    a, b = np.load(want / "params.npz", allow_pickle=False), np.load(got / "params.npz", allow_pickle=False)
    assert sorted(b.files) == sorted(a.files)
    for name in a.files:
        assert b[name].dtype == a[name].dtype and b[name].tobytes() == a[name].tobytes(), f"{name} {note}"
    steps = [r["step"] for r in rows(got) if "train/loss" in r]
    assert steps == list(range(1, TOTAL + 1)), f"duplicated or missing training steps {note}"
    assert [comparable(r) for r in rows(got)] == [comparable(r) for r in rows(want)], note


@pytest.mark.slow
def test_killed_anywhere_and_restarted_ends_bitwise_like_an_uninterrupted_run(tmp_path, env, reference):
    seed = int(os.environ.get("PALIGEMMA_FT_KILL_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    killed = tmp_path / "killed"

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

    assert_same_end(killed, reference, note)

    leftovers = sorted(os.listdir(killed / "checkpoints"), key=lambda name: (len(name), name))
    assert leftovers == [str(TOTAL - CKPT), str(TOTAL)], f"unfinished or extra checkpoint folders {note}"
    for path in [*killed.rglob("*"), *reference.parent.rglob("*"), tmp_path / "killed.log"]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"a credential leaked into {path}"


def run_and_signal(workdir, env, log_path, trigger, signals, jitter: float) -> tuple[int, str]:
    """Starts the run, waits until `trigger(workdir)` (on rows this run wrote), waits `jitter` s, sends `signals`
    (a second one once the run said it received the first), and waits for the end: (exit code, its output)."""
    metrics = workdir / "metrics.jsonl"
    before = metrics.stat().st_ino if metrics.exists() else None
    offset = log_path.stat().st_size if log_path.exists() else 0
    output = lambda: log_path.read_bytes()[offset:].decode(errors="replace")  # noqa: E731
    with open(log_path, "ab") as log:
        proc = start(workdir, env, log)
        try:
            deadline = time.monotonic() + LIMIT
            while proc.poll() is None and time.monotonic() < deadline:
                ours = metrics.exists() and metrics.stat().st_ino != before
                if ours and trigger(workdir):
                    break
                time.sleep(0.005)
            assert proc.poll() is None, f"the run ended before its signal:\n{output()[-3000:]}"
            time.sleep(jitter)
            proc.send_signal(signals[0])
            if len(signals) > 1:
                name = signal.Signals(signals[0]).name
                while proc.poll() is None and f"{name} received" not in output():
                    time.sleep(0.005)
                proc.send_signal(signals[1])
            return proc.wait(timeout=LIMIT), output()
        finally:
            proc.kill()


def reached(step: int):
    return lambda workdir: "steps" if any(s >= step for s in train_steps(workdir)) else ""


def stopped_at(output: str, note: str) -> int:
    lines = [line for line in output.splitlines() if "rerun the same command to resume" in line]
    assert len(lines) == 1 and "Traceback" not in output, f"{note}\n{output[-3000:]}"
    step = int(lines[0].removeprefix("stopped at step ").split(";")[0])
    assert lines[0] == f"stopped at step {step}; rerun the same command to resume", note
    return step


@pytest.mark.slow
def test_sigterm_and_ctrl_c_save_the_step_in_flight_and_a_resume_ends_bitwise(tmp_path, env, reference):
    seed = int(os.environ.get("PALIGEMMA_FT_KILL_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    work, log = tmp_path / "stopped", tmp_path / "stopped.log"
    note = f"(seed {seed}; log {log})"

    # SIGTERM at a random step before the step-8 evaluation: exit 143 after saving the step it reached.
    code, out = run_and_signal(work, env, log, reached(rng.randint(1, 5)), [signal.SIGTERM], rng.uniform(0, 0.2))
    assert code == 128 + signal.SIGTERM, f"{code} {note}\n{out[-3000:]}"
    first = stopped_at(out, note)
    assert max(train_steps(work)) == first and str(first) in os.listdir(work / "checkpoints"), note

    # Ctrl-C during an evaluation, and again once the run said it stops: the second one ends it at once.
    code, out = run_and_signal(work, env, log, during_evaluation, [signal.SIGINT, signal.SIGINT], 0.0)
    assert f"from step {first} (0 metrics rows after it will be redone)" in out, f"a step was redone {note}"
    assert code == -signal.SIGINT and "rerun the same command" not in out and "Traceback" not in out, note

    # Ctrl-C at a random later step: exit 130, and again nothing is redone by the run to the end.
    code, out = run_and_signal(work, env, log, reached(rng.randint(9, TOTAL - 1)), [signal.SIGINT], 0.0)
    assert code == 128 + signal.SIGINT, f"{code} {note}\n{out[-3000:]}"
    second = stopped_at(out, note)
    offset = log.stat().st_size
    run_to_end(work, env, log)
    out = log.read_bytes()[offset:].decode(errors="replace")
    assert f"from step {second} (0 metrics rows after it will be redone)" in out, note
    assert_same_end(work, reference, note)
