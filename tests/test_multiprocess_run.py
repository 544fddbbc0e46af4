"""Two processes train like one: 2 CPU processes x 2 simulated devices, joined over localhost (gloo), train the
demo config, are killed, resume, evaluate and export; the result equals one process over 4 devices.

The demo config is shrunk by overrides (the tiny preset from random init, 6 steps, a checkpoint every 2, an
evaluation of a 12-example split at steps 3 and 6) and its parameters are sharded over all 4 devices (FSDP), so
the export gathers arrays that span the processes. The 2-process run is launched with the standard variables
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) on a free port of 127.0.0.1, and killed with
SIGKILL (process 1 first, as when one host dies) once checkpoint 2 is complete and step 3 is logged; the
evaluation at step 3 compiles the decoder, which holds the run there for seconds.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import FAST_COMPILE_FLAGS

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOTAL, CKPT, EVAL_EVERY, VAL_N = 6, 2, 3, 12
DATA = "{'source': 'shapes', 'n': 64, 'seed': 0, 'task': 'caption', 'image_size': 32}"
EVALS = (
    "{'val': {'type': 'caption', 'batch_size': 8, 'max_decode_len': 8, 'bootstrap': 0, 'skip_first': True, "
    f"'log_steps': {EVAL_EVERY}, 'data': {{'source': 'shapes', 'n': {VAL_N}, 'seed': 0, 'task': 'caption', "
    "'image_size': 32, 'offset': 100000}}}"
)
OVERRIDES = [
    "--config.model_init=",
    "--config.model_name_or_preset=tiny_pg1",
    "--config.input.res=32",
    f"--config.input.data={DATA}",
    "--config.input.text_len=24",
    "--config.input.batch_size=8",  # 2 rows per device; 4 per process.
    f"--config.total_steps={TOTAL}",
    f"--config.ckpt_steps={CKPT}",
    "--config.keep_ckpts=2",
    "--config.sharding_strategy=[('.*', 'fsdp(axis=\"data\", min_size_mb=0)')]",
    f"--config.evals={EVALS}",
    "--config.quiet=True",
]
LIMIT = 400  # Seconds any one run may take.

pytestmark = pytest.mark.slow


def command(workdir: pathlib.Path) -> list[str]:
    config = str(ROOT / "configs" / "demo.py")
    return [sys.executable, "-m", "paligemma_ft.commands.cli", "train", "--config", config, "--workdir", str(workdir)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(cache: pathlib.Path, devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_", "TPU_"))}
    return {
        **env,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def start_two(workdir: pathlib.Path, cache: pathlib.Path, logs: list[pathlib.Path]) -> list[subprocess.Popen]:
    """Process 0 and 1 of one run, told where to meet by the standard variables only."""
    port = free_port()
    procs = []
    for pid, log in enumerate(logs):
        env = {
            **environment(cache, 2),
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",  # Not on every interface.
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(pid),
        }
        with open(log, "ab") as f:
            procs.append(
                subprocess.Popen(command(workdir) + OVERRIDES, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
            )
    return procs


def kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


def wait_all(procs: list[subprocess.Popen], logs: list[pathlib.Path]) -> None:
    deadline = time.monotonic() + LIMIT
    try:
        for proc, log in zip(procs, logs):
            code = proc.wait(timeout=max(1, deadline - time.monotonic()))
            assert code == 0, f"{log.name} exited {code}:\n" + log.read_text()[-4000:]
    finally:
        kill(procs)


def rows(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # A line being written.
            pass
    return out


def losses(workdir: pathlib.Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in rows(workdir) if "train/loss" in r}


def test_two_processes_killed_resumed_equal_one_process(tmp_path):
    cache = tmp_path / "jax_cache"
    one, two = tmp_path / "one", tmp_path / "two"

    # The reference, one process over 4 devices, runs alongside (the processes wait on each other a lot).
    with open(tmp_path / "one.log", "wb") as log:
        ref = subprocess.Popen(
            command(one) + OVERRIDES, env=environment(cache, 4), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )

    # Two processes, killed once checkpoint 2 is complete and step 3 is logged.
    logs = [tmp_path / "two.p0.log", tmp_path / "two.p1.log"]
    procs = start_two(two, cache, logs)
    deadline = time.monotonic() + LIMIT
    try:
        while not (3 in losses(two) and (two / "checkpoints" / "2").is_dir()):
            assert all(p.poll() is None for p in procs), "\n".join(log.read_text()[-3000:] for log in logs)
            assert time.monotonic() < deadline, "the 2-process run did not reach step 3"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)  # One host dies; the job is then torn down, as a scheduler does.
        procs[1].wait(timeout=30)
        time.sleep(0.5)
    except BaseException:
        kill([ref])
        raise
    finally:
        kill(procs)
    assert max(losses(two)) < TOTAL and not (two / "params.npz").exists()  # Killed mid-run.

    # The same command again on both processes: resumes, finishes, evaluates and exports.
    logs = [tmp_path / "resume.p0.log", tmp_path / "resume.p1.log"]
    wait_all([*start_two(two, cache, logs), ref], [*logs, tmp_path / "one.log"])
    for log in logs:
        assert f"Resuming {two} from step " in log.read_text()  # Every process restored its data state.

    # Same losses at every step (the same global batches), same parameters, the whole split evaluated.
    ref_losses, got_losses = losses(one), losses(two)
    assert sorted(got_losses) == sorted(ref_losses) == list(range(1, TOTAL + 1))
    np.testing.assert_allclose([got_losses[s] for s in ref_losses], list(ref_losses.values()), rtol=1e-4)
    with np.load(one / "params.npz") as want, np.load(two / "params.npz") as got:
        assert sorted(got.files) == sorted(want.files) and len(want.files) > 10
        for name in want.files:
            np.testing.assert_allclose(got[name], want[name], atol=1e-4, err_msg=name)
    for workdir in (one, two):
        val = [r for r in rows(workdir) if "val/n" in r]
        assert [(r["step"], r["val/n"]) for r in val] == [(3, VAL_N), (6, VAL_N)]
    predictions = [
        [json.loads(line)["id"] for line in (workdir / "eval" / f"predictions_val_step{TOTAL}.jsonl").open()]
        for workdir in (one, two)
    ]
    assert predictions[1] == predictions[0] and len(set(predictions[0])) == VAL_N  # Same order, each once.
