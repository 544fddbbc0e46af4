"""The trainer: `run(config, workdir)` (the step is `training.step`, the set-up `training.setup`).

A run is resumable: orbax checkpoints in `workdir/checkpoints` hold the parameters, optimizer state, step, RNG and
the data iterator's state, so running the same config on the same workdir again continues where it stopped (and on
CPU ends bitwise where an uninterrupted run ends). Metrics go to `workdir/metrics.jsonl` (one JSON object per line,
each with `step`), the resolved config to `workdir/config.json`, evaluation predictions and galleries to
`workdir/eval/`, the fine-tuned parameters to `workdir/params.npz` (big_vision's layout) and a report to
`workdir/report.md` with `curves.png` at the end.
"""

from __future__ import annotations

import logging
import os
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from tqdm import auto as tqdm

from paligemma_ft import config as config_lib
from paligemma_ft import config_base, flops
from paligemma_ft import data as data_lib
from paligemma_ft import predictor as predictor_lib
from paligemma_ft import sharding as sharding_lib
from paligemma_ft.checkpoints import npz as ckpt_lib
from paligemma_ft.checkpoints import state as train_state
from paligemma_ft.evaluate.runner import run_evals
from paligemma_ft.training import report as run_report
from paligemma_ft.training import step as step_lib
from paligemma_ft.training.setup import init_state, setup

log = logging.getLogger(__name__)
BATCH_KEYS = ("image", "text", "mask_ar", "mask_loss", "_mask")


# --- Set-up ----------------------------------------------------------------------------------------------------


def _eval_due(ecfg: Mapping[str, Any], step: int, total: int) -> bool:
    """big_vision's schedule: at step 0 (unless `skip_first`), every `log_steps` (or `log_percent`), at the end."""
    if step == 0:
        return not ecfg.get("skip_first", False)
    if step == total:
        return True
    every = ecfg.get("log_steps") or (int(total * ecfg["log_percent"]) if ecfg.get("log_percent") else 0)
    return bool(every) and step % int(every) == 0


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


# --- The run ---------------------------------------------------------------------------------------------------


def run(config: Any, workdir: str | os.PathLike) -> dict[str, float]:
    """Trains `config.total_steps` steps in `workdir`, resuming from its latest checkpoint if there is one.

    Returns:
      The last logged metrics (training and evaluation), as plain floats.
    """
    config = config_base.complete(config)
    config_base.validate(config)
    config_base.check_data_paths(config)  # The trainer reads its data: a path built from an unset data_dir fails.
    sharding_lib.maybe_initialize_distributed(config)
    if cache_dir := config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir))
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config_lib.save_config(config, workdir / "config.json")
    s = setup(config)
    tok = s.tok
    assert tok is not None  # Loaded by every setup but a shapes-only one (plan).
    total_steps, batch_size = int(config.total_steps), int(config.input.batch_size)
    b_shard = s.batch_shard

    train_iter = data_lib.make_train_iter(config.input, tok)
    manager = train_state.make_manager(workdir / "checkpoints", max_to_keep=config.keep_ckpts)
    loggers = _Loggers(workdir, config)
    restored = train_state.restore_latest(manager, s.state_abstract, s.state_shard)
    restored_step = None if restored is None else int(restored[0]["step"])
    if restored is not None:
        state, data_state = restored
        train_iter.set_state(data_state)
        step = int(state["step"])
        dropped = loggers.jsonl.rewind(step)
        print(f"Resuming {workdir} from step {step} ({dropped} metrics rows after it will be redone).")
    else:
        if loggers.jsonl.path.exists():
            loggers.jsonl.path.unlink()  # No checkpoint: whatever was logged is redone from step 0.
        state = init_state(s, int(config.seed))
        step = 0
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
        batch_sharding=b_shard,
    )
    predictor = predictor_lib.Predictor(s.model, None, tok, res=s.res)
    evals = {k: (v.to_dict() if hasattr(v, "to_dict") else dict(v)) for k, v in config.evals.items()}

    def evaluate(at: int) -> dict[str, float]:
        due = [name for name, e in evals.items() if _eval_due(e, at, total_steps)]
        if not due:
            return {}
        predictor.params = state["params"]
        t = time.perf_counter()
        out = run_evals(config, predictor, workdir / "eval", at, names=due)
        loggers.write(at, {**out, "eval/seconds": time.perf_counter() - t})
        return out

    last: dict[str, float] = {}
    timings: dict[str, float] = {}
    last.update(evaluate(step))  # Step 0, or the restored step (its evaluations were rewound).
    ckpt_steps = int(config.ckpt_steps or 0)
    bar = tqdm.tqdm(
        total=total_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=config.quiet or jax.process_index() != 0,
    )
    compiled = None
    try:
        while step < total_steps:
            batch = next(train_iter)
            batch = {k: jax.make_array_from_process_local_data(b_shard, np.asarray(batch[k])) for k in BATCH_KEYS}
            if compiled is None:
                t = time.perf_counter()
                compiled = step_fn.lower(state, batch).compile()
                timings["compile seconds"] = time.perf_counter() - t
                loss_tokens = float(np.asarray(jax.device_get(batch["mask_loss"]))[:, 1:].sum(1).mean())
                fpe = flops.train_flops_per_example(
                    {"img": s.model.img, "llm": s.model.llm},
                    s.res,
                    s.text_len,
                    loss_tokens=round(loss_tokens),
                    trainable=s.trainable,
                )
            t = time.perf_counter()
            state, metrics = compiled(state, batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            dt = time.perf_counter() - t
            step += 1
            if not np.isfinite(metrics["train/loss"]) or not np.isfinite(metrics["train/grad_norm"]):
                raise FloatingPointError(
                    f"non-finite loss or gradient at step {step} (loss {metrics['train/loss']}, "
                    f"grad norm {metrics['train/grad_norm']}); last good checkpoint: step "
                    f"{manager.latest_step()} in {workdir / 'checkpoints'}"
                )
            metrics["train/step_seconds"] = dt
            metrics["train/examples_per_sec"] = batch_size / max(dt, 1e-9)
            if (mfu := flops.mfu(fpe, metrics["train/examples_per_sec"], num_devices=s.mesh.size)) is not None:
                metrics["train/mfu"] = mfu  # None on CPUs (no known peak).
            loggers.write(step, metrics)
            last.update(metrics)
            bar.update(1)
            bar.set_postfix(
                loss=f"{metrics['train/loss']:.4f}",
                lr=f"{metrics.get('train/lr', 0):.3g}",
                ex_per_s=f"{metrics['train/examples_per_sec']:.1f}",
            )
            if (ckpt_steps and step % ckpt_steps == 0) or step == total_steps:
                train_state.save(manager, step, state, train_iter.get_state())
            if step < total_steps:
                last.update(evaluate(step))
    except BaseException:  # Ctrl-C or a crash: let an asynchronous save finish, so its checkpoint is usable.
        try:
            manager.wait_until_finished()
        except Exception:  # noqa: BLE001 - the original error matters more; older checkpoints stay usable.
            log.exception("checkpoint save in flight failed")
        raise
    bar.close()
    counts = train_iter.report.counts
    if counts := (counts() if callable(counts) else counts):
        print(f"Bad training examples skipped so far: {counts} (paligemma-ft inspect lists them by file and line).")
    manager.wait_until_finished()
    if restored_step is None or restored_step < total_steps:
        last.update(evaluate(total_steps))
    if jax.process_index() == 0:
        ckpt_lib.save_params(workdir / "params.npz", jax.device_get(state["params"]))
        rows = loggers.jsonl.rows()
        steps_s = [r["train/step_seconds"] for r in rows if "train/step_seconds" in r][1:]
        if steps_s:
            timings["median step seconds"] = float(np.median(steps_s))
        report = run_report.write_report(workdir, config, s.mesh, overview, timings)
        if not config.quiet:
            print(run_report.console_summary(rows, workdir / "eval", limit=int(config.show_predictions)))
            print(f"Wrote {workdir / 'params.npz'}, {report} and {workdir / 'metrics.jsonl'}.")
    loggers.close()
    manager.close()
    return last
