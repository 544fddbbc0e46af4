"""Runs the config's evaluators over their whole splits: used by the trainer (step 0, periodically, at the end)
and by `paligemma-ft evaluate`.

`config.evals` maps an evaluator name to its settings, e.g.

    config.evals.val = dict(type="caption", data=dict(source="jsonl", path=".../val.jsonl"), batch_size=8,
                            max_decode_len=32, sampler="greedy", bootstrap=1000)

Metrics come back as `{"<name>/<metric>": float}`; predictions (JSONL) and an HTML gallery go to `outdir`.

`evaluate_command` is `paligemma-ft evaluate`: it loads the parameters (`--checkpoint`, else `WORKDIR/params.npz`,
else `config.model_init`), runs the evaluators, prints a table and writes `eval_metrics.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from paligemma_ft import data as data_lib
from paligemma_ft.evaluate.evaluators import evaluator_type, make_evaluator


def _plain(tree: Any) -> dict:
    return tree.to_dict() if hasattr(tree, "to_dict") else dict(tree)


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
    for name, ecfg in evals.items():
        if names is not None and name not in names:
            continue
        ecfg = _plain(ecfg)
        if "type" not in ecfg or "data" not in ecfg:
            raise ValueError(f"config.evals.{name} needs 'type' and 'data' (got keys {sorted(ecfg)})")
        evaluator = make_evaluator(name, ecfg)
        kind = "train" if evaluator_type(ecfg["type"]) == "perplexity" else "prompt"
        batches = data_lib.make_eval_batches(
            ecfg["data"], config.input, predictor.tok, int(ecfg.get("batch_size", 8)), kind=kind
        )
        predictor.max_decode_len = int(ecfg.get("max_decode_len", 32))
        predictor.sampler = ecfg.get("sampler", "greedy")
        result = evaluator.run(predictor, batches, Path(outdir), step)
        for k, v in result.items():
            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
                out[f"{name}/{k}"] = float(v)
    return out


def _get(config: Any, key: str, default: Any = None) -> Any:
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


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

    Returns:
      `{"<eval name>/<metric>": float}`, as written to `eval_metrics.json` under "metrics".

    Raises:
      ValueError / FileNotFoundError: nothing to evaluate or nowhere to write, no or unknown evaluators, a missing
        checkpoint or a tokenizer that does not fit the model (the message says which).
    """
    import ml_collections  # noqa: PLC0415

    from paligemma_ft.predictor import load_predictor  # noqa: PLC0415 - lazy: keeps `--help` instant.

    if isinstance(config, dict):
        config = ml_collections.ConfigDict(config)  # run_evals reads `config.input` as an attribute.
    evals = _plain(_get(config, "evals", {}))
    if not evals:
        raise ValueError(
            "config.evals is empty: nothing to evaluate (add e.g. config.evals.val = "
            "dict(type='caption', data=..., batch_size=8))"
        )
    unknown = sorted(set(only or ()) - set(evals))
    if unknown:
        raise ValueError(f"--only {unknown}: no such evaluator in config.evals (known: {sorted(evals)})")
    spec = checkpoint or (str(workdir) if workdir is not None else "") or _get(config, "model_init", "")
    if not spec:
        raise ValueError(
            "nothing to evaluate: pass --checkpoint SPEC or --workdir DIR (with params.npz), or set config.model_init"
        )
    if outdir is None and workdir is None:
        raise ValueError("nowhere to write the results: pass --workdir DIR or --outdir DIR")
    outdir = Path(outdir if outdir is not None else workdir)
    input_cfg = _get(config, "input", {})
    predictor = load_predictor(
        spec,
        _get(config, "tokenizer", None) or None,
        preset=_get(config, "model_name_or_preset", "") or None,
        model_overrides=_get(config, "model", None),
        res=_get(input_cfg, "res", None),
        dtype=dtype,
        compute_dtype=_get(config, "compute_dtype", None),
    )
    step = _workdir_step(workdir if not checkpoint else None) if step is None else int(step)
    metrics = run_evals(config, predictor, outdir, step, names=list(only) if only else None)
    outdir.mkdir(parents=True, exist_ok=True)
    record = {"checkpoint": spec, "step": step, "metrics": metrics}
    (outdir / "eval_metrics.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    out = stdout or sys.stdout
    print(f"Evaluated {spec} (step {step}):", file=out)
    print(format_table(metrics), file=out)
    print(f"Wrote {outdir / 'eval_metrics.json'} and the predictions and galleries in {outdir}.", file=out)
    return metrics
