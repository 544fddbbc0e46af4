"""What a training run leaves for people: `metrics.jsonl`, the start-up parameter overview, curves and a report.

    metrics.jsonl   one JSON object per line: {"step": 10, "train/loss": 1.2, "train/lr": 0.03, ...}
    curves.png      training loss and every evaluation metric against the step (needs matplotlib)
    report.md       config, devices and mesh, parameter counts, curves, metrics before/after, prediction samples

Evaluation predictions, HTML galleries and lists of bad evaluation rows are written by the evaluators into
`workdir/eval/`; the report links them. Text that comes from data or configs (captions, predictions, prompts,
names) is escaped in `report.md` (shown, never rendered: no HTML runs, no remote image loads) and made visible on
the console (no terminal escape codes reach the terminal); credential-like config fields are left out
(`paligemma_ft.safety`).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import jax
import numpy as np

from paligemma_ft.errors import UserError
from paligemma_ft.safety import md_code, md_fence, md_text, printable, redact
from paligemma_ft.utils import tree_flatten_with_names

PyTree = Any
log = logging.getLogger(__name__)


class MetricsFileError(UserError, ValueError):
    """A `metrics.jsonl` row that is not a JSON object with an integer `step` (a damaged file)."""


class MetricsLog:
    """Appends rows to `metrics.jsonl` (one JSON object per line, `step` first, numbers as floats)."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        row: dict[str, Any] = {"step": int(step)}
        for k, v in metrics.items():
            v = np.asarray(v)
            if v.ndim == 0 and np.issubdtype(v.dtype, np.number):
                row[k] = float(v)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rows(self) -> list[dict[str, Any]]:
        """Every complete row. A last line without its newline (a write cut by a crash) is ignored.

        Raises:
          MetricsFileError: any other line that is not a JSON object with an integer `step`, naming the file and
            line (a damaged file: the run cannot tell which steps it logged).
        """
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        out = []
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            cut_short = number == len(lines)  # No newline after it: `write` was interrupted.
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                if cut_short:
                    continue
                raise self._damaged(number, f"not valid JSON ({type(e).__name__}: {e})") from None
            if not isinstance(row, dict) or type(row.get("step")) is not int:
                if cut_short and not isinstance(row, dict):
                    continue
                raise self._damaged(number, "not a JSON object with an integer 'step'")
            out.append(row)
        return out

    def _damaged(self, line: int, what: str) -> MetricsFileError:
        return MetricsFileError(
            f"{self.path}:{line} is damaged: {what}. Repair or delete that line (each line is one JSON object "
            'such as {"step": 10, "train/loss": 1.2}), or use a new --workdir'
        )

    def rewind(self, step: int) -> int:
        """Keeps training rows up to `step` and evaluation rows before it; returns how many rows were dropped.

        A restarted run redoes everything after its checkpoint at `step`, the evaluations of `step` included, so
        without this their rows would appear twice.
        """
        rows = self.rows()
        keep = [r for r in rows if r["step"] < step or (r["step"] == step and any(k.startswith("train/") for k in r))]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        os.replace(tmp, self.path)
        return len(rows) - len(keep)


def _group(name: str) -> str:
    """`img/Transformer/encoderblock/...` -> `img/Transformer`; `llm/layers/attn/...` -> `llm/layers/attn`."""
    parts = name.split("/")
    depth = 3 if parts[:2] == ["llm", "layers"] else 2
    return "/".join(parts[:depth])


def param_overview(params: PyTree, trainable: PyTree, shardings: PyTree | None = None) -> str:
    """A table of parameter counts per group: total, trainable, dtypes and partition specs."""
    flat = tree_flatten_with_names(params)
    mask = dict(tree_flatten_with_names(trainable))
    specs = dict(tree_flatten_with_names(shardings)) if shardings is not None else {}
    groups: dict[str, dict[str, Any]] = collections.OrderedDict()
    for name, leaf in flat:
        g = groups.setdefault(_group(name), {"n": 0, "train": 0, "dtypes": set(), "specs": set()})
        n = int(math.prod(leaf.shape))
        g["n"] += n
        g["train"] += n if mask.get(name) else 0
        g["dtypes"].add(str(np.dtype(leaf.dtype)))
        spec = getattr(specs.get(name), "spec", None)
        if spec is not None:
            g["specs"].add("sharded " + str(tuple(spec)) if any(a is not None for a in spec) else "replicated")
    total = sum(g["n"] for g in groups.values())
    trainable_total = sum(g["train"] for g in groups.values())
    lines = [f"{'group':<28} {'params':>13} {'trainable':>13}  dtypes / sharding"]
    for name, g in groups.items():
        lines.append(
            f"{name:<28} {g['n']:>13,} {g['train']:>13,}  {','.join(sorted(g['dtypes']))} "
            f"{' '.join(sorted(g['specs']))}".rstrip()
        )
    lines.append(
        f"{'total':<28} {total:>13,} {trainable_total:>13,}  ({100 * trainable_total / max(total, 1):.1f} % trainable)"
    )
    adapters = [(n, leaf) for n, leaf in flat if n.endswith(("_lora_a", "_lora_b"))]
    if adapters:  # LoRA (model/lora.py): adapters sit next to their weights, in the groups above.
        n_adapt = sum(int(math.prod(leaf.shape)) for _, leaf in adapters)
        lines.append(f"{'LoRA adapters':<28} {n_adapt:>13,} {'':>13}  on {len(adapters) // 2} weights")
    quantized = [(n, leaf) for n, leaf in flat if n.endswith("_q")]
    if quantized:  # QLoRA: nf4 packs two weights per uint8 code.
        n_q = sum(int(math.prod(leaf.shape)) * (2 if np.dtype(leaf.dtype) == np.uint8 else 1) for _, leaf in quantized)
        lines.append(f"{'quantized base weights':<28} {n_q:>13,} {'':>13}  {len(quantized)} weights")
    return "\n".join(lines)


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def eval_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Evaluation metric names in first-seen order (`val/cider`, ...), `n` counts excluded."""
    keys: dict[str, None] = {}
    for r in rows:
        for k in r:
            if k != "step" and not k.startswith(("train/", "eval/")) and not k.endswith("/n"):
                keys.setdefault(k)
    return list(keys)


def plot_curves(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> bool:
    """Writes the loss curve and one panel per evaluation metric to a PNG; False when matplotlib is missing."""
    try:
        import matplotlib  # noqa: PLC0415 - optional: only the plot needs it.

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        log.warning("matplotlib is not installed: no curves.png (pip install matplotlib)")
        return False
    keys = ["train/loss"] + [k for k in eval_keys(rows) if k.split("/")[-1] in _HEADLINE][:3]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        x, y = _series(rows, key)
        ax.plot(x, y, marker="o" if len(x) < 20 else None, markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


_HEADLINE = ("cider", "accuracy", "exact_match", "map", "ap50", "loss", "perplexity", "anls", "bleu_4")


def before_after(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, float, int, float, int]]:
    """(metric, first value, its step, last value, its step) for each evaluation metric."""
    out = []
    for key in eval_keys(rows):
        x, y = _series(rows, key)
        if x:
            out.append((key, y[0], x[0], y[-1], x[-1]))
    return out


def latest_predictions(eval_dir: str | os.PathLike, limit: int = 5) -> list[tuple[str, dict]]:
    """(evaluator file stem, first `limit` rows) of each evaluator's last predictions JSONL."""
    eval_dir = pathlib.Path(eval_dir)
    latest: dict[str, tuple[int, pathlib.Path]] = {}
    for f in eval_dir.glob("predictions_*_step*.jsonl"):
        name, _, step = f.stem.removeprefix("predictions_").rpartition("_step")
        if step.isdigit() and int(step) >= latest.get(name, (-1, f))[0]:
            latest[name] = (int(step), f)
    out = []
    for _, (_, f) in sorted(latest.items()):
        with open(f, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if i >= limit:
                    break
                out.append((f.stem, json.loads(line)))
    return out


def console_summary(rows: Sequence[Mapping[str, Any]], eval_dir: str | os.PathLike, limit: int = 5) -> str:
    """Metrics before and after training and a few predictions next to their references."""
    lines = []
    changes = [c for c in before_after(rows) if "_ci95_" not in c[0]]  # Intervals: in report.md, not here.
    if changes:
        width = max(24, *(len(printable(c[0])) for c in changes))  # One column, however long the names.
        lines.append(f"{'metric':<{width}} {'before':>10} {'after':>10}")
        for key, first, s0, last, s1 in changes:
            lines.append(f"{printable(key):<{width}} {first:>10.4f} {last:>10.4f}   (steps {s0} -> {s1})")
    preds = latest_predictions(eval_dir, limit)
    if preds:
        lines.append("")
        for _, row in preds:
            refs = row.get("references") or []
            # Data text: escape codes in a caption are shown (`\x1b[2J`), never executed by the terminal.
            lines.append(f"prompt:     {printable(row.get('prompt', ''))}")
            lines.append(f"prediction: {printable(row.get('prediction', ''))}")
            lines.append(f"reference:  {printable(refs[0] if refs else '')}")
            lines.append("")
    return "\n".join(lines).rstrip()


def write_report(
    workdir: str | os.PathLike,
    config: Any,
    mesh: jax.sharding.Mesh,
    overview: str,
    timings: Mapping[str, float],
    sections: Sequence[tuple[str, str]] = (),
) -> pathlib.Path:
    """Writes `workdir/report.md` (and `curves.png`); returns the report's path.

    `sections`: (title, markdown) pairs the trainer adds before the config (the data, config changes).
    """
    workdir = pathlib.Path(workdir)
    rows = MetricsLog(workdir / "metrics.jsonl").rows()
    has_plot = plot_curves(rows, workdir / "curves.png")
    devices = jax.devices()
    # Everything that comes from data or the config goes through md_text / md_code / md_fence: shown, not rendered.
    lines = [
        "# Training report",
        "",
        f"- workdir: {md_code(workdir)}",
        f"- devices: {len(devices)} x {devices[0].device_kind} ({jax.process_count()} process(es)); "
        f"mesh {dict(mesh.shape)}",
        f"- model: {md_code(config.get('model_name_or_preset') or 'from checkpoint')}, "
        f"init {md_code(redact(str(config.get('model_init') or 'random')))}",
        *[f"- {md_text(k)}: {v:.2f}" for k, v in timings.items()],
        "",
        "## Parameters",
        "",
        *md_fence(overview),
        "",
    ]
    if has_plot:
        lines += ["## Curves", "", "![curves](curves.png)", ""]
    changes = before_after(rows)
    if changes:
        lines += ["## Metrics", "", "| metric | first | last |", "|---|---|---|"]
        lines += [f"| {md_text(k)} | {a:.4f} (step {s0}) | {b:.4f} (step {s1}) |" for k, a, s0, b, s1 in changes]
        lines.append("")
    preds = latest_predictions(workdir / "eval", 8)
    if preds:
        lines += ["## Predictions", "", "| prompt | prediction | reference |", "|---|---|---|"]
        for _, row in preds:
            refs = row.get("references") or [""]
            cells = [md_text(c) for c in (row.get("prompt", ""), row.get("prediction", ""), refs[0])]
            lines.append("| " + " | ".join(cells) + " |")
        galleries = sorted((workdir / "eval").glob("gallery_*.html"))
        if galleries:
            links = [f"[{md_text(g.stem)}](eval/{quote(g.name)})" for g in galleries]
            lines += ["", "Galleries: " + ", ".join(links)]
    bad_lists = sorted((workdir / "eval").glob("bad_rows_*.jsonl"))
    if bad_lists:
        lines += [
            "",
            "## Bad evaluation rows",
            "",
            "Rows masked and not scored; each list gives file, line and reason:",
        ]
        for f in bad_lists:
            count = sum(1 for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
            lines.append(f"- [{md_text(f.name)}](eval/{quote(f.name)}): {count} row(s)")
    for title, body in sections:
        lines += ["", f"## {title}", "", body]
    lines += ["", "## Config", "", *md_fence(json.dumps(_plain(config), indent=2, default=str), "json"), ""]
    path = workdir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _plain(config: Any) -> Any:
    return redact(config.to_dict() if hasattr(config, "to_dict") else dict(config))
