"""One run per workdir (the lock) and a resume's config against the saved one; all refused before any compute."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import pytest

from paligemma_ft.commands import cli
from paligemma_ft.config import load_config, save_config
from paligemma_ft.training import loop as train
from paligemma_ft.training import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.py")
HOLD = (  # A process that takes the lock of argv[1], says so, and keeps it.
    "import sys, time; from paligemma_ft.training.workdir import RunLock; "
    "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)"
)


@pytest.fixture
def holder(tmp_path):
    """(workdir, process) where another live process holds the workdir's lock."""
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield workdir, proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_run_on_a_busy_workdir_fails_at_once_naming_the_holder(holder, capsys):
    workdir, proc = holder
    t = time.perf_counter()
    code = cli.main(["train", "--config", DEMO, "--workdir", str(workdir), "--config.total_steps=2"])
    err = capsys.readouterr().err
    assert code == 2 and time.perf_counter() - t < 30
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: workdir ")
    assert f"in use by another run: pid {proc.pid} on host {socket.gethostname()}" in lines[0]
    assert str(workdir / "run.lock") in lines[0]
    assert sorted(p.name for p in workdir.iterdir()) == ["run.lock"]  # Nothing else was written.
    assert json.loads((workdir / "run.lock").read_text())["pid"] == proc.pid  # The holder keeps its lock.


def test_a_stale_lock_is_taken_over_with_a_message(holder, capsys):
    workdir, proc = holder
    proc.kill()
    proc.wait()  # Gone without releasing its lock, as after SIGKILL.
    with workdir_lib.RunLock(workdir):
        assert json.loads((workdir / "run.lock").read_text())["pid"] == os.getpid()
    assert f"Taking over the lock of {workdir} from a run that is gone (pid {proc.pid}" in capsys.readouterr().out
    assert not (workdir / "run.lock").exists()  # Released on exit.


def test_a_reused_pid_is_stale_and_another_hosts_lock_is_respected(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    lock = workdir / "run.lock"
    # Our own pid is alive, but it started at another time: the holder that wrote this is gone.
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": "1", "since": "then"}))
    with workdir_lib.RunLock(workdir):
        pass
    assert "Taking over the lock" in capsys.readouterr().out
    lock.write_text('{"pid": 12')  # Cut short by a crash: nobody to name, so it is taken over too.
    with workdir_lib.RunLock(workdir):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "Taking over the lock" in capsys.readouterr().out
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "start": "1", "since": "then"}))
    with pytest.raises(workdir_lib.WorkdirBusyError, match="pid 1 on host elsewhere.*delete the lock file"):
        workdir_lib.RunLock(workdir).acquire()


def test_on_several_processes_only_process_0_takes_the_lock_and_all_follow_it(tmp_path, monkeypatch):
    """Simulated processes 0 and 1 of 2 (the broadcast stands for the collective that carries process 0's outcome)."""
    from jax.experimental import multihost_utils

    sent = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: sent.append(int(x)) or int(x))
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with workdir_lib.RunLock(tmp_path):
        assert not (tmp_path / "run.lock").exists()  # Process 1 never touches the file.
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: 1)  # Process 0 failed.
    with pytest.raises(workdir_lib.WorkdirBusyError, match="see process 0's error"):
        workdir_lib.RunLock(tmp_path).__enter__()
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: sent.append(int(x)) or int(x))
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    with workdir_lib.RunLock(tmp_path):
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
        with pytest.raises(workdir_lib.WorkdirBusyError, match=f"pid {os.getpid()}"):
            workdir_lib.RunLock(tmp_path).__enter__()  # Busy: process 0 tells the others (it sends 1).
    assert sent == [0, 0, 1]


# --- A changed config on resume --------------------------------------------------------------------------------


def _resumable(tmp_path, overrides=()) -> pathlib.Path:
    """A workdir as a run of the demo leaves it: config.json and a checkpoint folder (enough to be compared)."""
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "4").mkdir(parents=True)
    save_config(load_config(DEMO, ["--config.total_steps=4", *overrides]), workdir / "config.json")
    return workdir


def _listing(workdir: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(workdir)): p.read_bytes() if p.is_file() else b"" for p in workdir.rglob("*")}


def test_a_shape_changing_difference_is_refused_even_when_allowed_and_nothing_is_written(tmp_path, capsys):
    workdir = _resumable(tmp_path)
    before = _listing(workdir)
    args = ["train", "--config", DEMO, "--workdir", str(workdir), "--config.total_steps=4", "--allow-config-change"]
    assert cli.main([*args, "--config.input.res=128", "--config.trainable_dtype=bfloat16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "change the training state or optimizer (input.res, trainable_dtype)" in err[0]
    assert "input.res: 64 -> 128" in err[0] and "Use a new --workdir" in err[0]
    assert _listing(workdir) == before  # config.json byte-identical; no lock, metrics or checkpoint left.


def test_other_differences_need_the_flag_and_free_keys_do_not(tmp_path, capsys, monkeypatch):
    workdir = _resumable(tmp_path)
    before = _listing(workdir)
    args = ["train", "--config", DEMO, "--workdir", str(workdir), "--config.total_steps=4"]
    assert cli.main([*args, "--config.lr=3.0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lr: 0.001 -> 3.0. Pass --allow-config-change" in err[0]
    assert _listing(workdir) == before

    seen = []  # What the run would resume with (the compare is done; the training itself is not needed here).
    monkeypatch.setattr(train, "_run", lambda config, workdir, change, stop: seen.append(change) or {})
    assert cli.main([*args, "--config.lr=3.0", "--allow-config-change"]) == 0
    assert seen[-1].changes == {"lr": (0.001, 3.0)} and seen[-1].previous["lr"] == 0.001
    # Console, logging services, reading threads and checkpoint cadence change no result: no change at all.
    free = ["--config.quiet=True", "--config.input.num_workers=0", "--config.keep_ckpts=5", "--config.ckpt_steps=1"]
    assert cli.main([*args, *free]) == 0 and seen[-1] is None


def test_an_unreadable_saved_config_is_refused_naming_it(tmp_path):
    workdir = _resumable(tmp_path)
    (workdir / "config.json").write_text("{not json")
    with pytest.raises(workdir_lib.ConfigChangeError, match=r"config\.json cannot be read"):
        workdir_lib.compare_config(load_config(DEMO, ["--config.total_steps=4"]), workdir, allow=False)
    # Without a checkpoint there is nothing to resume: any config starts afresh.
    (workdir / "checkpoints" / "4").rmdir()
    assert workdir_lib.compare_config(load_config(DEMO, ["--config.lr=9.0"]), workdir, allow=False) is None
