"""`paligemma-ft convert SRC DST`: checkpoints between big_vision `.npz`, run workdirs and Hugging Face folders.

    paligemma-ft convert runs/demo hf_demo --tokenizer builtin:tiny   # serve a fine-tune with transformers
    paligemma-ft convert hf:google/paligemma2-3b-pt-224 pg2.npz        # fine-tune from an HF download
    paligemma-ft convert runs/demo --step 200 step200.npz              # one orbax checkpoint of a run

Formats come from the paths (`--from` / `--to` override): SRC is a checkpoint spec as everywhere (`builtin:`,
`kaggle:`, `hf:REPO`, a `.npz[:sub]`, a workdir: its `params.npz`, or with `--step N` its orbax checkpoint N;
an HF folder); DST ending in `.npz` is an `.npz`, anything else an HF folder (new or empty). Everything is
streamed tensor by tensor (`checkpoints/hf_export.py`, `hf_import.py`); each tensor keeps its dtype unless
`--dtype` says otherwise. A summary of what was written is printed at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from paligemma_ft.checkpoints import hf_files
from paligemma_ft.errors import check_output_dir

_SIZES = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "b": 1}


def parse_size(text: str) -> int:
    """`5GB`, `500MB`, `2GiB`, `1000` (bytes) -> bytes."""
    t = text.strip().lower().replace(" ", "")
    for unit in sorted(_SIZES, key=len, reverse=True):
        if t.endswith(unit):
            number, scale = t[: -len(unit)], _SIZES[unit]
            break
    else:
        number, scale = t, 1
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"--shard-size {text!r}: expected a size like 5GB, 500MB or 2GiB") from None
    if value < 1:
        raise ValueError(f"--shard-size {text!r} must be positive")
    return int(value)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `convert` flags."""
    p.add_argument(
        "src", metavar="SRC", help="checkpoint spec: .npz[:sub], workdir, HF folder, hf:REPO, builtin:, kaggle:"
    )
    p.add_argument("dst", metavar="DST", help="an .npz file, or a new/empty folder for a Hugging Face model")
    p.add_argument("--from", dest="from_", choices=("npz", "workdir", "hf"), default=None, help="SRC's format")
    p.add_argument("--to", choices=("npz", "hf"), default=None, help="DST's format (default: .npz suffix or not)")
    p.add_argument(
        "--step",
        nargs="?",
        const="latest",
        default=None,
        help="a workdir's orbax checkpoint instead of its params.npz: step N, or the latest without N",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="cast every tensor")
    p.add_argument("--preset", default=None, help="model preset, when SRC's shapes do not say it all (soft-caps)")
    p.add_argument("--tokenizer", default=None, metavar="SPEC", help="for the HF processor files (default: found)")
    p.add_argument("--shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--keep-vocab", action="store_true", help="HF -> npz: keep every embedding row (<image>, padding)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _target(dst: str, to: str | None) -> str:
    return to or ("npz" if dst.endswith(".npz") else "hf")


@contextmanager
def _open_source(src: str, from_: str | None, step: int | str | None, vocab: str) -> Iterator[tuple[Any, Any, Any]]:
    """`(ParamSource, Checkpoint or None, HF source or None)` for SRC."""
    from paligemma_ft.checkpoints import hf_import, loading, npz, orbax_params  # noqa: PLC0415

    if step is not None or from_ == "workdir" and not os.path.isfile(os.path.join(src, "params.npz")):
        if not os.path.isdir(src):
            raise ValueError(f"--step: SRC {src!r} is not a run's workdir")
        with orbax_params.OrbaxParams(src, None if step in (None, "latest") else int(step)) as source:
            yield source, loading.Checkpoint(src, "workdir", src, loading._run_config(src)), None  # noqa: SLF001
        return
    checkpoint = loading.resolve_checkpoint(src)
    if from_ == "hf" and checkpoint.kind != "hf":
        raise ValueError(f"--from hf: {src!r} is not a Hugging Face folder (config.json + *.safetensors)")
    if checkpoint.kind == "hf":
        with hf_import.HFSource(checkpoint.path, vocab=vocab) as source:
            yield source, checkpoint, source
    else:
        with npz.NpzReader(checkpoint.path, keep_selector=True) as reader:
            yield reader, checkpoint, None


def _model_config(source: Any, checkpoint: Any, hf_source: Any, preset: str | None) -> tuple[dict, Any]:
    from paligemma_ft.checkpoints import loading  # noqa: PLC0415
    from paligemma_ft.model import get_preset, infer_config_from_shapes  # noqa: PLC0415

    if hf_source is not None and not preset:
        return hf_source.model_config, hf_source.image_size
    if preset:
        return get_preset(preset)
    run = checkpoint.run_config if checkpoint is not None else None
    if run and run.get("model_name_or_preset"):
        return loading.model_config(None, checkpoint, None)  # The run's preset and overrides.
    cfg, res = infer_config_from_shapes({n: s.shape for n, s in source.specs().items()})
    for tower in ("img", "llm"):  # The shapes, then the run's own overrides (soft-caps, ...).
        cfg[tower].update(((run or {}).get("model") or {}).get(tower) or {})
    return cfg, res


def _tokenizer_bytes(spec: str | None, checkpoint: Any, vocab: int) -> tuple[bytes | None, str]:
    from paligemma_ft.checkpoints import loading  # noqa: PLC0415
    from paligemma_ft.tokenizer import Tokenizer  # noqa: PLC0415

    try:
        found = loading.resolve_tokenizer(spec, checkpoint, vocab)
    except loading.TokenizerNotFoundError:
        return None, "none found"
    return Tokenizer.from_spec(found).model_bytes, found


def convert(
    src: str,
    dst: str,
    *,
    from_: str | None = None,
    to: str | None = None,
    step: int | str | None = None,
    dtype: str | None = None,
    preset: str | None = None,
    tokenizer: str | None = None,
    shard_size: str | int = "5GB",
    keep_vocab: bool = False,
    progress: bool = True,
    stdout: TextIO | None = None,
) -> Any:
    """Converts SRC to DST (module docstring) and prints the summary; returns it (`hf_export.Summary`).

    Raises:
      ValueError / FileNotFoundError (CheckpointError is a ValueError): bad paths, a non-PaliGemma or damaged
        source, missing shards, a dtype the target cannot hold; one line each naming the culprit.
    """
    from paligemma_ft.checkpoints import hf, hf_export, loading  # noqa: PLC0415

    target = _target(dst, to)
    shard_bytes = parse_size(shard_size) if isinstance(shard_size, str) else int(shard_size)
    if target == "npz" and not dst.endswith(".npz") and to is None:
        raise ValueError(f"DST {dst!r}: an .npz path, or --to npz")
    if target == "npz":  # Its folder is created if needed (an HF folder is created by the export).
        check_output_dir(os.path.dirname(os.path.abspath(os.path.expanduser(dst))), "DST's folder")
    notes = []
    with _open_source(src, from_, step, "keep" if keep_vocab else "auto") as (source, checkpoint, hf_source):
        cfg, res = _model_config(source, checkpoint, hf_source, preset)
        if hf_source is not None:
            notes.append(f"vocabulary: {hf_source.vocab_note}")
            if window := hf.sliding_window(hf_files.read_config(hf_source.folder) or {}):
                patch = cfg["img"]["patch_size"][0]
                n_img = (res // patch) ** 2
                notes.append(
                    f"text_config.sliding_window={window}: HF attends to the last {window} tokens in its sliding "
                    f"layers, big_vision to all; sequences over {window} ({n_img} image + {window - n_img} text "
                    "tokens) are computed differently"
                )
        if target == "hf":
            model = loading.build_model(cfg)
            vocab = loading.vocab_size(loading.init_shapes(model, res, 4))
            tok_bytes, found = _tokenizer_bytes(tokenizer, checkpoint, vocab)
            summary = hf_export.export(
                source,
                cfg,
                res,
                dst,
                dtype=dtype,
                max_shard_bytes=shard_bytes,
                tokenizer_model=tok_bytes,
                progress=progress,
            )
            if tok_bytes is not None:
                notes.append(f"tokenizer: {found}")
        else:
            summary = _to_npz(source, cfg, res, dst, dtype, hf_source is not None, progress)
    summary.notes += notes
    print(summary, file=stdout or sys.stdout)
    return summary


def _to_npz(source: Any, cfg: dict, res: int, dst: str, dtype: str | None, from_hf: bool, progress: bool) -> Any:
    """Streams SRC's parameters into an `.npz` (big_vision's scan layout for an HF source; as stored otherwise)."""
    from tqdm import auto as tqdm  # noqa: PLC0415

    from paligemma_ft.checkpoints import fit, hf_export, loading, npz  # noqa: PLC0415

    if from_hf:
        model = loading.build_model(cfg)
        plan = fit.plan_fit(source, loading.init_shapes(model, res, 4), allow_missing=False)
        names, read = list(plan.shapes), plan.read
    else:
        names, read = list(source.specs()), source.read
    dtypes: dict[str, int] = {}
    n_params = 0
    with npz.NpzWriter(dst) as writer:
        for name in tqdm.tqdm(names, desc="convert", unit="param", disable=not progress):
            array = hf_export.cast(name, read(name), dtype)
            writer.write(name, array)
            dtypes[array.dtype.name] = dtypes.get(array.dtype.name, 0) + 1
            n_params += array.size
    return hf_export.Summary(dst, n_params, dtypes, [Path(dst).name], os.path.getsize(dst))


def _step(value: str | None) -> int | str | None:
    if value in (None, "latest"):
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--step {value!r}: expected a step number (or --step alone for the latest)") from None


def main(args: argparse.Namespace) -> int:
    """The `convert` command from parsed flags."""
    convert(
        args.src,
        args.dst,
        from_=args.from_,
        to=args.to,
        step=_step(args.step),
        dtype=args.dtype,
        preset=args.preset,
        tokenizer=args.tokenizer,
        shard_size=args.shard_size,
        keep_vocab=args.keep_vocab,
        progress=not args.quiet,
    )
    return 0
