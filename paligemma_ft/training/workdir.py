"""The run's folder: one run at a time (`RunLock`), a resumed run's config against the saved one
(`compare_config`), and the list of skipped training examples (`bad_input.jsonl`).

    workdir/run.lock              {"pid", "host", "start", "since"} of the run using the folder (removed at exit)
    workdir/config.json           the config of the run that wrote the checkpoints (every declared key)
    workdir/config_changes.jsonl  one row per resume with an allowed change: step, changed keys, previous config
    workdir/bad_input.jsonl       every skipped training example: file, line, reason, detail
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import socket
import time
from collections.abc import Mapping
from typing import Any

import jax

from paligemma_ft import config as config_lib
from paligemma_ft.data import BadInputReport
from paligemma_ft.data.transforms import BadExample

log = logging.getLogger(__name__)
LOCK_NAME = "run.lock"

# Keys that change no result of a run (console, logging services, addresses, reading threads, checkpoint
# cadence): a resume may change them freely, and they are not recorded.
FREE_KEYS = (
    "quiet",
    "show_predictions",
    "compilation_cache_dir",
    "allow_config_change",
    "wandb",
    "distributed",
    "input.num_workers",
    "input.prefetch",
    "ckpt_steps",
    "keep_ckpts",
)
# Keys that change the training state's shapes, dtypes or structure, or the optimizer: a checkpoint written
# under the old values cannot continue under the new ones, whatever `allow_config_change` says.
STATE_KEYS = (
    "model_name_or_preset",
    "model",
    "model_init",
    "input.res",
    "trainable_dtype",
    "frozen_dtype",
    "lora",
    "schedule",
    "optax_name",
    "optax",
)


class WorkdirBusyError(ValueError):
    """Another run holds the workdir's lock (a ValueError: the command line reports it as one `error:` line)."""


class ConfigChangeError(ValueError):
    """A resume whose config differs from the saved one in a way that is refused (the message lists the keys)."""


# --- One run per workdir ---------------------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux `/proc`), telling a reused pid apart; None
    where `/proc` is missing."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Exists, owned by someone else.
        pass
    return start is None or _start_time(pid) in (None, start)


class RunLock:
    """`workdir/run.lock`, created atomically, holding this process's pid and host (a context manager).

    A lock whose holder is gone (a dead pid on this host, or a pid now used by another process) is taken over,
    with a message on the console. On several processes (multi-host), process 0 takes the lock and the others
    learn the outcome from it, so that they all fail or all go on.

    Raises (on entering):
      WorkdirBusyError: a live run holds the lock, or a run on another host does (which cannot be checked from
        here); the message names its pid, host and start, and the lock file.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.path = pathlib.Path(workdir) / LOCK_NAME
        self.mine = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start": _start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self.held = False

    def _read(self, path: pathlib.Path | None = None) -> dict | None:
        """The holder in the lock file (or `path`); None when there is no file, {} when it is damaged (a write cut
        short: nobody can be named, and it is treated as stale)."""
        try:
            holder = json.loads((path or self.path).read_text(encoding="utf-8"))
            return holder if isinstance(holder, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _stale(self, holder: dict) -> bool:
        if not holder or "pid" not in holder:
            return True
        if holder.get("host") != self.mine["host"]:
            return False  # Another machine's process: it cannot be checked from here.
        return not _alive(int(holder["pid"]), holder.get("start"))

    def _busy(self, holder: dict) -> WorkdirBusyError:
        return WorkdirBusyError(
            f"workdir {self.path.parent} is in use by another run: pid {holder.get('pid')} on host "
            f"{holder.get('host')}, since {holder.get('since')} (lock file {self.path}). Wait for that run to end, "
            "or use another --workdir; if that run is gone (e.g. its machine was shut down), delete the lock file."
        )

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.mine) + "\n", encoding="utf-8")
        try:
            for _ in range(5):  # A few rounds: another newcomer may take over a stale lock at the same moment.
                try:
                    os.link(tmp, self.path)  # Atomic: fails when the lock exists.
                    self.held = True
                    return
                except FileExistsError:
                    pass
                holder = self._read()
                if holder is None:
                    continue  # Released meanwhile.
                if not self._stale(holder):
                    raise self._busy(holder)
                aside = self.path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue
                if self._read(aside) not in (holder, {}):
                    with contextlib.suppress(FileExistsError):
                        os.link(aside, self.path)  # Took a newcomer's fresh lock: give it back.
                    aside.unlink()
                    continue
                aside.unlink()
                print(
                    f"Taking over the lock of {self.path.parent} from a run that is gone (pid {holder.get('pid')} "
                    f"on {holder.get('host')}, since {holder.get('since')})."
                )
            raise self._busy(self._read() or {})
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        """Removes the lock if this process holds it (safe to call twice, or from a signal handler)."""
        if self.held and self._read() == self.mine:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> RunLock:
        if jax.process_count() == 1:
            self.acquire()
            return self
        from jax.experimental import multihost_utils  # noqa: PLC0415 - multi-host only.

        error = None
        if jax.process_index() == 0:
            try:
                self.acquire()
            except WorkdirBusyError as e:
                error = e
        failed = bool(multihost_utils.broadcast_one_to_all(jax.numpy.int32(error is not None)))
        if error is not None:
            raise error
        if failed:
            raise WorkdirBusyError(f"workdir {self.path.parent} is in use by another run (see process 0's error).")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# --- Config changes on resume ----------------------------------------------------------------------------------


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _under(key: str, groups: tuple[str, ...]) -> bool:
    return any(key == g or key.startswith(g + ".") for g in groups)


def as_saved(config: Any) -> dict:
    """The config as `config.json` holds it (credentials dropped, tuples as lists, other values as strings)."""
    tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(config_lib.redact(tree), sort_keys=True, default=str))


@dataclasses.dataclass
class ConfigChange:
    """An allowed difference between a resumed run's config and the saved one."""

    changes: dict[str, tuple[Any, Any]]  # Dotted key -> (saved value, new value).
    previous: dict  # The saved config.json.


def has_checkpoints(workdir: pathlib.Path) -> bool:
    folder = workdir / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def compare_config(config: Any, workdir: str | os.PathLike, *, allow: bool) -> ConfigChange | None:
    """Compares `config` with `workdir/config.json` when the workdir has checkpoints to resume; writes nothing.

    Returns:
      None when there is nothing to resume or the configs agree (keys in `FREE_KEYS` aside); a `ConfigChange` when
      they differ and `allow` is set.

    Raises:
      ConfigChangeError: a key in `STATE_KEYS` differs (always refused), or another key differs and `allow` is
        not set; the message lists each key with both values and says what to do.
    """
    workdir = pathlib.Path(workdir)
    path = workdir / "config.json"
    if not has_checkpoints(workdir) or not path.exists():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        if allow:
            return ConfigChange({"config.json": ("unreadable", "this config")}, {})
        raise ConfigChangeError(
            f"{path} cannot be read ({e}), so this config cannot be compared with the one the checkpoints in "
            f"{workdir} were written with; pass --allow-config-change to resume anyway, or use a new --workdir"
        ) from None
    old, new = _flat(saved), _flat(as_saved(config))
    diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    diff = {k: v for k, v in diff.items() if not _under(k, FREE_KEYS)}
    if not diff:
        return None
    shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:8])
    shown += f"; and {len(diff) - 8} more" if len(diff) > 8 else ""
    state = [k for k in diff if _under(k, STATE_KEYS)]
    if state:
        raise ConfigChangeError(
            f"this config differs from the one the checkpoints in {workdir} were written with ({path}) in keys that "
            f"change the training state or optimizer ({', '.join(state)}), so the run cannot resume: {shown}. "
            "Use a new --workdir for this config, or run with the saved one."
        )
    if not allow:
        raise ConfigChangeError(
            f"this config differs from the one the checkpoints in {workdir} were written with ({path}): {shown}. "
            "Pass --allow-config-change (or --config.allow_config_change=True) to resume with the new values (the "
            "report records both configs), run with the saved config, or use a new --workdir."
        )
    return ConfigChange(diff, saved)


def write_config(config: Any, workdir: pathlib.Path, change: ConfigChange | None, step: int) -> None:
    """Writes `config.json` (process 0), and with a change first appends it to `config_changes.jsonl` at `step`."""
    if jax.process_index() != 0:
        return
    if change is not None:
        row = {"step": step, "changes": {k: list(v) for k, v in change.changes.items()}, "previous": change.previous}
        with open(workdir / "config_changes.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=str) + "\n")
        print(f"Resuming at step {step} with a changed config: {', '.join(change.changes)} (recorded in the report).")
    config_lib.save_config(config, workdir / "config.json")


def config_changes(workdir: pathlib.Path) -> list[dict]:
    """The rows of `config_changes.jsonl` (empty when the config never changed)."""
    path = workdir / "config_changes.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def config_changes_markdown(workdir: pathlib.Path) -> str:
    """The report's record of resumes with a changed config: the step, each key's two values, the old config."""
    out = []
    for row in config_changes(workdir):
        out += [f"Resumed at step {row['step']} with a changed config:", "", "| key | before | after |"]
        out.append("|---|---|---|")
        out += [f"| `{k}` | `{json.dumps(a)}` | `{json.dumps(b)}` |" for k, (a, b) in row["changes"].items()]
        out += ["", f"<details><summary>The config before step {row['step']}</summary>", "", "```json"]
        out += [json.dumps(row["previous"], indent=2, sort_keys=True), "```", "", "</details>", ""]
    return "\n".join(out)


# --- Skipped training examples ---------------------------------------------------------------------------------


def bad_input_path(workdir: pathlib.Path) -> pathlib.Path:
    """`bad_input.jsonl` (process 0), `bad_input.process<i>.jsonl` on other processes (each lists its shard)."""
    i = jax.process_index()
    return workdir / ("bad_input.jsonl" if i == 0 else f"bad_input.process{i}.jsonl")


def load_bad_input(report: BadInputReport, workdir: pathlib.Path) -> None:
    """Adds the examples an earlier part of this run listed (a resumed run keeps listing them)."""
    path = bad_input_path(workdir)
    if not path.exists():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):  # A line cut by a crash.
            row = json.loads(line)
            report.add(BadExample(row["reason"], row.get("detail") or "", file=row.get("file"), line=row.get("line")))


def write_bad_input(report: BadInputReport, workdir: pathlib.Path) -> pathlib.Path | None:
    """Writes the list (atomically) when there is something to list; returns its path, or None."""
    if not len(report):
        return None
    path = bad_input_path(workdir)
    tmp = path.with_name(path.name + ".tmp")
    report.write(tmp)
    os.replace(tmp, path)
    return path


def fresh_start(workdir: pathlib.Path) -> None:
    """Removes what a previous run left without a checkpoint to resume (its rows are redone from step 0)."""
    if jax.process_index() == 0:
        for name in ("metrics.jsonl", "config_changes.jsonl"):
            (workdir / name).unlink(missing_ok=True)
    bad_input_path(workdir).unlink(missing_ok=True)
