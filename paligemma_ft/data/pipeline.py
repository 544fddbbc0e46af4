"""Grain pipelines: endless shuffled training batches with exact resume, and one-pass evaluation batches.

Training reads one global order, whatever the number of processes (global batch `B = input.batch_size`, each
of P processes takes its `b = B // P` rows of every batch):

    source indices -> shuffle(seed) -> repeat forever     one global order; grain reshuffles every epoch
      -> global batch k = positions [k B, (k + 1) B)       process p reads positions k B + p b ... k B + (p + 1) b - 1
      -> map(read + transforms)  in `num_workers` threads (PIL releases the GIL while decoding/resizing)
      -> a bad example (policy "skip": counted in the report) is replaced by the first good one of a second,
         independently shuffled order, from the same position on -> stack b rows -> add `_mask`

So global batch k holds the same examples with 1, 2 or 8 processes, and a multi-process run trains on exactly
what a one-process run over the same devices trains on. The only state is k (`{"batches": k}`), so
`get_state()`/`set_state()` resume exactly, with any process count: the batches after a restore are the batches
the uninterrupted run would have produced (replacements are a function of the position, so they are too).

Evaluation reads every example of the split exactly once, in order: global batch k is examples
[k B, (k + 1) B), process p takes rows [p b, (p + 1) b) of it, and rows past the end are masked copies
(`_mask=False`), so shapes never change and all processes yield the same number of batches.

Batches (numpy): `image f32[b, R, R, 3]` in [-1, 1]; training `text, mask_ar, mask_loss i32[b, text_len + 1]`;
prompts `text, mask_ar, mask_input i32[b, text_len]`; `_mask bool[b]`; evaluation adds `_meta` (b dicts).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pathlib
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from paligemma_ft import tokenizer as tokenizer_lib
from paligemma_ft.data import images as images_lib
from paligemma_ft.data import localization
from paligemma_ft.data import sources as sources_lib
from paligemma_ft.data import transforms as tf_lib
from paligemma_ft.data.transforms import BadExample

TRAIN_KEYS = ("image", "text", "mask_ar", "mask_loss")
PROMPT_KEYS = ("image", "text", "mask_ar", "mask_input")
META_KEYS = ("id", "image_path", "prefix", "references", "file", "line", "objects", "image_size")
_ENDLESS = sys.maxsize  # Length of an endless grain MapDataset.


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """The `input` config section, typed (unknown keys are refused, so a typo fails loudly).

    Attributes:
      data: the source description (`input.data`, see `sources.make_source`).
      prefix: default prefix for examples without one.
      lowercase: lower-case suffixes and references, as the colab does.
      res: image side in pixels after resizing.
      text_len: big_vision's text length; training sequences are `text_len + 1` long.
      batch_size: global batch size (all processes together).
      shuffle_seed: seed of the training shuffle.
      num_workers: grain read threads (0 reads in the calling thread).
      bad_input: "skip" (count, list and drop bad examples) or "error" (raise, naming file and line).
      max_image_pixels: decompression-bomb limit, checked from the image header before decoding.
      max_image_bytes: image files larger than this are refused from their size, before they are read.
      transforms: names from `transforms.TRANSFORMS`, applied in order.
      prefetch: examples read ahead (default: two batches); bounds host memory at large resolutions.
    """

    data: Mapping[str, Any]
    prefix: str = "caption en"
    lowercase: bool = False
    res: int = 224
    text_len: int = 128
    batch_size: int = 8
    shuffle_seed: int = 0
    num_workers: int = 2
    bad_input: str = "skip"
    max_image_pixels: int = tf_lib.DEFAULT_MAX_PIXELS
    max_image_bytes: int = images_lib.DEFAULT_MAX_BYTES
    transforms: tuple[str, ...] = tf_lib.DEFAULT_TRANSFORMS
    prefetch: int | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> InputConfig:
        """From a ConfigDict or dict.

        Raises:
          ValueError: an unknown key (typo) or an invalid value, naming the `input.<key>`.
        """
        values = sources_lib.as_dict(cfg)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"input has unknown keys {unknown}; known: {sorted(known)}.")
        if "data" not in values:
            raise ValueError("input.data (the data source) is required.")
        if "transforms" in values:
            values["transforms"] = tuple(values["transforms"])
        out = cls(**values)
        sources_lib.check_data_config(out.data)
        tf_lib.check_transform_names(out.transforms)
        if out.bad_input not in sources_lib.BAD_INPUT_POLICIES:
            raise ValueError(f"input.bad_input={out.bad_input!r} must be one of {sources_lib.BAD_INPUT_POLICIES}.")
        for key in ("res", "text_len", "batch_size", "max_image_pixels", "max_image_bytes"):
            if int(getattr(out, key)) < 1:
                raise ValueError(f"input.{key} must be >= 1, got {getattr(out, key)}.")
        if out.num_workers < 0:
            raise ValueError(f"input.num_workers must be >= 0, got {out.num_workers}.")
        return out

    def context(self, tok: tokenizer_lib.Tokenizer, kind: str) -> tf_lib.Context:
        return tf_lib.Context(
            tok=tok,
            res=self.res,
            text_len=self.text_len,
            prefix=self.prefix,
            kind=kind,
            lowercase=self.lowercase,
            max_pixels=self.max_image_pixels,
        )

    def read_options(self, local_batch: int) -> grain.ReadOptions:
        prefetch = self.prefetch if self.prefetch is not None else max(2 * local_batch, 4 * self.num_workers)
        return grain.ReadOptions(num_threads=self.num_workers, prefetch_buffer_size=prefetch if self.num_workers else 0)


class BadInputReport:
    """Counts and lists bad examples (thread-safe: grain's read threads add to it).

    An example seen again in a later epoch is listed and counted once (`occurrences` counts every sighting).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple, BadExample] = {}
        self._truncated: set[str] = set()
        self.occurrences = 0

    def add(self, error: BadExample) -> None:
        key = (error.file, error.line, error.reason, error.detail)
        with self._lock:
            self.occurrences += 1
            self._entries.setdefault(key, error)

    def add_truncated(self, example_id: str) -> None:
        """Notes an example whose token sequence was cut at `text_len` (a cut suffix loses its EOS)."""
        with self._lock:
            self._truncated.add(example_id)

    @property
    def entries(self) -> list[tuple[str | None, int | None, str]]:
        """(file, line, reason) of every distinct bad example, in the order they were found."""
        with self._lock:
            return [(e.file, e.line, e.reason) for e in self._entries.values()]

    @property
    def counts(self) -> dict[str, int]:
        """Distinct bad examples per reason."""
        with self._lock:
            return dict(collections.Counter(e.reason for e in self._entries.values()))

    @property
    def num_truncated(self) -> int:
        with self._lock:
            return len(self._truncated)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def summary(self) -> str:
        """One printable paragraph: totals per reason, truncations, and the first few entries."""
        counts = self.counts
        if not counts:
            text = "bad input: none"
        else:
            parts = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))
            text = f"bad input: {sum(counts.values())} examples skipped ({parts})"
            with self._lock:
                first = list(self._entries.values())[:5]
            text += "".join(f"\n  {e}" for e in first)
            if len(self) > len(first):
                text += f"\n  ... ({len(self) - len(first)} more in the report file)"
        if self.num_truncated:
            text += f"\ntruncated sequences: {self.num_truncated} examples longer than text_len were cut"
        return text

    def write(self, path: str | os.PathLike) -> pathlib.Path:
        """Writes one JSON object per bad example (`file`, `line`, `reason`, `detail`) to `path`.

        A directory path gets `bad_input.jsonl` inside it. Returns the file written.
        """
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / "bad_input.jsonl"
        with self._lock:
            rows = [
                {"file": e.file, "line": e.line, "reason": e.reason, "detail": e.detail} for e in self._entries.values()
            ]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        return path


@dataclasses.dataclass(frozen=True)
class _Bad:
    """Marker for an example that failed (policy "skip"); `meta` keeps where it came from."""

    error: BadExample
    meta: dict


class _Loader:
    """Reads example `index` of the source and applies the transforms (runs in grain's read threads)."""

    def __init__(
        self,
        source,
        names: Sequence[str],
        ctx: tf_lib.Context,
        policy: str,
        report: BadInputReport,
        keys: Sequence[str],
        with_meta: bool,
    ):
        self.source, self.names, self.ctx, self.policy, self.report = source, tuple(names), ctx, policy, report
        self.keys, self.with_meta = tuple(keys), with_meta

    def __call__(self, index: int, epoch: int = 0) -> dict | _Bad:
        try:
            # `epoch` orders the objects of localization examples with `order="random"` (a no-op otherwise).
            example = tf_lib.apply_transforms(localization.with_epoch(self.source[index], epoch), self.names, self.ctx)
        except BadExample as e:
            error = e.located(*self.source.location(index))
            if self.policy == "error":
                raise error from None
            self.report.add(error)
            return _Bad(error, {"file": error.file, "line": error.line, "bad": error.reason})
        if example.get("_truncated"):
            self.report.add_truncated(str(example.get("id", index)))
        missing = [k for k in self.keys if k not in example]
        if missing:
            raise ValueError(
                f"input.transforms {list(self.names)} do not produce {missing}; include "
                f"{[n for n in tf_lib.DEFAULT_TRANSFORMS if n not in self.names]}."
            )
        out = {k: example[k] for k in self.keys}
        if self.with_meta:
            out["_meta"] = {k: example.get(k) for k in META_KEYS}
        return out


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # noqa: PLC0415 - only needed for the defaults.

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside [0, process_count={process_count}).")
    return process_index, process_count


def local_batch_size(batch_size: int, process_count: int, name: str = "input.batch_size") -> int:
    """This process's share of a global batch; raises ValueError (naming `name`) unless it divides evenly."""
    if batch_size % process_count:
        raise ValueError(f"{name}={batch_size} is not divisible by the {process_count} processes.")
    return batch_size // process_count


STATE_VERSION = 2  # Version 1 (before one global order) saved grain's per-process iterator state.
_RESERVE_SEED = 0x5EED  # Mixed into the shuffle seed for the order that replacements of bad examples come from.


class DataStateMismatch(ValueError):
    """A well-formed data state saved by a pipeline over other data, seed or batch size (a config change).

    `config_change` tells `checkpoints.state.restore_latest` not to treat the checkpoint as damaged.
    """

    config_change = True


class _Positions:
    """Row i this process reads -> its position in the global order (rows of process p in each global batch)."""

    def __init__(self, global_batch: int, local_batch: int, process_index: int):
        self.global_batch, self.local_batch, self.process_index = global_batch, local_batch, process_index

    def __call__(self, row: int) -> int:
        k, r = divmod(row, self.local_batch)
        return k * self.global_batch + self.process_index * self.local_batch + r


class TrainIterator:
    """Endless training batches with `get_state()`/`set_state()` for an exact resume.

    Attributes:
      report: the bad-input report this pipeline fills.
      batch_size: examples per batch on this process.
    """

    def __init__(self, cfg: InputConfig, source, loader: _Loader, report: BadInputReport, pi: int, pc: int):
        self.batch_size, self.report, self._loader = local_batch_size(cfg.batch_size, pc), report, loader
        self._cfg, self._num_examples, self._batches = cfg, len(source), 0
        indices = grain.MapDataset.range(len(source))
        self._order = indices.shuffle(seed=cfg.shuffle_seed).repeat(None)
        self._reserve = indices.shuffle(seed=cfg.shuffle_seed ^ _RESERVE_SEED).repeat(None)
        self._position = _Positions(cfg.batch_size, self.batch_size, pi)
        self._fingerprint = {
            "num_examples": len(source),
            "shuffle_seed": cfg.shuffle_seed,
            "batch_size": cfg.batch_size,
        }
        self._it = self._rows_from(0)

    def _rows_from(self, batches: int):
        """Grain iterator over this process's examples from global batch `batches` on (read ahead in threads)."""
        rows = grain.MapDataset.range(batches * self.batch_size, _ENDLESS).map(self._position)
        # The epoch of a position orders the objects of localization examples with `order="random"`.
        return iter(
            rows.map(lambda pos: self._loader(self._order[pos], pos // self._num_examples)).to_iter_dataset(
                self._cfg.read_options(self.batch_size)
            )
        )

    def _replacement(self, position: int) -> dict:
        """The first good example of the reserve order from `position` on (deterministic in the position)."""
        for t in range(2 * self._num_examples):  # 2n consecutive positions of a reshuffled order hold every example.
            example = self._loader(self._reserve[position + t], (position + t) // self._num_examples)
            if not isinstance(example, _Bad):
                return example
        raise ValueError(f"Every example of input.data is bad.\n{self.report.summary()}")

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        for r in range(self.batch_size):
            example = next(self._it)
            if isinstance(example, _Bad):
                example = self._replacement(self._position(self._batches * self.batch_size + r))
            rows.append(example)
        self._batches += 1
        batch = {k: np.stack([row[k] for row in rows]) for k in TRAIN_KEYS}
        batch["_mask"] = np.ones(self.batch_size, bool)
        return batch

    def get_state(self) -> dict:
        """A JSON-serializable state (the same on every process): save it with the checkpoint."""
        return {"version": STATE_VERSION, "batches": self._batches, "fingerprint": dict(self._fingerprint)}

    def check_state(self, state: Any) -> int:
        """The batch count of a saved `state`, after checking it without applying it.

        Raises:
          DataStateMismatch: a well-formed state of a pipeline over other data, seed or batch size.
          ValueError: anything else that is not a state `get_state` writes (a damaged checkpoint).
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"the data state is a {type(state).__name__}, not a JSON object")
        if state.get("version") != STATE_VERSION:
            if "grain" in state and "version" not in state:
                raise DataStateMismatch(
                    "the data state was saved by an earlier paligemma_ft (a per-process grain state), which "
                    "cannot be continued; start a new --workdir, or finish the run with that version"
                )
            raise ValueError(f"the data state has version {state.get('version')!r}, expected {STATE_VERSION}")
        batches, saved = state.get("batches"), state.get("fingerprint")
        if not isinstance(batches, int) or isinstance(batches, bool) or batches < 0:
            raise ValueError(f"the data state's batch count {batches!r} is not an integer >= 0")
        if not isinstance(saved, Mapping) or set(saved) != set(self._fingerprint):
            raise ValueError(f"the data state's fingerprint {saved!r} lacks keys {sorted(self._fingerprint)}")
        diff = {k: (saved[k], v) for k, v in self._fingerprint.items() if saved[k] != v}
        if diff:
            raise DataStateMismatch(
                "Cannot resume the input pipeline: the saved state was made with different "
                + ", ".join(f"{k} (saved {a}, now {b})" for k, (a, b) in diff.items())
                + "."
            )
        return batches

    def check_states(self, states: Sequence[Any]) -> None:
        """Checks every process's saved state (a checkpoint's): each well-formed, all at the same batch.

        Raises:
          DataStateMismatch: a state of a pipeline over other data, seed or batch size.
          ValueError: a malformed state, or processes out of step (a damaged checkpoint).
        """
        batches = []
        for i, state in enumerate(states):
            try:
                batches.append(self.check_state(state))
            except ValueError as e:
                raise type(e)(f"process {i}: {e}") from None
        if len(set(batches)) > 1:
            raise ValueError(f"the processes' data states are at different batches: {batches}")

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues from `state` (from `get_state`, of any process and process count).

        Raises:
          ValueError: the state is malformed, or (`DataStateMismatch`) comes from a pipeline over other data,
            seed or batch size.
        """
        self._batches = self.check_state(state)
        self._it = self._rows_from(self._batches)


def make_train_iter(
    input_cfg: Any,
    tok: tokenizer_lib.Tokenizer,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    report: BadInputReport | None = None,
) -> TrainIterator:
    """Endless shuffled training batches: this process's rows of each global batch of `input.data`.

    Args:
      input_cfg: the `input` config (ConfigDict or dict; see `InputConfig`).
      tok: the tokenizer.
      process_index, process_count: this process and how many there are (default: jax's).
      report: where bad examples are counted (default: a new one, as `iterator.report`).

    Returns:
      A `TrainIterator` of `{"image": f32[b, R, R, 3], "text", "mask_ar", "mask_loss": i32[b, text_len + 1],
      "_mask": bool[b]}` with `b = batch_size // process_count`.

    Raises:
      ValueError / FileNotFoundError: a bad config or an empty source; `BadExample` (under `bad_input="error"`)
      from the source build or, while iterating, from the first bad example, naming its file and line.
    """
    cfg = InputConfig.from_config(input_cfg)
    pi, pc = _processes(process_index, process_count)
    local_batch_size(cfg.batch_size, pc)
    report = BadInputReport() if report is None else report
    source = sources_lib.make_source(
        cfg.data, mode="train", bad_input=cfg.bad_input, max_image_bytes=cfg.max_image_bytes
    )
    for error in source.skipped:
        report.add(error)
    if len(source) == 0:
        raise ValueError("input.data has no usable examples." + (f"\n{report.summary()}" if len(report) else ""))
    loader = _Loader(source, cfg.transforms, cfg.context(tok, "train"), cfg.bad_input, report, TRAIN_KEYS, False)
    return TrainIterator(cfg, source, loader, report, pi, pc)


def num_eval_examples(data_cfg: Any) -> int:
    """Examples in an evaluation split (rows that cannot be parsed are not counted)."""
    return len(sources_lib.make_source(data_cfg, mode="eval", bad_input="skip"))


def num_eval_batches(num_examples: int, batch_size: int, process_count: int = 1) -> int:
    """Batches every process yields for `num_examples` in global batches of `batch_size` (over `process_count`
    processes, which must divide it): the same for any process count."""
    local_batch_size(batch_size, process_count, "batch_size")
    return math.ceil(num_examples / batch_size)


def _eval_rows(num_examples: int, batch_size: int, process_index: int, process_count: int) -> list[int]:
    """Real rows per batch of this process: global batch k is examples [k B, (k + 1) B), split into P blocks."""
    b = batch_size // process_count
    starts = (k * batch_size + process_index * b for k in range(num_eval_batches(num_examples, batch_size, 1)))
    return [min(b, max(0, num_examples - start)) for start in starts]


def make_eval_batches(
    data_cfg: Any,
    input_cfg: Any,
    tok: tokenizer_lib.Tokenizer,
    batch_size: int,
    *,
    kind: str = "prompt",
    process_index: int | None = None,
    process_count: int | None = None,
    report: BadInputReport | None = None,
) -> Iterator[dict]:
    """Every example of `data_cfg` exactly once over all processes, in fixed-shape batches: this process's rows
    `[p b, (p + 1) b)` of global batch k, which holds examples `[k B, (k + 1) B)` in the split's order.

    Args:
      data_cfg: the split to read (same keys as `input.data`).
      input_cfg: the `input` config (image size, text length, prefix, workers, bad-input policy).
      tok: the tokenizer.
      batch_size: global evaluation batch size; each process yields `batch_size // process_count` rows.
      kind: "prompt" (text, mask_ar, mask_input of text_len, for decoding) or "train" (text, mask_ar,
        mask_loss of text_len + 1, for validation loss).
      process_index, process_count: this process and how many there are (default: jax's).
      report: where bad examples are counted; under "skip" a bad example's row is masked, never dropped
        silently.

    Yields:
      `num_eval_batches(n, batch_size, process_count)` dicts with the arrays of `kind`, `_mask bool[b]` and
      `_meta`: b dicts (`id`, `image_path`, `prefix`, `references`, `file`, `line`). Masked rows hold copies of
      a real example; their meta has `"padding": True` (or `"bad": reason`).
    """
    if kind not in ("prompt", "train"):
        raise ValueError(f"kind must be 'prompt' or 'train', got {kind!r}.")
    cfg = InputConfig.from_config(input_cfg)
    pi, pc = _processes(process_index, process_count)
    b = local_batch_size(batch_size, pc, "batch_size")
    report = BadInputReport() if report is None else report
    source = sources_lib.make_source(
        data_cfg, mode="eval", bad_input=cfg.bad_input, max_image_bytes=cfg.max_image_bytes
    )
    for error in source.skipped:
        report.add(error)
    ctx = cfg.context(tok, kind)
    keys = TRAIN_KEYS if kind == "train" else PROMPT_KEYS
    loader = _Loader(source, cfg.transforms, ctx, cfg.bad_input, report, keys, True)
    position = _Positions(batch_size, b, pi)
    counts = _eval_rows(len(source), batch_size, pi, pc)
    indices = [position(k * b + r) for k, n in enumerate(counts) for r in range(n)]
    rows = grain.MapDataset.source(indices).map(loader) if indices else None
    it = iter(rows.to_iter_dataset(cfg.read_options(b))) if rows is not None else iter(())
    return _eval_batches(it, counts, b, _blank_example(ctx, keys))


def _blank_example(ctx: tf_lib.Context, keys: Sequence[str]) -> dict:
    """Filler for a process that has no real example to copy (fewer examples than processes)."""
    if "mask_loss" in keys:
        arrays, _ = tokenizer_lib.make_train_example(ctx.tok, ctx.prefix, "", ctx.text_len + 1)
    else:
        arrays, _ = tokenizer_lib.make_prompt(ctx.tok, ctx.prefix, ctx.text_len)
    blank = {"image": np.zeros((ctx.res, ctx.res, 3), np.float32), **arrays}
    return {**{k: blank[k] for k in keys}, "_meta": {k: None for k in META_KEYS}}


def _eval_batches(it: Iterator, counts: Sequence[int], b: int, blank: dict) -> Iterator[dict]:
    """Batches of `b` rows, the first `counts[k]` of batch k read from `it`, the rest padding."""
    last_good = blank
    for count in counts:
        rows: list[dict | _Bad | None] = [next(it) if r < count else None for r in range(b)]
        good = [r for r in rows if isinstance(r, dict)]
        filler = good[0] if good else last_good
        last_good = good[-1] if good else last_good
        mask = np.array([isinstance(r, dict) for r in rows], bool)
        arrays = [r if isinstance(r, dict) else filler for r in rows]
        metas = [_row_meta(r, filler) for r in rows]
        batch = {k: np.stack([a[k] for a in arrays]) for k in arrays[0] if k != "_meta"}
        yield {**batch, "_mask": mask, "_meta": metas}


def _row_meta(row: dict | _Bad | None, filler: dict) -> dict:
    if isinstance(row, dict):
        return row["_meta"]
    if isinstance(row, _Bad):  # Where the bad example came from; its content is the filler's.
        return {**{k: None for k in META_KEYS}, **row.meta, "padding": True}
    return {**filler["_meta"], "padding": True}
