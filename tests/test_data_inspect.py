"""Batch inspector: the token table for generated data and the invariant checks on hand-made batches."""

import io

import numpy as np
import pytest

from paligemma_ft import tokenizer as tokenizer_lib
from paligemma_ft.data import inspect as inspect_lib
from paligemma_ft.data import pipeline

L = 16


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.Tokenizer.from_spec("builtin:tiny")


def train_batch(tok, suffixes=("a red circle", "a blue square"), length=L):
    rows = [tokenizer_lib.make_train_example(tok, "caption en", s, length)[0] for s in suffixes]
    batch = tokenizer_lib.stack(rows)
    batch["image"] = np.zeros((len(rows), 28, 28, 3), np.float32)
    batch["_mask"] = np.ones(len(rows), bool)
    return batch


def test_roles_follow_tokens_and_mask_ar(tok):
    batch = train_batch(tok)
    roles = inspect_lib.token_roles(batch["text"][0], batch["mask_ar"][0], tok)
    n_prefix = len(tok.encode("caption en")) + 1
    n_suffix = len(tok.encode("a red circle"))
    assert roles == (
        ["prefix"] * n_prefix
        + ["separator"] * len(tok.sep_ids)
        + ["suffix"] * n_suffix
        + ["eos"]
        + ["pad"] * (L - n_prefix - len(tok.sep_ids) - n_suffix - 1)
    )


def test_clean_batch_has_no_problems(tok):
    assert inspect_lib.check_batch(train_batch(tok), tok) == []
    prompts = tokenizer_lib.stack([tokenizer_lib.make_prompt(tok, "caption en", L)[0]])
    assert inspect_lib.check_batch(prompts, tok) == []


def test_flags_loss_on_a_prefix_token(tok):
    batch = train_batch(tok)
    batch["mask_loss"][1, 1] = 1  # Hand-made mistake: loss on the first prefix word.
    problems = inspect_lib.check_batch(batch, tok)
    assert len(problems) == 1
    assert problems[0].startswith("error: example 1: loss on 1 prefix token(s), first at position 1")


def test_flags_padding_loss_missing_eos_and_empty_loss(tok):
    batch = train_batch(tok, ("a red circle", "a blue square", "a green star"))
    batch["mask_loss"][0, -1] = 1  # Loss on padding.
    eos = list(batch["text"][1]).index(tok.eos_id)
    batch["text"][1, eos] = tok.pad_id  # Suffix without EOS, though the row is not full.
    batch["mask_loss"][2] = 0  # No loss at all.
    problems = inspect_lib.check_batch(batch, tok)
    assert any(p.startswith("error: example 0: loss on 1 padding token") for p in problems)
    assert any(p.startswith("error: example 1: the suffix does not end with EOS") for p in problems)
    assert any(p.startswith("warning: example 2: no token has loss") for p in problems)
    batch["_mask"][:] = False  # Evaluation padding rows are not checked.
    assert inspect_lib.check_batch(batch, tok) == []


def test_counts_truncation_and_eos_without_loss(tok):
    batch = train_batch(tok, ("a red circle and a blue square and a green triangle", "a red circle"), length=10)
    eos = list(batch["text"][1]).index(tok.eos_id)
    batch["mask_loss"][1, eos] = 0
    problems = inspect_lib.check_batch(batch, tok)
    assert "warning: 1 of 2 examples truncated at length 10" in problems[-1]
    assert any("example 1: the EOS has no loss" in p for p in problems)


def test_table_for_generated_data(tok):
    cfg = {"data": {"source": "shapes", "n": 8, "image_size": 32}, "res": 28, "text_len": 24, "batch_size": 2}
    batch = next(pipeline.make_train_iter(cfg, tok, process_index=0, process_count=1))
    table = inspect_lib.format_batch_table(batch, tok, index=1)
    lines = table.splitlines()
    assert lines[0] == "example 1 of 2"
    assert lines[1].split() == ["pos", "id", "piece", "role", "mask_ar", "mask_loss"]
    assert "image x 4" in lines[2]  # (28 / 14)^2 image tokens.
    assert lines[3].split()[:4] == ["0", str(tok.bos_id), "<s>", "prefix"]
    assert any(line.split()[3:] == ["separator", "0", "0"] for line in lines)
    eos_rows = [line for line in lines if " eos " in line]
    assert len(eos_rows) == 1 and eos_rows[0].split()[-2:] == ["1", "1"]
    assert lines[-1].split()[3:5] == ["pad", "x"] and lines[-1].split()[-2:] == ["1", "0"]


def test_inspect_main_prints_and_returns_status(tok):
    config = {
        "tokenizer": "builtin:tiny",
        "model": {"img": {"variant": "mu/16"}},
        "input": {
            "data": {"source": "shapes", "n": 6, "image_size": 32, "task": "count"},
            "res": 32,
            "text_len": 32,
            "batch_size": 2,
        },
    }
    out = io.StringIO()
    assert inspect_lib.inspect_main(config, n_batches=2, stream=out) == 0
    text = out.getvalue()
    assert text.count("batch ") == 2 and "image x 4" in text and "checks: ok" in text and "bad input: none" in text
