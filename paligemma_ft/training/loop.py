"""The trainer: `run(config, workdir)` and the pure, jitted `train_step`.

A run is resumable: orbax checkpoints in `workdir/checkpoints` hold the parameters, optimizer state, step, RNG and
the data iterator's state, so running the same config on the same workdir again continues where it stopped (and on
CPU ends bitwise where an uninterrupted run ends). Metrics go to `workdir/metrics.jsonl` (one JSON object per line,
each with `step`), the resolved config to `workdir/config.json`, evaluation predictions and galleries to
`workdir/eval/`, the fine-tuned parameters to `workdir/params.npz` (big_vision's layout) and a report to
`workdir/report.md` with `curves.png` at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import auto as tqdm

from paligemma_ft import config as config_lib
from paligemma_ft import data as data_lib
from paligemma_ft import flops
from paligemma_ft import predictor as predictor_lib
from paligemma_ft import sharding as sharding_lib
from paligemma_ft import tokenizer as tokenizer_lib
from paligemma_ft.checkpoints import npz as ckpt_lib
from paligemma_ft.checkpoints import state as train_state
from paligemma_ft.evaluate.runner import run_evals
from paligemma_ft.model import Model, precision
from paligemma_ft.training import optim
from paligemma_ft.training import report as run_report
from paligemma_ft.training.losses import loss_fn

PyTree = Any
log = logging.getLogger(__name__)
DEFAULT_MESH = (("data", -1),)
DEFAULT_SHARDING = ((".*", 'fsdp(axis="data")'),)
BATCH_KEYS = ("image", "text", "mask_ar", "mask_loss", "_mask")


def _get(config: Any, key: str, default: Any = None) -> Any:
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


# --- Loss and step -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static settings of `train_step` (hashable, so one jit covers them)."""

    label_smoothing: float = 0.0
    reduction: str = "example_mean"
    micro_batches: int = 1
    lr: float = 1.0


def train_step(
    state: dict,
    batch: Mapping[str, jax.Array],
    *,
    model: Model,
    tx: optax.GradientTransformation,
    trainable: PyTree,
    step_cfg: StepConfig = StepConfig(),
    sched_fn: Any = None,
) -> tuple[dict, dict]:
    """One update. Pure: `state = {"params", "opt", "step" i32[], "rng" key}` in, the next state and metrics out.

    Args:
      trainable: a pytree of Python bools like the params; gradients of frozen leaves are never used, so XLA
        drops their computation (and the backward pass through fully frozen towers).
      step_cfg: loss options and `micro_batches` (gradient accumulation: the batch is split into equal slices).

    Metrics: `train/loss`, `train/grad_norm` (over trainable gradients) and `train/lr` (when `sched_fn` is given:
    the schedule multiplier of this update times `step_cfg.lr`).
    """
    rng, step_rng = jax.random.split(state["rng"])
    step_rng = jax.random.fold_in(step_rng, state["step"])
    grad_fn = jax.value_and_grad(
        functools.partial(loss_fn, model=model, label_smoothing=step_cfg.label_smoothing, reduction=step_cfg.reduction)
    )
    loss, grads = optim.accumulate_gradients(
        lambda p, b: grad_fn(p, b, step_rng), state["params"], batch, step_cfg.micro_batches
    )
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # apply_updates promotes e.g. float16 + float32 zero; keep every leaf's storage dtype (frozen ones unchanged).
    params = jax.tree.map(lambda new, old, t: new.astype(old.dtype) if t else old, params, state["params"], trainable)
    trained = [g for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(trainable)) if t]
    metrics = {"train/loss": loss, "train/grad_norm": optim.global_norm_of(trained)}
    if sched_fn is not None:
        metrics["train/lr"] = step_cfg.lr * sched_fn(state["step"])
    return {"params": params, "opt": opt, "step": state["step"] + 1, "rng": rng}, metrics


# --- Set-up ----------------------------------------------------------------------------------------------------


def make_model(config: Any) -> tuple[Model, int | None, str | None]:
    """`(model, resolution, init_path)` from `model_name_or_preset`, `model` (overrides) and `model_init`."""
    init = _get(config, "model_init", "") or ""
    path = predictor_lib.resolve_checkpoint(init) if init else None
    cfg, res = predictor_lib.model_config(_get(config, "model_name_or_preset", ""), path, _get(config, "model"))
    # `compute_dtype` (declared in config_base): float32 / bfloat16, None = bfloat16 on GPU/TPU, float32 on CPU.
    cfg = precision.apply_compute_dtype(cfg, precision.resolve_compute_dtype(config.get("compute_dtype")))
    return Model(**cfg), res, path


def init_params(
    model: Model,
    config: Any,
    shapes: PyTree,
    path: str | None,
    shardings: PyTree,
    dtypes: PyTree,
    res: int,
    text_len: int,
) -> PyTree:
    """Parameters born sharded: loaded from `path` leaf by leaf, or a random init jitted to the shardings."""
    if path is not None:
        host = ckpt_lib.load_for_model(path, shapes)
        return ckpt_lib.place_params(host, shardings, dtypes)

    def init():
        z = jnp.zeros((1, text_len), jnp.int32)
        p = model.init(jax.random.PRNGKey(int(_get(config, "seed", 0))), jnp.zeros((1, res, res, 3)), z, z)
        return jax.tree.map(lambda x, d: x.astype(d), p["params"], dtypes)

    return jax.jit(init, out_shardings=shardings)()


def _eval_due(ecfg: Mapping[str, Any], step: int, total: int) -> bool:
    """big_vision's schedule: at step 0 (unless `skip_first`), every `log_steps` (or `log_percent`), at the end."""
    if step == 0:
        return not ecfg.get("skip_first", False)
    if step == total:
        return True
    every = ecfg.get("log_steps") or (int(total * ecfg["log_percent"]) if ecfg.get("log_percent") else 0)
    return bool(every) and step % int(every) == 0


@dataclasses.dataclass
class _Setup:
    model: Model
    tok: tokenizer_lib.Tokenizer
    mesh: jax.sharding.Mesh
    res: int
    text_len: int
    shapes: PyTree
    state_shard: dict
    state_abstract: dict
    trainable: PyTree
    tx: optax.GradientTransformation
    sched_fns: list
    path: str | None
    dtypes: PyTree


def setup(config: Any) -> _Setup:
    """Everything decided before compute: model, tokenizer, mesh, shapes, shardings, optimizer (errors early)."""
    if "data_dir" in config and not config.data_dir:
        raise ValueError(
            "config.data_dir is not set: pass --config.data_dir=DIR (the config file's docstring shows "
            "the folder layout it expects)"
        )
    model, res, path = make_model(config)
    tok_spec = _get(config, "tokenizer", "")
    if str(_get(config, "model_init", "")).startswith("kaggle:") and not tok_spec:
        from paligemma_ft.checkpoints import kaggle  # noqa: PLC0415 - only for Kaggle checkpoints.

        tok_spec = kaggle.resolve_tokenizer(None, ckpt_lib.split_selector(path)[0])
    tok = tokenizer_lib.Tokenizer.from_spec(tok_spec or "builtin:tiny")
    res = int(_get(config.input, "res", res or 224))
    text_len = int(_get(config.input, "text_len", 128))
    devices = jax.devices()
    if n := _get(config, "num_devices"):  # Use only the first n devices (tests; sharing a host).
        devices = devices[: int(n)]
    mesh = sharding_lib.make_mesh([tuple(a) for a in _get(config, "mesh", DEFAULT_MESH)], devices)
    strategy = [tuple(r) for r in _get(config, "sharding_strategy", DEFAULT_SHARDING)]
    sharding_lib.check_batch_divisible(int(config.input.batch_size), mesh)
    shapes = predictor_lib.init_shapes(model, res, text_len + 1)
    tokenizer_lib.check_vocab(
        tok,
        shapes["llm"]["embedder"]["input_embedding"].shape[0],
        source=path or _get(config, "model_name_or_preset", "the config"),
    )
    p_shard = sharding_lib.infer_sharding(shapes, strategy, mesh)
    dtypes = optim.param_dtypes(shapes, config)
    tx, sched_fns = optim.make_optimizer(
        config, shapes, total_steps=int(config.total_steps), batch_size=int(config.input.batch_size)
    )
    trainable = optim.trainable_mask(shapes, _get(config, "schedule", {}))
    shapes = jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, d), shapes, dtypes)
    opt_shapes = jax.eval_shape(tx.init, shapes)
    o_shard = sharding_lib.opt_state_sharding(opt_shapes, shapes, strategy, mesh)
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_shard = {"params": p_shard, "opt": o_shard, "step": repl, "rng": repl}
    state_abstract = {
        "params": shapes,
        "opt": opt_shapes,
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
    }
    return _Setup(
        model, tok, mesh, res, text_len, shapes, state_shard, state_abstract, trainable, tx, sched_fns, path, dtypes
    )


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
        if wb := _get(config, "wandb"):
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
    if isinstance(config, Mapping) and not isinstance(config, ml_collections.ConfigDict):
        config = ml_collections.ConfigDict(config)
    sharding_lib.maybe_initialize_distributed(config)
    if cache_dir := _get(config, "compilation_cache_dir"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir))
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config_lib.save_config(config, workdir / "config.json")
    s = setup(config)
    total_steps, batch_size = int(config.total_steps), int(config.input.batch_size)
    b_shard = sharding_lib.batch_sharding(s.mesh)
    repl = s.state_shard["step"]

    train_iter = data_lib.make_train_iter(config.input, s.tok)
    manager = train_state.make_manager(workdir / "checkpoints", max_to_keep=_get(config, "keep_ckpts", 2))
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
        params = init_params(
            s.model, config, s.shapes, s.path, s.state_shard["params"], s.dtypes, s.res, s.text_len + 1
        )
        opt = jax.jit(s.tx.init, out_shardings=s.state_shard["opt"])(params)
        state = {
            "params": params,
            "opt": opt,
            "step": jax.device_put(jnp.int32(0), repl),
            "rng": jax.device_put(jax.random.PRNGKey(int(_get(config, "seed", 0))), repl),
        }
        step = 0
    overview = run_report.param_overview(state["params"], s.trainable, s.state_shard["params"])
    if _get(config, "quiet", False) is False:
        print(f"Devices: {jax.device_count()} x {jax.devices()[0].device_kind}, mesh {dict(s.mesh.shape)}")
        print(overview)

    step_cfg = StepConfig(
        label_smoothing=float(_get(config, "label_smoothing", 0.0)),
        reduction=_get(config, "loss_reduction", "example_mean"),
        micro_batches=int(_get(config, "grad_accum_steps", 1)),
        lr=float(_get(config, "lr", 1.0)),
    )
    step_fn = jax.jit(
        functools.partial(
            train_step,
            model=s.model,
            tx=s.tx,
            trainable=s.trainable,
            step_cfg=step_cfg,
            sched_fn=s.sched_fns[0] if s.sched_fns else None,
        ),
        donate_argnums=0,
        in_shardings=(s.state_shard, b_shard),
        out_shardings=(s.state_shard, repl),
    )
    predictor = predictor_lib.Predictor(s.model, None, s.tok, res=s.res)
    evals = {k: (v.to_dict() if hasattr(v, "to_dict") else dict(v)) for k, v in (_get(config, "evals", {})).items()}

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
    ckpt_steps = int(_get(config, "ckpt_steps", 0) or 0)
    bar = tqdm.tqdm(
        total=total_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=_get(config, "quiet", False) or jax.process_index() != 0,
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
        if not _get(config, "quiet", False):
            print(run_report.console_summary(rows, workdir / "eval", limit=int(_get(config, "show_predictions", 3))))
            print(f"Wrote {workdir / 'params.npz'}, {report} and {workdir / 'metrics.jsonl'}.")
    loggers.close()
    manager.close()
    return last
