"""Batch inspector: shows what the model sees, token by token, and checks the invariants fine-tunes rely on.

    pos  id    piece       role       mask_ar  mask_loss
    -    -     image x 256 image      0        0
    0    2     <bos>       prefix     0        0
    1    417   caption     prefix     0        0
    3    108   \\n          separator  0        0
    4    ...   ▁red        suffix     1        1
    9    1     <eos>       eos        1        1
    10-128 0   <pad>       pad x 119  1        0

Roles come from the tokens and `mask_ar` alone (prefix = the leading `mask_ar == 0` run ending with the
separator; suffix up to the first EOS; pads after it), so a wrong `mask_loss` shows up against them.
`check_batch` flags: loss on prefix/separator or padding, a suffix without EOS that was not truncated, an EOS
without loss, examples with no loss token, pads that are model input, and counts truncated examples.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, TextIO

import numpy as np

from paligemma_ft import tokenizer as tokenizer_lib

DEFAULT_PATCH = 14  # SigLIP So400m/14.


def token_roles(text: np.ndarray, mask_ar: np.ndarray, tok: tokenizer_lib.Tokenizer) -> list[str]:
    """Role of every position of one sequence: prefix, separator, suffix, eos or pad.

    Args:
      text: i32[L] token ids of one example.
      mask_ar: i32[L], 0 on the bidirectional prefix.
      tok: the tokenizer (for the EOS, pad and separator ids).
    """
    ids, ar = [int(t) for t in text], [int(m) for m in mask_ar]
    length = len(ids)
    prefix_end = next((p for p, m in enumerate(ar) if m != 0), length)
    roles = ["prefix"] * prefix_end
    sep = tok.sep_ids
    if sep and prefix_end >= len(sep) and ids[prefix_end - len(sep) : prefix_end] == sep:
        roles[prefix_end - len(sep) : prefix_end] = ["separator"] * len(sep)
    rest = ids[prefix_end:]
    if tok.eos_id in rest:
        eos = rest.index(tok.eos_id)
        return roles + ["suffix"] * eos + ["eos"] + ["pad"] * (len(rest) - eos - 1)
    pads = 0  # Trailing pad ids (a suffix never contains the pad id).
    while pads < len(rest) and rest[len(rest) - 1 - pads] == tok.pad_id:
        pads += 1
    return roles + ["suffix"] * (len(rest) - pads) + ["pad"] * pads


def _mask_keys(batch: Mapping[str, Any]) -> list[str]:
    return [k for k in ("mask_ar", "mask_loss", "mask_input") if k in batch]


def format_batch_table(
    batch: Mapping[str, Any], tok: tokenizer_lib.Tokenizer, index: int = 0, *, patch_size: int = DEFAULT_PATCH
) -> str:
    """One example of a batch as a text table: position, token id, piece, role and masks.

    Runs of padding with the same masks are one row. The image is one row, "image x N", N = (R / patch)^2.

    Args:
      batch: numpy batch with `image f32[B, R, R, 3]`, `text i32[B, L]`, `mask_ar` and `mask_loss` and/or
        `mask_input` (i32[B, L]).
      tok: the tokenizer.
      index: which example.
      patch_size: the ViT patch size, for the number of image tokens.
    """
    text, mask_ar = np.asarray(batch["text"][index]), np.asarray(batch["mask_ar"][index])
    keys = _mask_keys(batch)
    masks = {k: np.asarray(batch[k][index]) for k in keys}
    roles = token_roles(text, mask_ar, tok)
    pieces = tok.pieces(text)
    header = ["pos", "id", "piece", "role", *keys]
    rows: list[list[str]] = []
    if "image" in batch:
        image = np.asarray(batch["image"][index])
        tokens = (image.shape[0] // patch_size) * (image.shape[1] // patch_size)
        rows.append(
            [
                "-",
                "-",
                f"{image.shape[0]}x{image.shape[1]} [{image.min():.2f}, {image.max():.2f}]",
                f"image x {tokens}",
                *["0" if k != "mask_input" else "1" for k in keys],
            ]
        )
    p = 0
    while p < len(text):
        q = p + 1
        if roles[p] == "pad":  # Collapse a run of pads whose masks agree.
            while q < len(text) and roles[q] == "pad" and all(masks[k][q] == masks[k][p] for k in keys):
                q += 1
        if q - p > 1:
            rows.append(
                [
                    f"{p}-{q - 1}",
                    str(int(text[p])),
                    repr(pieces[p])[1:-1],
                    f"pad x {q - p}",
                    *[str(int(masks[k][p])) for k in keys],
                ]
            )
        else:
            rows.append(
                [str(p), str(int(text[p])), repr(pieces[p])[1:-1], roles[p], *[str(int(masks[k][p])) for k in keys]]
            )
        p = q
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    valid = bool(np.asarray(batch.get("_mask", np.ones(len(batch["text"]), bool)))[index])
    title = f"example {index} of {len(batch['text'])}" + ("" if valid else " (masked: padding)")
    return "\n".join([title, *lines])


def check_batch(batch: Mapping[str, Any], tok: tokenizer_lib.Tokenizer) -> list[str]:
    """The problems of a batch, each "error: ..." or "warning: ...", empty when all is well.

    Errors: loss on a prefix/separator or padding token; a suffix without EOS that is not truncated; an EOS
    without loss; padding with `mask_input` 1 or prefix with `mask_input` 0; images outside [-1, 1] or NaN.
    Warnings: an example with no loss token; suffix tokens without loss; how many examples were truncated.
    Rows with `_mask` False (evaluation padding) are not checked.
    """
    problems: list[str] = []
    text = np.asarray(batch["text"])
    valid = np.asarray(batch.get("_mask", np.ones(len(text), bool)), bool)
    truncated = 0
    for i in np.flatnonzero(valid):
        roles = token_roles(text[i], batch["mask_ar"][i], tok)
        where = f"example {i}"

        def positions(mask: np.ndarray, wanted: set[str]) -> list[int]:
            return [p for p, r in enumerate(roles) if r in wanted and mask[p]]

        if "mask_loss" in batch:
            loss = np.asarray(batch["mask_loss"][i]) != 0
            for wanted, name in (({"prefix", "separator"}, "prefix"), ({"pad"}, "padding")):
                bad = positions(loss, wanted)
                if bad:
                    problems.append(
                        f"error: {where}: loss on {len(bad)} {name} token(s), first at position "
                        f"{bad[0]} ({tok.pieces([int(text[i][bad[0]])])[0]!r})"
                    )
            if not loss.any():
                problems.append(f"warning: {where}: no token has loss (the example teaches nothing)")
            no_loss = positions(~loss, {"suffix"})
            if no_loss and loss.any():
                problems.append(f"warning: {where}: {len(no_loss)} suffix token(s) without loss")
            if "eos" in roles:
                if not loss[roles.index("eos")]:
                    problems.append(f"error: {where}: the EOS has no loss, so the model never learns to stop")
            elif "suffix" in roles:
                if roles[-1] == "suffix":  # The sequence is full: cut at the text length.
                    truncated += 1
                else:
                    problems.append(f"error: {where}: the suffix does not end with EOS and was not truncated")
        if "mask_input" in batch:
            inp = np.asarray(batch["mask_input"][i]) != 0
            if positions(inp, {"pad"}):
                problems.append(f"error: {where}: padding tokens have mask_input 1")
            if positions(~inp, {"prefix", "separator"}):
                problems.append(f"error: {where}: prefix tokens have mask_input 0")
    if truncated:
        problems.append(
            f"warning: {truncated} of {int(valid.sum())} examples truncated at length {text.shape[1]} "
            "(their suffix lost its EOS; raise input.text_len?)"
        )
    if "image" in batch:
        image = np.asarray(batch["image"])[valid]
        if not np.isfinite(image).all():
            problems.append("error: images contain NaN or inf")
        elif image.size and (image.min() < -1.0 - 1e-6 or image.max() > 1.0 + 1e-6):
            problems.append(f"error: image values span [{image.min():.3f}, {image.max():.3f}], expected [-1, 1]")
    return problems


def _patch_size(config: Any) -> int:
    """The ViT patch size from `config.model.img` (`patch_size`, or the `/14` of `variant`), else 14."""
    try:
        img = config["model"]["img"]
        if img.get("patch_size"):
            size = img["patch_size"]
            return int(size[0] if isinstance(size, (tuple, list)) else size)
        return int(str(img["variant"]).split("/")[1])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return DEFAULT_PATCH


def inspect_main(config: Any, n_batches: int = 1, *, stream: TextIO | None = None) -> int:
    """Builds the training pipeline of `config` and prints `n_batches` batches with their checks.

    Args:
      config: a full config with `input` and `tokenizer` (a spec such as "builtin:tiny" or a `.model` path).
      n_batches: how many batches to show (the table is for the first example of each).
      stream: where to print (default stdout).

    Returns:
      0 if no check reported an error, 1 otherwise (a process exit code).
    """
    from paligemma_ft.data.pipeline import make_train_iter  # noqa: PLC0415 - avoids an import cycle.

    out = stream or sys.stdout
    tok = tokenizer_lib.Tokenizer.from_spec(str(config["tokenizer"]))
    iterator = make_train_iter(config["input"], tok, process_index=0, process_count=1)
    errors = 0
    for k in range(n_batches):
        batch = next(iterator)
        shapes = ", ".join(f"{key} {v.dtype}{list(v.shape)}" for key, v in batch.items())
        print(f"batch {k}: {shapes}", file=out)
        print(format_batch_table(batch, tok, 0, patch_size=_patch_size(config)), file=out)
        problems = check_batch(batch, tok)
        errors += sum(p.startswith("error") for p in problems)
        print("\n".join(problems) if problems else "checks: ok", file=out)
    print(iterator.report.summary(), file=out)
    return 1 if errors else 0
