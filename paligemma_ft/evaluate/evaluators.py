"""Evaluators chosen by name in the config, run over a whole split with padding rows masked out.

A config entry such as `config.evals.val_cap = dict(type="caption", bootstrap=1000)` becomes
`make_evaluator("val_cap", cfg)`. The runner (trainer or `paligemma-ft evaluate`) builds the batches the
evaluator's `kind` asks for ("prompt": prefix-only batches for decoding; "train": prefix + suffix batches for
teacher forcing), wraps the model in a `Predictor`, and logs the returned metrics as `<eval name>/<metric>`.

Batches are dicts of numpy arrays with `_mask bool[B]` (False on padding rows) and `_meta`, a list of B dicts
with `id`, `image_path`, `prefix` and `references` (list of str). Each real example must appear exactly once in
the split; a repeated id is an error (it would silently weigh the example twice).

On several processes each one runs its rows of every batch; the examples are gathered in the split's order before
scoring, so every process returns the metrics of the whole split, and process 0 alone writes the files.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import jax
import numpy as np

from paligemma_ft import multihost
from paligemma_ft.evaluate import caption, detection, report, segmentation, vqa

log = logging.getLogger(__name__)

# Config keys that belong to whoever feeds the evaluator (data, decoding, schedule): read by the runner
# (evaluate/runner.py) and the trainer (training/loop.py), ignored here.
RUNNER_KEYS = frozenset(
    {
        "type",
        "data",
        "batch_size",
        "log_steps",
        "log_percent",
        "skip_first",
        "pred",  # big_vision's predict-fn: decode, decode_with_logp, beam_decode (logits for perplexity).
        "pred_kw",  # Its arguments: max_decode_len, sampler, beam_size (runner.decoding).
        "max_decode_len",
        "sampler",
        "constrain",
        "pp_fn",  # big_vision's preprocessing string: not run; the runner warns (PP_NOT_RUN).
        "pp",
    }
)
PP_NOT_RUN = (
    "big_vision's preprocessing string is not run here: images are resized to config.input.res and tokenized as in "
    "training, and the prompt is each example's prefix (else config.input.prefix)"
)
# Keys with no meaning in an evaluator's entry: an error says where the setting goes.
NOT_HERE = {
    "split": "the split belongs to the data: config.evals.<name>.data.split (source 'tfds')",
    "source": "the source belongs to the data: config.evals.<name>.data.source",
    "prompt": "the prompt is each example's prefix, else config.input.prefix",
}
_ALIASES = {"coco_caption": "caption", "vqav2": "vqa"}


@runtime_checkable
class Predictor(Protocol):
    """What evaluators need from a model; the runner implements it around `decode` and the loss."""

    def generate(self, batch: dict) -> list[str]:
        """One decoded string per row of `batch` (padding rows included; they are ignored)."""
        ...

    def losses(self, batch: dict) -> np.ndarray:
        """f32[B]: per-example teacher-forced mean loss over the supervised tokens."""
        ...


def _plain(value: Any) -> Any:
    """Ids and strings from numpy/TFDS (bytes, numpy scalars) as plain Python values."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return _plain(value.item())
    return value


@dataclasses.dataclass
class _Example:
    id: Any
    image: str | None
    prompt: str
    references: list[str]
    output: Any = None  # The decoded string, or the loss for perplexity.
    objects: Any = None  # Localization examples: the ground-truth objects (`data.localization.Obj`).
    image_size: Any = None  # Localization examples: (height, width) of the original image.


def _real_rows(batch: Mapping[str, Any], where: str, *, need_meta: bool) -> list[tuple[int, dict | None]]:
    """(row index, meta) of the non-padding rows of one batch."""
    if "_mask" not in batch:
        raise ValueError(f"{where}: batch has no '_mask' key (bool[B], False on padding rows)")
    mask = np.asarray(batch["_mask"]).astype(bool).reshape(-1)
    meta = batch.get("_meta")
    if meta is None and need_meta:
        raise ValueError(
            f"{where}: batch has no '_meta' key (a list of B dicts with id, image_path, prefix, references)"
        )
    if meta is not None and len(meta) != len(mask):
        raise ValueError(f"{where}: '_meta' has {len(meta)} entries for {len(mask)} rows")
    return [(int(i), None if meta is None else meta[int(i)]) for i in np.flatnonzero(mask)]


def _example(meta: Mapping[str, Any], where: str) -> _Example:
    if "id" not in meta:
        raise ValueError(f"{where}: '_meta' entry has no 'id': {dict(meta)!r}")
    refs = meta.get("references")
    refs = [] if refs is None else [refs] if isinstance(refs, (str, bytes)) else list(refs)
    image = meta.get("image_path")
    return _Example(
        _plain(meta["id"]),
        None if image is None else str(_plain(image)),
        str(_plain(meta.get("prefix", ""))),
        [str(_plain(r)) for r in refs],
        objects=meta.get("objects"),
        image_size=meta.get("image_size"),
    )


def _gather(local: list[tuple[int, int, _Example]]) -> list[tuple[int, int, _Example]]:
    """Every process's `(batch, row, example)`s in the split's order: by batch, then process, then row (process p
    holds the p-th block of rows of each global batch). A collective on several processes; as it is on one."""
    if jax.process_count() == 1:
        return local
    plain = [(int(b), int(i), {**dataclasses.asdict(ex), "output": _json_value(ex.output)}) for b, i, ex in local]
    rows = [(b, p, i, ex) for p, part in enumerate(multihost.allgather_json(plain)) for b, i, ex in part]
    return [(b, i, _Example(**ex)) for b, _, i, ex in sorted(rows, key=lambda r: r[:3])]


def _json_value(value: Any) -> Any:
    """An output as JSON carries it: numpy scalars as Python numbers (a loss is a float64)."""
    return value.item() if isinstance(value, np.generic) else value


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


@dataclasses.dataclass
class Evaluator:
    """Base class: collects one output per real example, scores the split, writes predictions and a gallery."""

    name: str
    max_gallery_items: int = 200  # Examples shown in the HTML gallery.
    kind: ClassVar[str] = "prompt"
    warnings: list[str] = dataclasses.field(default_factory=list, init=False)  # Of the last `run`.

    def __post_init__(self):
        if not isinstance(self.max_gallery_items, int) or self.max_gallery_items < 0:
            raise ValueError(
                f"evaluator {self.name!r}: max_gallery_items must be an int >= 0, got {self.max_gallery_items!r}"
            )

    def score(self, predictions: dict, references: dict) -> dict[str, Any]:
        """Metrics dict with `per_example` (id -> scores) and `warnings`; see the metric modules."""
        raise NotImplementedError

    def _score(self, examples: list[_Example]) -> dict[str, Any]:
        """`score` on the collected examples (evaluators that need more than outputs and references override it)."""
        return self.score({ex.id: ex.output for ex in examples}, {ex.id: ex.references for ex in examples})

    def _outputs(self, predictor: Predictor, batch: dict, size: int, where: str) -> list[Any]:
        texts = [str(_plain(t)) for t in predictor.generate(batch)]
        if len(texts) != size:
            raise ValueError(f"{where}: predictor.generate returned {len(texts)} strings for {size} rows")
        return texts

    def _collect(self, predictor: Predictor, batches: Iterable[dict]) -> list[_Example]:
        local: list[tuple[int, int, _Example]] = []  # (batch, row, example) of this process's rows.
        for b, batch in enumerate(batches):
            where = f"evaluator {self.name!r}, batch {b}"
            rows = _real_rows(batch, where, need_meta=self.kind == "prompt")
            size = len(np.asarray(batch["_mask"]).reshape(-1))
            outputs = self._outputs(predictor, batch, size, where)
            for i, meta in rows:
                ex = _example(meta, where) if meta is not None else _Example(f"batch{b}_row{i}", None, "", [])
                ex.output = outputs[i]
                local.append((b, i, ex))
        examples: dict[Any, _Example] = {}
        for b, i, ex in _gather(local):  # Every process's, in split order.
            if ex.id in examples:
                raise ValueError(
                    f"evaluator {self.name!r}, batch {b}, row {i}: id {ex.id!r} was already scored (ids must be "
                    "unique and each example must appear once in the split)"
                )
            examples[ex.id] = ex
        if not examples:
            raise ValueError(f"evaluator {self.name!r}: the split has no (non-padding) examples")
        return list(examples.values())

    def _rows(self, examples: list[_Example], result: Mapping[str, Any]) -> list[dict[str, Any]]:
        return [
            {
                "id": ex.id,
                "image": ex.image,
                "prompt": ex.prompt,
                "prediction": ex.output,
                "references": ex.references,
                "score": result["per_example"][ex.id],
            }
            for ex in examples
        ]

    def run(self, predictor: Predictor, batches: Iterable[dict], outdir: str | Path, step: int) -> dict[str, float]:
        """Scores the whole split; writes `predictions_<name>_step<step>.jsonl` and `gallery_...html`.

        Returns:
          Flat metrics without the evaluator prefix, `n` (examples scored) included.
        """
        examples = self._collect(predictor, batches)
        result = self._score(examples)
        per = result["per_example"]
        if len(per) != len(examples) or any(ex.id not in per for ex in examples):
            raise RuntimeError(f"evaluator {self.name!r}: scored {len(per)} examples for {len(examples)} collected")
        metrics = {
            k: float(v) for k, v in result.items() if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
        }
        metrics["n"] = float(len(examples))
        self.warnings = list(result.get("warnings", []))
        if not multihost.is_primary():
            return metrics  # Every process scores the gathered split; process 0 alone reports and writes files.
        for w in self.warnings:
            log.warning("evaluator %s: %s", self.name, w)
        rows = self._rows(examples, result)
        outdir = Path(outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        stem = f"{_file_stem(self.name)}_step{step}"
        report.write_predictions_jsonl(outdir / f"predictions_{stem}.jsonl", rows)
        report.write_gallery_html(
            outdir / f"gallery_{stem}.html",
            rows,
            title=f"{self.name} at step {step}",
            max_items=self.max_gallery_items,
            metrics=metrics,
            warnings=self.warnings,
        )
        return metrics


@dataclasses.dataclass
class CaptionEvaluator(Evaluator):
    """CIDEr, BLEU-1..4, ROUGE-L (METEOR) with bootstrap intervals; see `caption.caption_metrics`."""

    bootstrap: int = 1000  # Bootstrap resamples for the 95 % intervals (0: none).
    seed: int = 0  # Seed of the resampling.
    meteor: bool = False  # Also METEOR when Java is present (slow).

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.bootstrap, int) or self.bootstrap < 0:
            raise ValueError(f"evaluator {self.name!r}: bootstrap must be an int >= 0, got {self.bootstrap!r}")

    def score(self, predictions: dict, references: dict) -> dict[str, Any]:
        return caption.caption_metrics(
            predictions, references, bootstrap=self.bootstrap, seed=self.seed, meteor=self.meteor
        )


@dataclasses.dataclass
class VqaEvaluator(Evaluator):
    """Exact match (`acc`, `acc_any`), VQAv2 accuracy and ANLS; see `vqa.vqa_metrics`."""

    anls_theta: float = 0.5  # ANLS threshold on the normalized edit distance.
    lowercase: bool = True  # Case-insensitive exact match.

    def score(self, predictions: dict, references: dict) -> dict[str, Any]:
        return vqa.vqa_metrics(predictions, references, anls_theta=self.anls_theta, lowercase=self.lowercase)


@dataclasses.dataclass
class DetectionEvaluator(Evaluator):
    """AP@0.5, AP@0.75, mAP@[.5:.95], format-validity and empty-output rates and IoU; see
    `detection.detection_metrics`."""

    loc_bins: int = 1024  # Number of <locNNNN> tokens.

    def score(self, predictions: dict, references: dict) -> dict[str, Any]:
        return detection.detection_metrics(predictions, references, loc_bins=self.loc_bins)

    def run(self, predictor: Predictor, batches: Iterable[dict], outdir: str | Path, step: int) -> dict[str, float]:
        """As `Evaluator.run`, plus `gallery_<name>_step<step>.png`: the first 16 examples drawn (see report.py)."""
        metrics = super().run(predictor, batches, outdir, step)
        report.write_gallery_png(Path(outdir) / f"gallery_{_file_stem(self.name)}_step{step}.png", self._last_rows)
        return metrics

    def _rows(self, examples: list[_Example], result: Mapping[str, Any]) -> list[dict[str, Any]]:
        rows = super()._rows(examples, result)
        self._last_rows = rows
        for row in rows:
            row["boxes"] = result["boxes"][row["id"]]  # Drawn on the gallery thumbnails.
            if row["id"] in result.get("masks", {}):  # COCO RLEs: small in the JSONL, drawn filled in the gallery.
                row["masks"] = result["masks"][row["id"]]
        return rows


@dataclasses.dataclass
class SegmentationEvaluator(DetectionEvaluator):
    """Box metrics plus mask mIoU and mask AP, masks decoded by the VQ-VAE codec; see
    `segmentation.segmentation_metrics`. The split must carry ground-truth masks (annotation or shapes sources)."""

    codec: str = "oi"  # The mask codec spec (paligemma_ft.model.vqvae): "oi" = vae-oid.npz, or a path.

    def __post_init__(self):
        super().__post_init__()
        from paligemma_ft.model import vqvae  # noqa: PLC0415 - JAX-heavy.

        self._codec = vqvae.load_codec(self.codec)  # A missing file fails before any decoding.

    def _score(self, examples: list[_Example]) -> dict[str, Any]:
        return segmentation.segmentation_metrics(
            {ex.id: ex.output for ex in examples},
            {ex.id: ex.references for ex in examples},
            {ex.id: ex.objects for ex in examples},
            {ex.id: ex.image_size for ex in examples},
            self._codec,
            loc_bins=self.loc_bins,
        )


@dataclasses.dataclass
class RefexpEvaluator(DetectionEvaluator):
    """Referring expressions: accuracy at IoU 0.5 and 0.75 of the first predicted box (big_vision's boxacc), and
    with `codec` set the first mask's mIoU; see `segmentation.refexp_metrics`."""

    codec: str = ""  # "" scores boxes only; a codec spec ("oi", a path) also scores masks.

    def __post_init__(self):
        super().__post_init__()
        from paligemma_ft.model import vqvae  # noqa: PLC0415 - JAX-heavy.

        self._codec = vqvae.load_codec(self.codec) if self.codec else None

    def _score(self, examples: list[_Example]) -> dict[str, Any]:
        return segmentation.refexp_metrics(
            {ex.id: ex.output for ex in examples},
            {ex.id: ex.references for ex in examples},
            objects={ex.id: ex.objects for ex in examples},
            image_sizes={ex.id: ex.image_size for ex in examples},
            codec=self._codec,
            loc_bins=self.loc_bins,
        )


@dataclasses.dataclass
class PerplexityEvaluator(Evaluator):
    """Teacher-forced loss on the split: mean of per-example mean losses, and its exponential.

    Each example weighs the same (big_vision's per-example mean, then batch mean), padding rows weigh zero.
    `_meta` is optional here; without it the gallery and JSONL name rows by batch and row.
    """

    kind: ClassVar[str] = "train"

    def _outputs(self, predictor: Predictor, batch: dict, size: int, where: str) -> list[Any]:
        losses = np.asarray(predictor.losses(batch), np.float64).reshape(-1)
        if losses.shape != (size,):
            raise ValueError(f"{where}: predictor.losses returned shape {losses.shape} for {size} rows")
        return list(losses)

    def score(self, predictions: dict, references: dict) -> dict[str, Any]:
        losses = np.asarray(list(predictions.values()), np.float64)
        loss = float(losses.mean())
        warnings = [] if np.isfinite(losses).all() else [f"{int((~np.isfinite(losses)).sum())} non-finite losses"]
        with np.errstate(over="ignore"):
            perplexity = float(np.exp(loss))
        return {
            "loss": loss,
            "perplexity": perplexity,
            "per_example": {k: {"loss": float(v)} for k, v in predictions.items()},
            "warnings": warnings,
        }

    def _rows(self, examples: list[_Example], result: Mapping[str, Any]) -> list[dict[str, Any]]:
        rows = super()._rows(examples, result)
        for row in rows:
            row["prediction"] = ""  # Nothing is generated; the loss is the score.
        return rows


_TYPES: dict[str, type[Evaluator]] = {
    "caption": CaptionEvaluator,
    "vqa": VqaEvaluator,
    "detection": DetectionEvaluator,
    "segmentation": SegmentationEvaluator,
    "refexp": RefexpEvaluator,
    "perplexity": PerplexityEvaluator,
}


def evaluator_type(name: str) -> str:
    """Canonical type of a config `type`: aliases and big_vision dotted names (`proj.paligemma.transfers.vqav2`)."""
    short = str(name).rsplit(".", 1)[-1]
    short = _ALIASES.get(short, short)
    if short not in _TYPES:
        raise ValueError(f"unknown evaluator type {name!r}; known: {sorted(_TYPES)} (aliases: {sorted(_ALIASES)})")
    return short


def make_evaluator(name: str, cfg: Mapping[str, Any]) -> Evaluator:
    """Builds the evaluator `cfg["type"]` names, with its options from `cfg`.

    Args:
      name: the evaluator's name (its metrics are logged as `<name>/<metric>`, its files carry it).
      cfg: a mapping or `ConfigDict` with `type` in {"caption", "coco_caption", "vqa", "vqav2", "detection",
        "segmentation", "refexp", "perplexity"}, the evaluator's own options (fields of its class), and optionally
        runner keys (`RUNNER_KEYS`), which are ignored here. Any other key is an error naming it.
    """
    cfg = dict(cfg.items())
    if "type" not in cfg:
        raise ValueError(f"evaluator {name!r}: config has no 'type' (one of {sorted(_TYPES)})")
    cls = _TYPES[evaluator_type(cfg["type"])]
    options = {f.name for f in dataclasses.fields(cls) if f.init} - {"name"}
    unknown = sorted(k for k in cfg if k not in options and k not in RUNNER_KEYS)
    if here := [k for k in unknown if k in NOT_HERE]:
        raise ValueError(f"evaluator {name!r}: config key {here[0]!r} is not used here: {NOT_HERE[here[0]]}")
    if unknown:
        raise ValueError(
            f"evaluator {name!r} ({cfg['type']}): unknown config key(s) {unknown}; its options are {sorted(options)}"
        )
    return cls(name=name, **{k: v for k, v in cfg.items() if k in options})
