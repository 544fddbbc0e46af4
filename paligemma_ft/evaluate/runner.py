"""Runs the config's evaluators over their whole splits: used by the trainer (step 0, periodically, at the end)
and by `paligemma-ft evaluate`.

`config.evals` maps an evaluator name to its settings, e.g.

    config.evals.val = dict(type="caption", data=dict(source="jsonl", path=".../val.jsonl"), batch_size=8,
                            max_decode_len=32, sampler="greedy", bootstrap=1000)

Metrics come back as `{"<name>/<metric>": float}`; predictions (JSONL) and an HTML gallery go to `outdir`.
Rows of the split that cannot be used (a missing or refused image, a malformed line, a duplicate COCO id) are
masked, never scored, and listed in `outdir/bad_rows_<name>.jsonl` (one JSON object per row: `file`, `line`,
`reason`, `detail`); the console (a warning, and `paligemma-ft evaluate`'s summary) and the training report name
the file. The evaluator settings (`batch_size`, `max_decode_len`, `sampler`, or big_vision's `pred` and `pred_kw`:
see `decoding`) are checked before anything runs.

`evaluate_command` is `paligemma-ft evaluate`: it loads the parameters (`--checkpoint`, else `WORKDIR/params.npz`,
else `config.model_init`), runs the evaluators, prints a table and writes `eval_metrics.json`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from paligemma_ft import config_base, multihost
from paligemma_ft import data as data_lib
from paligemma_ft import sharding as sharding_lib
from paligemma_ft.decode import parse_sampler
from paligemma_ft.errors import UserError, check_output_dir
from paligemma_ft.evaluate.evaluators import PP_NOT_RUN, evaluator_type, make_evaluator

log = logging.getLogger(__name__)


class EvalConfigError(UserError, ValueError):
    """A `config.evals.<name>` entry that cannot run; the message names the key."""


_WARNED: set[tuple[str, str]] = set()  # (evaluator, key) already warned about in this process.


def _plain(tree: Any) -> dict:
    return tree.to_dict() if hasattr(tree, "to_dict") else dict(tree)


def _positive_int(name: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise EvalConfigError(f"config.evals.{name}.{key}={value!r}: must be an integer >= 1")  # As validate().
    return int(value)


_DECODE_FNS = ("decode", "decode_with_logp", "beam_decode")  # big_vision's decoding predict-fns (`pred`).
# big_vision's `pred_kw` keys: read (max_decode_len, sampler, beam_size), or accepted at the one value we support.
_PRED_KW_FIXED = {"eos_token": 1, "best_of_n": 1, "eos_look_behind": 0}  # 1: PaliGemma's EOS id.


def decoding(name: str, ecfg: dict[str, Any]) -> tuple[int, str]:
    """(max_decode_len, sampler) of evaluator `name`: from its own keys (`max_decode_len=32`, `sampler="greedy"`)
    or, as big_vision writes them, from `pred` ("decode", "decode_with_logp", "beam_decode") and `pred_kw`
    (`max_decode_len`, `sampler`, `beam_size`). `pred="beam_decode", pred_kw=dict(beam_size=4)` is `beam(4)`.

    Raises:
      EvalConfigError: an unknown `pred` or `pred_kw` key, a value given twice differently, `beam_size` without
        `beam_decode` (or the reverse), a `pred_kw` value we do not support, or a bad sampler; each named.
    """
    where = f"config.evals.{name}"
    pred, kw = ecfg.get("pred"), _plain(ecfg.get("pred_kw") or {})
    allowed = ("logits",) if evaluator_type(ecfg["type"]) == "perplexity" else _DECODE_FNS
    if pred is not None and pred not in allowed:
        raise EvalConfigError(f"{where}.pred={pred!r}: this evaluator takes one of {', '.join(allowed)} (or none)")
    unknown = sorted(set(kw) - {"max_decode_len", "sampler", "beam_size", *_PRED_KW_FIXED})
    if unknown:
        raise EvalConfigError(f"{where}.pred_kw: unknown key(s) {unknown}; known: max_decode_len, sampler, beam_size")
    for key, only in _PRED_KW_FIXED.items():
        if key in kw and kw[key] != only:
            raise EvalConfigError(f"{where}.pred_kw.{key}={kw[key]!r}: only {only} is supported")

    def one(key: str, default: Any) -> Any:
        if key in kw and key in ecfg and kw[key] != ecfg[key]:
            raise EvalConfigError(f"{where}: {key} is given twice, {ecfg[key]!r} and pred_kw.{key}={kw[key]!r}")
        return kw.get(key, ecfg.get(key, default))

    max_len = _positive_int(name, "max_decode_len", one("max_decode_len", 32))
    sampler = one("sampler", "greedy")
    if pred == "beam_decode":
        if "beam_size" not in kw or "sampler" in kw or "sampler" in ecfg:
            raise EvalConfigError(f"{where}: pred='beam_decode' takes pred_kw.beam_size (and no sampler)")
        sampler = f"beam({_positive_int(name, 'pred_kw.beam_size', kw['beam_size'])})"
    elif "beam_size" in kw:
        raise EvalConfigError(f"{where}.pred_kw.beam_size needs pred='beam_decode' (or use sampler='beam(n)')")
    try:
        parse_sampler(sampler)
    except ValueError as e:
        raise EvalConfigError(f"{where}.sampler: {e}") from None
    return max_len, sampler


def check_evals(evals: dict[str, Any], names: list[str] | None = None) -> None:
    """Checks the evaluator entries that will run, before any data is read or any model is loaded.

    Raises:
      EvalConfigError / ValueError: a missing `type` or `data`, an unknown type or option, a `batch_size` or
        `max_decode_len` below 1, or a sampler that cannot be used, each named as `config.evals.<name>.<key>`.
    """
    for name, ecfg in evals.items():
        if names is not None and name not in names:
            continue
        ecfg = _plain(ecfg)
        if "type" not in ecfg or "data" not in ecfg:
            raise EvalConfigError(f"config.evals.{name} needs 'type' and 'data' (got keys {sorted(ecfg)})")
        make_evaluator(name, ecfg)  # Unknown types and options.
        _positive_int(name, "batch_size", ecfg.get("batch_size", 8))
        decoding(name, ecfg)
        for key in ("pp_fn", "pp"):
            if key in ecfg and (name, key) not in _WARNED:  # A ported big_vision config: say once what happens.
                _WARNED.add((name, key))
                log.warning("config.evals.%s.%s: %s", name, key, PP_NOT_RUN)


def bad_rows_path(outdir: str | Path, name: str) -> Path:
    """Where `run_evals` lists evaluator `name`'s bad rows (one JSON object per row)."""
    import jax  # noqa: PLC0415 - only to name the file of each process when there are several.

    suffix = f"_process{jax.process_index()}" if jax.process_count() > 1 else ""
    return Path(outdir) / f"bad_rows_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}{suffix}.jsonl"  # As predictions_*.


def run_evals(
    config: Any, predictor: Any, outdir: str | Path, step: int, names: list[str] | None = None
) -> dict[str, float]:
    """Runs every evaluator of `config.evals` (or only `names`) with `predictor`; scalar metrics only.

    Args:
      config: the run config (`evals`, and `input` for image size, text length and default prefix).
      predictor: a `paligemma_ft.predictor.Predictor` (its decoding settings are overridden per evaluator).
      outdir: where predictions and galleries are written.
      step: the training step the parameters belong to (in file names and the returned metrics' context).
    """
    out: dict[str, float] = {}
    evals = _plain(config.get("evals") or {})
    unknown = sorted(set(names or ()) - set(evals))
    if unknown:
        raise ValueError(f"no evaluator named {unknown} in config.evals (known: {sorted(evals)})")
    check_evals(evals, names)
    for name, ecfg in evals.items():
        if names is not None and name not in names:
            continue
        ecfg = _plain(ecfg)
        evaluator = make_evaluator(name, ecfg)
        kind = "train" if evaluator_type(ecfg["type"]) == "perplexity" else "prompt"
        bad = data_lib.BadInputReport()
        batches = data_lib.make_eval_batches(
            ecfg["data"], config.input, predictor.tok, int(ecfg.get("batch_size", 8)), kind=kind, report=bad
        )
        predictor.max_decode_len, predictor.sampler = decoding(name, ecfg)
        predictor.constrain = ecfg.get("constrain", "")  # Constrained localization decoding (constrain.py).
        result = evaluator.run(predictor, batches, Path(outdir), step)
        _list_bad_rows(bad, bad_rows_path(outdir, name), name)
        for k, v in result.items():
            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
                out[f"{name}/{k}"] = float(v)
    return out


def _list_bad_rows(report: Any, path: Path, name: str) -> None:
    """Writes the bad rows to `path` (removing a stale list when there are none now) and warns, naming the file."""
    if not len(report):
        path.unlink(missing_ok=True)
        return
    report.write(path)
    counts = ", ".join(f"{reason} {n}" for reason, n in sorted(report.counts.items()))
    log.warning("evaluator %s: %d bad rows were not scored (%s); listed in %s", name, len(report), counts, path)


def _workdir_step(workdir: str | Path | None) -> int:
    """The last step logged in `workdir/metrics.jsonl` (the step `params.npz` was exported at), else 0."""
    from paligemma_ft.training.report import MetricsLog  # noqa: PLC0415 - only `evaluate` needs it.

    if workdir is None:
        return 0
    rows = MetricsLog(Path(workdir) / "metrics.jsonl").rows()
    return max((int(r.get("step", 0)) for r in rows), default=0)


def format_table(metrics: dict[str, float]) -> str:
    """`evaluator  metric  value` rows, aligned, in the order the evaluators ran."""
    rows = [(*k.split("/", 1), f"{v:.0f}" if k.endswith("/n") else f"{v:.4f}") for k, v in metrics.items()]
    rows = [("evaluator", "metric", "value"), *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows)


def evaluate_command(
    config: Any,
    workdir: str | Path | None = None,
    checkpoint: str | None = None,
    *,
    outdir: str | Path | None = None,
    only: list[str] | None = None,
    step: int | None = None,
    stdout: TextIO | None = None,
    dtype: str | None = None,
    adapters: str | None = None,
) -> dict[str, float]:
    """`paligemma-ft evaluate`: runs the config's evaluators on a checkpoint, prints a table, writes files.

    Args:
      config: the run config (`evals`, `input`, `tokenizer`, `model_name_or_preset`, `model`, `model_init`).
      workdir: a training run's folder: its `params.npz` is evaluated unless `checkpoint` is given, and the
        outputs go there unless `outdir` is given.
      checkpoint: a checkpoint spec (`builtin:demo`, `.npz[:sub]`, a workdir, `kaggle:HANDLE`); default
        `workdir`, then `config.model_init`.
      outdir: where `eval_metrics.json`, the predictions JSONL and the galleries go (default `workdir`).
      only: evaluator names to run (default all of `config.evals`).
      dtype: "float32" / "bfloat16": cast the weights on load and compute in it; default: weights as stored,
        computed in `config.compute_dtype` (None: bfloat16 on GPU/TPU, float32 on CPU).
      step: the step in the file names; default the last step logged in `workdir/metrics.jsonl`, else 0.
      stdout: where the table is printed (default `sys.stdout`).
      adapters: a LoRA run's `adapters.npz` merged into the checkpoint (then default `config.model_init`, the
        base, rather than `workdir`'s merged params.npz).

    Returns:
      `{"<eval name>/<metric>": float}`, as written to `eval_metrics.json` under "metrics".

    Raises:
      ValueError / FileNotFoundError: nothing to evaluate or nowhere to write, no or unknown evaluators, a missing
        checkpoint or a tokenizer that does not fit the model (the message says which).
    """
    from paligemma_ft.predictor import load_predictor  # noqa: PLC0415 - lazy: keeps `--help` instant.

    config = config_base.complete(config)
    config_base.validate(config, training=False)
    sharding_lib.maybe_initialize_distributed(config)  # Each process evaluates its rows; results are gathered.
    evals = _plain(config.evals)
    if not evals:
        raise ValueError(
            "config.evals is empty: nothing to evaluate (add e.g. config.evals.val = "
            "dict(type='caption', data=..., batch_size=8))"
        )
    unknown = sorted(set(only or ()) - set(evals))
    if unknown:
        raise ValueError(f"--only {unknown}: no such evaluator in config.evals (known: {sorted(evals)})")
    check_evals(evals, list(only) if only else None)
    # With --adapters the default checkpoint is their base (config.model_init), not the workdir's merged export.
    spec = checkpoint or (str(workdir) if workdir is not None and not adapters else "") or config.model_init
    if not spec:
        raise ValueError(
            "nothing to evaluate: pass --checkpoint SPEC or --workdir DIR (with params.npz), or set config.model_init"
        )
    if outdir is not None:
        outdir = check_output_dir(outdir, "--outdir")
    elif workdir is None:
        raise ValueError("nowhere to write the results: pass --workdir DIR or --outdir DIR")
    elif not Path(workdir).exists():  # Not created here: the run to evaluate is missing.
        raise FileNotFoundError(f"--workdir {workdir} does not exist")
    else:
        outdir = check_output_dir(workdir, "--workdir")
    config_base.check_data_paths(config, train=False)  # Evaluation reads the evaluators' data.
    predictor = load_predictor(
        spec,
        config.tokenizer or None,
        preset=config.model_name_or_preset or None,
        model_overrides=config.model,
        res=config.input.res,
        dtype=dtype,
        compute_dtype=config.compute_dtype,
        adapters=adapters,
    )
    step = _workdir_step(workdir if not checkpoint else None) if step is None else int(step)
    metrics = run_evals(config, predictor, outdir, step, names=list(only) if only else None)
    if not multihost.is_primary():
        return metrics  # The same metrics on every process; process 0 writes and prints them.
    outdir.mkdir(parents=True, exist_ok=True)
    record = {"checkpoint": spec, "step": step, "metrics": metrics}
    (outdir / "eval_metrics.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    out = stdout or sys.stdout
    print(f"Evaluated {spec} (step {step}):", file=out)
    print(format_table(metrics), file=out)
    print(f"Wrote {outdir / 'eval_metrics.json'} and the predictions and galleries in {outdir}.", file=out)
    for name in only or list(evals):
        path = bad_rows_path(outdir, name)
        if path.exists():
            rows = sum(1 for _ in path.open(encoding="utf-8"))
            print(f"{name}: {rows} bad row(s) of the split were not scored; listed in {path}", file=out)
    return metrics
