"""Our parameters -> a Hugging Face PaliGemma folder, tensor by tensor (`paligemma-ft convert SRC DIR`).

The folder is what transformers' `save_pretrained` writes for `PaliGemmaForConditionalGeneration` and what
`AutoProcessor` reads: `config.json`, `model.safetensors` (or 5 GB shards + `model.safetensors.index.json`) in the
hub's tensor names (`hf_names.HUB`), and, when a tokenizer is given, `tokenizer.model`, `tokenizer.json`,
`tokenizer_config.json` and `processor_config.json` (a `PaliGemmaProcessor`: `<image>` = our vocabulary size,
SigLIP image processing to the model's resolution, mean/std 0.5, bilinear resize as our transforms).

Memory: each of our parameters is read alone (one layer of a scan-stacked `.npz` array straight from the file),
turned into its HF tensors (views), cast if asked, and streamed into the shard whose header was written first,
so the host holds about one tensor, never the model or a shard.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import auto as tqdm

from paligemma_ft.checkpoints import fit, hf, hf_files, hf_names
from paligemma_ft.checkpoints.npz import ArraySpec, CheckpointError
from paligemma_ft.model import Model
from paligemma_ft.model.presets import resolve_img_config, resolve_llm_config

_LOG = logging.getLogger(__name__)
FLOATS = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class Summary:
    """What a conversion wrote: `parameters` (count), `dtypes` (name -> tensors), `files`, `bytes`."""

    destination: str
    parameters: int
    dtypes: dict[str, int]
    files: list[str]
    bytes: int
    notes: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        dtypes = ", ".join(f"{n} {d}" for d, n in sorted(self.dtypes.items()))
        lines = [
            f"Wrote {self.destination}: {self.parameters:,} parameters ({dtypes} tensors), "
            f"{len(self.files)} file(s), {self.bytes / 1e9:.2f} GB: {', '.join(self.files)}"
        ]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def cast(name: str, array: np.ndarray, dtype: Any) -> np.ndarray:
    """`array` in `dtype` (None keeps it), refusing values the target cannot hold.

    Raises:
      CheckpointError: `dtype` is not a float dtype PaliGemma is stored in, or a finite value overflows it
        (e.g. above 65 504 in float16); the message names the tensor and what to pass instead.
    """
    if dtype is None or array.dtype == np.dtype(dtype):
        return array
    target = np.dtype(dtype)
    if target.name not in FLOATS:
        raise CheckpointError(f"--dtype {target.name}: parameters are stored as {', '.join(FLOATS)}, not {target}.")
    with np.errstate(over="ignore"):  # Overflow is checked, and reported by name, just below.
        out = array.astype(target)
    finite_before = np.isfinite(array.astype(np.float32))
    if not np.isfinite(out.astype(np.float32))[finite_before].all():
        peak = float(np.abs(array.astype(np.float32)[finite_before]).max())
        raise CheckpointError(
            f"{name}: values up to {peak:.4g} do not fit {target.name} (its largest is "
            f"{float(jnp.finfo(target).max):.4g}); convert to bfloat16 or float32 instead."
        )
    return out


def per_layer_abstract(model_config: Mapping[str, Any], image_size: int) -> dict[str, Any]:
    """Our per-layer parameter shapes for the model (scan off in both towers), from `jax.eval_shape`."""
    cfg = {t: {**dict(model_config.get(t) or {}), "scan": False} for t in ("img", "llm")}
    z = jnp.zeros((1, 4), jnp.int32)
    image = jnp.zeros((1, image_size, image_size, 3))
    model = Model(img=cfg["img"], llm=cfg["llm"])
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), image, z, z)["params"])


def write_processor(folder: str | os.PathLike, tokenizer_model: bytes, image_size: int, num_image_tokens: int) -> None:
    """Writes the tokenizer and processor files `AutoProcessor.from_pretrained(folder)` reads.

    Built with transformers' own classes from our SentencePiece model: special pieces named as in the model, no
    extra tokens, then `<image>` appended, which therefore gets id = our vocabulary size, the row the export pads.

    Raises:
      CheckpointError: the tokenizer's `<image>` id would not be the model's placeholder row.
    """
    import sentencepiece as spm  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    sp = spm.SentencePieceProcessor(model_proto=tokenizer_model)
    special = {k: sp.id_to_piece(getattr(sp, f"{k}_id")()) for k in ("bos", "eos", "pad", "unk")}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(tokenizer_model)
        tok = transformers.GemmaTokenizer.from_pretrained(
            tmp, **{f"{k}_token": v for k, v in special.items()}, mask_token=None
        )
    image = transformers.AddedToken("<image>", normalized=False, special=True)
    tok.add_special_tokens({"additional_special_tokens": [image]})
    if tok.convert_tokens_to_ids("<image>") != sp.get_piece_size():
        raise CheckpointError(
            f"the tokenizer's <image> id is {tok.convert_tokens_to_ids('<image>')}, not {sp.get_piece_size()} "
            "(the model's placeholder row); is it the tokenizer the model was trained with?"
        )
    images = transformers.SiglipImageProcessor(
        size={"height": image_size, "width": image_size},
        resample=2,  # Bilinear, as `data.transforms.resize`.
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,  # [0, 255] -> [-1, 1], big_vision's value range.
    )
    images.image_seq_length = num_image_tokens  # type: ignore[attr-defined]  # Read by PaliGemmaProcessor.
    transformers.PaliGemmaProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    (Path(folder) / "tokenizer.model").write_bytes(tokenizer_model)  # Also for slow tokenizers and our loader.


def export(
    source: fit.ParamSource,
    model_config: Mapping[str, Any],
    image_size: int,
    outdir: str | os.PathLike,
    *,
    dtype: Any = None,
    max_shard_bytes: int = hf_files.DEFAULT_SHARD_BYTES,
    tokenizer_model: bytes | None = None,
    progress: bool = False,
) -> Summary:
    """Writes `source` (our parameters, scan or per-layer) as an HF PaliGemma folder `outdir`.

    Args:
      source: the parameters; every one the model has must be there, and nothing else.
      model_config: our `dict(img=..., llm=...)`; `image_size`: the resolution of `config.json`.
      dtype: cast every tensor to it (`float32`, `bfloat16`, `float16`); None keeps each tensor's dtype.
      max_shard_bytes: above this the weights are split into shards with an index.
      tokenizer_model: our SentencePiece model's bytes, for the processor files (None: weights and config only).

    Raises:
      CheckpointError: `outdir` is not empty, the parameters do not fit the model, a setting HF cannot express,
        a value the dtype cannot hold; ValueError from `to_hf_config` for a setting HF cannot express.
    """
    out = Path(outdir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists and is not an empty folder; choose a new destination.")
    llm = resolve_llm_config(model_config.get("llm"))
    img = resolve_img_config(model_config.get("img"), llm_width=llm["width"])
    hf_config = hf.to_hf_config(model_config, image_size=image_size)  # Refuses what HF cannot express, early.
    plan = fit.plan_fit(source, per_layer_abstract(model_config, image_size), allow_missing=False)
    specs = plan.source.specs()
    vocab = plan.shapes["llm/embedder/input_embedding"][0]
    rules = hf_names.rules_for(img, llm)

    # The whole file layout first (names, shapes, dtypes): shard headers are written before any data.
    layout: list[tuple[str, ArraySpec]] = []
    for rule in rules:
        stored = specs[rule.ours]
        target = np.dtype(dtype) if dtype is not None else stored.dtype
        views = rule.to_hf(hf_names.zero_copy(plan.shapes[rule.ours], stored.dtype))
        layout += [(hf_names.in_layout(n), ArraySpec(tuple(v.shape), target)) for n, v in zip(rule.hf, views)]
    table = specs["llm/embedder/input_embedding"]
    table_dtype = np.dtype(dtype) if dtype is not None else table.dtype
    embedding = hf_names.in_layout(hf_names.EMBEDDING)
    layout.append((embedding, ArraySpec((hf.hf_vocab_size(vocab), llm["width"]), table_dtype)))

    out.mkdir(parents=True, exist_ok=True)
    writer = hf_files.ShardedWriter(out, layout, max_shard_bytes=max_shard_bytes)
    dtypes: dict[str, int] = {}
    try:
        bar = tqdm.tqdm(total=len(rules) + 1, desc="convert", unit="param", disable=not progress)
        for rule in rules:
            arrays = rule.to_hf(plan.read(rule.ours))
            for name, array in zip(rule.hf, arrays):
                array = cast(name, array, dtype)
                writer.write(hf_names.in_layout(name), array)
                dtypes[array.dtype.name] = dtypes.get(array.dtype.name, 0) + 1
            bar.update(1)
        # Zero rows for <image> and the padding (`hf.pad_vocab`), written after the table without a padded copy.
        writer.write(embedding, cast(embedding, plan.read("llm/embedder/input_embedding"), dtype), pad_rows=True)
        dtypes[table_dtype.name] = dtypes.get(table_dtype.name, 0) + 1
        bar.update(1)
        bar.close()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    hf_config.dtype = table_dtype.name  # What `from_pretrained(dtype="auto")` builds the model in.
    hf_config.save_pretrained(out)
    notes = []
    if tokenizer_model is not None:
        write_processor(out, tokenizer_model, image_size, (image_size // img["patch_size"][0]) ** 2)
    else:
        notes.append("no tokenizer given: no processor files (pass --tokenizer for AutoProcessor)")
    files = sorted(p.name for p in out.iterdir())
    size = sum((out / f).stat().st_size for f in files)
    n_params = sum(int(np.prod(s)) for s in plan.shapes.values())
    return Summary(str(out), n_params, dtypes, files, size, notes)
