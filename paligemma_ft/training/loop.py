"""The trainer: `run(config, workdir)` (the step is `training.step`, the set-up `training.setup`).

A run is resumable: orbax checkpoints in `workdir/checkpoints` hold the parameters, optimizer state, step, RNG and
the data iterator's state, so running the same config on the same workdir again continues where it stopped (and on
CPU ends bitwise where an uninterrupted run ends). Metrics go to `workdir/metrics.jsonl` (one JSON object per line,
each with `step`), the resolved config to `workdir/config.json`, skipped training examples to
`workdir/bad_input.jsonl`, evaluation predictions and galleries to `workdir/eval/`, the fine-tuned parameters to
`workdir/params.npz` (big_vision's layout; a LoRA run merges its adapters into it and also writes `adapters.npz`
and a PEFT folder `peft/`, `adapters.export_run`) and a report to `workdir/report.md` with `curves.png` at the end.

The loop never waits for the devices without need: it dispatches step N + 1 and moves batch N + 2 to the devices
before it reads step N's metrics back (nanodo's loop), so the NaN check, the logs and the progress bar lag one step.
It waits for a step only to checkpoint or evaluate after it (a step with non-finite metrics is never saved).
One run holds a workdir at a time (`workdir.RunLock`); a resume compares its config with the saved one before
writing anything (`workdir.compare_config`); SIGTERM / SIGINT stop it after a checkpoint (`preemption`).
"""

from __future__ import annotations

import logging
import os
import pathlib
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from tqdm import auto as tqdm

from paligemma_ft import adapters as adapters_lib
from paligemma_ft import config as config_lib
from paligemma_ft import config_base, flops, multihost
from paligemma_ft import data as data_lib
from paligemma_ft import predictor as predictor_lib
from paligemma_ft import sharding as sharding_lib
from paligemma_ft.checkpoints import npz as ckpt_lib
from paligemma_ft.checkpoints import state as train_state
from paligemma_ft.evaluate.runner import run_evals
from paligemma_ft.training import report as run_report
from paligemma_ft.training import step as step_lib
from paligemma_ft.training import workdir as workdir_lib
from paligemma_ft.training.preemption import Stopped, StopSignals
from paligemma_ft.training.setup import Setup, init_state, setup

log = logging.getLogger(__name__)
BATCH_KEYS = ("image", "text", "mask_ar", "mask_loss", "_mask")
LOSS_TOKEN_CHECK_STEPS = 3  # A run whose first batches hold no loss token at all stops (nothing would be learned).


class NonFiniteLossError(FloatingPointError, ValueError):
    """The loss or gradient norm became NaN or infinite (e.g. a learning rate too high); names the step."""


class NoLossTokensError(ValueError):
    """No example in the first batches has a position with loss (every target cut away, or empty)."""


# --- Pieces of the run -----------------------------------------------------------------------------------------


def _eval_due(ecfg: Mapping[str, Any], step: int, total: int) -> bool:
    """big_vision's schedule: at step 0 (unless `skip_first`), every `log_steps` (or `log_percent`), at the end."""
    if step == 0:
        return not ecfg.get("skip_first", False)
    if step == total:
        return True
    every = ecfg.get("log_steps") or (int(total * ecfg["log_percent"]) if ecfg.get("log_percent") else 0)
    return bool(every) and step % int(every) == 0


def eval_key(seed: int, step: int, name: str) -> jax.Array:
    """The sampling key of evaluator `name` at training step `step`: the same in a resumed and an uninterrupted
    run (crc32, not `hash`, which Python salts per process)."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    return jax.random.fold_in(key, zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF)


class _Loggers:
    """metrics.jsonl, plus TensorBoard (tensorboardX) and Weights & Biases when available / configured."""

    def __init__(self, workdir: pathlib.Path, config: Any):
        self.jsonl = run_report.MetricsLog(workdir / "metrics.jsonl")
        self.tb = self.wandb = None
        if jax.process_index() != 0:
            return
        try:
            from tensorboardX import SummaryWriter  # noqa: PLC0415 - optional.

            self.tb = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:
            pass
        if wb := config.wandb:
            import wandb  # noqa: PLC0415 - optional: only when configured.

            wb = wb.to_dict() if hasattr(wb, "to_dict") else dict(wb)
            self.wandb = wandb.init(**wb, config=config_lib.redact(config.to_dict()), resume="allow")

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if jax.process_index() != 0:
            return
        self.jsonl.write(step, metrics)
        for k, v in metrics.items():
            if self.tb is not None:
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(dict(metrics), step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class _StepMetrics:
    """Reads the metrics of dispatched steps back to the host, in order and one step late: checks them (finite,
    loss tokens present), times them, logs them and moves the progress bar."""

    def __init__(self, config: Any, s: Setup, loggers: _Loggers, bar: Any, manager: Any, start: int):
        self.config, self.s, self.loggers, self.bar, self.manager = config, s, loggers, bar, manager
        self.batch_size, self.total = int(config.input.batch_size), int(config.total_steps)
        self.pending: list[tuple[int, Any]] = []
        self.last: dict[str, float] = {}
        self.flops_per_example: float | None = None
        self.check_tokens = start == 0  # The first batches' loss tokens (a resumed run was checked before).
        self.tokens_seen = 0.0
        self.warned = False
        self.clock = time.perf_counter()

    def restart_clock(self) -> None:
        """After an evaluation or a checkpoint: the next step's time counts from now."""
        self.clock = time.perf_counter()

    def read(self, upto: int) -> None:
        """Reads (waiting for them) the metrics of every dispatched step up to `upto`."""
        while self.pending and self.pending[0][0] <= upto:
            step, on_device = self.pending.pop(0)
            metrics = {k: float(v) for k, v in jax.device_get(on_device).items()}
            now = time.perf_counter()
            dt, self.clock = now - self.clock, now  # Between two steps' ends: the loop's real pace.
            self._check_finite(step, metrics)
            metrics["train/step_seconds"] = dt
            metrics["train/examples_per_sec"] = self.batch_size / max(dt, 1e-9)
            if self.flops_per_example and (
                mfu := flops.mfu(
                    self.flops_per_example, metrics["train/examples_per_sec"], num_devices=self.s.mesh.size
                )
            ):
                metrics["train/mfu"] = mfu  # None on CPUs (no known peak).
            self.loggers.write(step, metrics)
            self._check_data(step, metrics)  # After logging: the zeros it stops on are in metrics.jsonl.
            self.last.update(metrics)
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{metrics['train/loss']:.4f}",
                lr=f"{metrics.get('train/lr', 0):.3g}",
                ex_per_s=f"{metrics['train/examples_per_sec']:.1f}",
            )

    def _check_finite(self, step: int, metrics: dict[str, float]) -> None:
        loss, norm = metrics["train/loss"], metrics["train/grad_norm"]
        if not np.isfinite(loss) or not np.isfinite(norm):
            latest = self.manager.latest_step()
            where = (
                f"last good checkpoint: step {latest} in {self.manager.directory}"
                if latest is not None
                else "no checkpoint was saved before it"
            )
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {step} (loss {loss}, grad norm {norm}); {where}. A lower "
                "--config.lr or a --config.grad_clip_norm usually helps."
            )

    def _check_data(self, step: int, metrics: dict[str, float]) -> None:
        text_len = int(self.config.input.text_len)
        if metrics["train/truncated"] and not self.warned and not self.config.quiet:
            self.warned = True
            tqdm.tqdm.write(
                f"warning: {metrics['train/truncated']:.0f} of {self.batch_size} examples of step {step} are longer "
                f"than input.text_len={text_len} tokens and were cut (a cut target loses its end); every step's "
                "count is train/truncated in metrics.jsonl."
            )
        if self.check_tokens and step <= LOSS_TOKEN_CHECK_STEPS:
            self.tokens_seen += metrics["train/loss_tokens"]
            if step == min(LOSS_TOKEN_CHECK_STEPS, self.total) and self.tokens_seen == 0:
                raise NoLossTokensError(
                    f"no example in the first {step} training batches has a token with loss (train/loss_tokens is "
                    f"0, so the loss is 0 and nothing is learned): with input.text_len={text_len} the prefix fills "
                    "every sequence, or every target is empty. Raise --config.input.text_len or shorten the "
                    "prefixes (paligemma-ft inspect --config ... shows the tokens of a batch)."
                )


def _data_lines(rows: list[dict], bad: data_lib.BadInputReport, listed_at: str | None, config: Any) -> list[str]:
    """What the run's data held back: truncated examples (summed from `train/truncated`), skipped ones and where
    they are listed."""
    counted = [r for r in rows if "train/truncated" in r]
    cut, seen = sum(r["train/truncated"] for r in counted), len(counted) * int(config.input.batch_size)
    lines = [
        f"Truncated: {cut:.0f} of {seen} training examples ({100 * cut / max(seen, 1):.1f} %) were longer than "
        f"input.text_len={int(config.input.text_len)} tokens and were cut (per step: train/truncated)."
    ]
    if counts := bad.counts:
        parts = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))
        where = f"listed by file and line in {listed_at}" if listed_at else "not listed"
        lines.append(f"Bad input: {sum(counts.values())} training examples skipped ({parts}), {where}.")
    else:
        lines.append("Bad input: no training example skipped.")
    return lines


# --- The run ---------------------------------------------------------------------------------------------------


def run(config: Any, workdir: str | os.PathLike) -> dict[str, float]:
    """Trains `config.total_steps` steps in `workdir`, resuming from its latest checkpoint if there is one.

    Returns:
      The last logged metrics (training and evaluation), as plain floats.

    Raises:
      workdir.WorkdirBusyError: another run uses `workdir`.
      workdir.ConfigChangeError: the workdir's checkpoints were written with another config (see
        `workdir.compare_config`); nothing is written.
      preemption.Stopped: SIGTERM or SIGINT arrived; the run saved a checkpoint at the step it reached.
      NonFiniteLossError, NoLossTokensError: see their docstrings.
    """
    config = config_base.complete(config)
    config_base.validate(config)
    config_base.check_data_paths(config)  # The trainer reads its data: a path built from an unset data_dir fails.
    sharding_lib.maybe_initialize_distributed(config)
    if cache_dir := config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir))
    workdir = pathlib.Path(workdir)
    with workdir_lib.RunLock(workdir), StopSignals() as signals:
        change = workdir_lib.compare_config(config, workdir, allow=bool(config.allow_config_change))
        return _run(config, workdir, change, lambda: signals.requested)


def _run(
    config: Any, workdir: pathlib.Path, change: workdir_lib.ConfigChange | None, stop: Callable[[], int | None]
) -> dict[str, float]:
    s = setup(config)
    tok = s.tok
    assert tok is not None  # Loaded by every setup but a shapes-only one (plan).
    total_steps = int(config.total_steps)
    bad = data_lib.BadInputReport()
    train_iter = data_lib.make_train_iter(config.input, tok, report=bad)
    manager = train_state.make_manager(workdir / "checkpoints", max_to_keep=config.keep_ckpts)
    restored = train_state.restore_latest(manager, s.state_abstract, s.state_shard, check_data=train_iter.check_states)
    restored_step = None if restored is None else int(restored[0]["step"])
    if restored is not None:
        state, data_state = restored
        train_iter.set_state(data_state)
        step = int(state["step"])
        workdir_lib.load_bad_input(bad, workdir)  # Examples skipped before the interruption stay listed.
    else:
        workdir_lib.fresh_start(workdir)  # No checkpoint: whatever was logged is redone from step 0.
        state, step = init_state(s, int(config.seed)), 0
    workdir_lib.write_config(config, workdir, change if restored is not None else None, step)
    loggers = _Loggers(workdir, config)
    if restored is not None:
        dropped = loggers.jsonl.rewind(step) if jax.process_index() == 0 else 0  # Process 0 owns the file.
        print(f"Resuming {workdir} from step {step} ({dropped} metrics rows after it will be redone).")
    overview = run_report.param_overview(state["params"], s.trainable, s.state_shard["params"])
    if not config.quiet:
        print(f"Devices: {jax.device_count()} x {jax.devices()[0].device_kind}, mesh {dict(s.mesh.shape)}")
        print(overview)

    step_fn = step_lib.jit_train_step(
        s.model,
        s.tx,
        s.trainable,
        step_lib.StepConfig.from_config(config, eos_id=tok.eos_id),
        sched_fn=s.sched_fn,
        state_shardings=s.state_shard,
        batch_sharding=s.batch_shard,
    )
    predictor = predictor_lib.Predictor(s.model, None, tok, res=s.res)
    evals = {k: (v.to_dict() if hasattr(v, "to_dict") else dict(v)) for k, v in config.evals.items()}

    def evaluate(at: int) -> dict[str, float]:
        due = [name for name, e in evals.items() if _eval_due(e, at, total_steps)]
        if not due or stop():
            return {}  # After a stop request the evaluation is left to the resumed run (its rows are rewound).
        predictor.params = state["params"]
        t, out = time.perf_counter(), {}
        for name in due:  # Sampling keys from (seed, step, evaluator): a resumed run samples the same.
            predictor.reseed(eval_key(int(config.seed), at, name))
            out.update(run_evals(config, predictor, workdir / "eval", at, names=[name]))
        loggers.write(at, {**out, "eval/seconds": time.perf_counter() - t})
        return out

    def save(at: int) -> None:
        train_state.save(manager, at, state, data_state)
        workdir_lib.write_bad_input(bad, workdir)

    def fetch() -> tuple[dict[str, jax.Array], dict, dict[str, np.ndarray]]:
        """The next batch on the devices, the iterator's state after it (a checkpoint of its step needs it)."""
        host = next(train_iter)
        after = train_iter.get_state()
        on_devices = {k: jax.make_array_from_process_local_data(s.batch_shard, np.asarray(host[k])) for k in BATCH_KEYS}
        return on_devices, after, host

    timings: dict[str, float] = {}
    evaluated = evaluate(step)  # Step 0, or the restored step (its evaluations were rewound).
    ckpt_steps, saved = int(config.ckpt_steps or 0), restored_step
    bar = tqdm.tqdm(
        total=total_steps, initial=step, desc="train", unit="step", disable=config.quiet or jax.process_index() != 0
    )
    reader = _StepMetrics(config, s, loggers, bar, manager, step)
    reader.last.update(evaluated)
    data_state = train_iter.get_state()
    try:
        if step < total_steps:
            batch, next_data_state, host = fetch()
            t = time.perf_counter()
            compiled = step_fn.lower(state, batch).compile()
            timings["compile seconds"] = time.perf_counter() - t
            loss_tokens = float(np.asarray(host["mask_loss"])[:, 1:].sum(1).mean())  # This process's rows.
            reader.flops_per_example = flops.train_flops_per_example(
                {"img": s.model.img, "llm": s.model.llm},
                s.res,
                s.text_len,
                loss_tokens=round(loss_tokens),
                trainable=s.trainable,
                lora=s.model.lora,
            )
            reader.restart_clock()
        while step < total_steps and not stop():
            data_state = next_data_state
            state, metrics = compiled(state, batch)  # Dispatched: runs while the host goes on.
            step += 1
            reader.pending.append((step, metrics))
            if step < total_steps:
                batch, next_data_state, _ = fetch()  # Read and moved to the devices during the step.
            reader.read(step - 1)  # The previous step's metrics: ready, or nearly.
            ckpt_due = (ckpt_steps and step % ckpt_steps == 0) or step == total_steps
            eval_due = step < total_steps and any(_eval_due(e, step, total_steps) for e in evals.values())
            if ckpt_due or eval_due:
                reader.read(step)  # Waits for this step: a step with non-finite metrics is never saved.
                if ckpt_due:
                    save(step)
                    saved = step
                if eval_due:
                    reader.last.update(evaluate(step))
                reader.restart_clock()
        reader.read(step)
        if signum := stop():
            if saved != step:
                save(step)
            manager.wait_until_finished()
            bar.close()
            loggers.close()
            print(f"stopped at step {step}; rerun the same command to resume", flush=True)
            raise Stopped(signum, step)
    except BaseException:  # Ctrl-C or a crash: let an asynchronous save finish, so its checkpoint is usable.
        try:
            manager.wait_until_finished()
        except Exception:  # noqa: BLE001 - the original error matters more; older checkpoints stay usable.
            log.exception("checkpoint save in flight failed")
        raise
    bar.close()
    bad_file = workdir_lib.write_bad_input(bad, workdir)
    manager.wait_until_finished()
    last = reader.last
    if restored_step is None or restored_step < total_steps:
        last.update(evaluate(total_steps))
    params = multihost.to_host(state["params"])  # Every process (a collective for arrays sharded across them).
    if jax.process_index() == 0:
        if s.model.lora is not None:  # params.npz with the adapters merged, adapters.npz, peft/.
            exported = adapters_lib.export_run(
                workdir, params, s.model, s.path, preset=config.model_name_or_preset, dont_load=s.dont_load
            )
        else:
            ckpt_lib.save_params(workdir / "params.npz", params)
            exported = [str(workdir / "params.npz")]
        del params  # The host copy is written; the report needs none of it.
        rows = loggers.jsonl.rows()
        steps_s = [r["train/step_seconds"] for r in rows if "train/step_seconds" in r][1:]
        if steps_s:
            timings["median step seconds"] = float(np.median(steps_s))
        link = f"[{bad_file.name}]({bad_file.name})" if bad_file else None
        sections = [("Data", "\n".join(f"- {line}" for line in _data_lines(rows, bad, link, config)))]
        sections += [("Config changes", c) for c in [workdir_lib.config_changes_markdown(workdir)] if c]
        report = run_report.write_report(workdir, config, s.mesh, overview, timings, sections=sections)
        truncation, skipped = _data_lines(rows, bad, str(bad_file) if bad_file else None, config)
        if not config.quiet:
            print(truncation)
        if bad.counts or not config.quiet:  # Skipped examples are told even to a quiet run.
            print(skipped)
        if not config.quiet:
            print(run_report.console_summary(rows, workdir / "eval", limit=int(config.show_predictions)))
            print(f"Wrote {', '.join(exported)}, {report} and {workdir / 'metrics.jsonl'}.")
    loggers.close()
    manager.close()
    return last
