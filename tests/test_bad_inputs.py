"""The bad-input corpus (`tests/data/bad/`, from `scripts/make_bad_corpus.py`) through the data pipeline.

Every case goes through the training pipeline under both policies: under "skip" a bad example never reaches a
batch (its place takes a good one) and is counted once with its file, line and reason while every good example
still arrives; under "error" the run stops
with a `BadExample` whose message starts with `file:line`. Unusual but valid inputs (a 1x1 image, CMYK, 16-bit,
an animated GIF, a 100 000-character caption) are accepted under both policies.
"""

import collections
import importlib.util
import pathlib
import re

import numpy as np
import pytest

from paligemma_ft.data import pipeline
from paligemma_ft.data.transforms import BadExample
from paligemma_ft.tokenizer import Tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "data" / "bad"
DATASET = CORPUS / "dataset"
RES, TEXT_LEN = 16, 24
CASE_LINE = 3

# Case -> the reason it is refused with, or None for inputs that must be accepted.
EXPECTED = {
    "truncated_jpeg": "unreadable_image",
    "png_wrong_crc": "unreadable_image",
    "zero_byte": "empty_image",
    "text_named_jpg": "unreadable_image",
    "one_pixel": None,
    "bomb_header_only": "decompression_bomb",
    "cmyk_jpeg": None,
    "png_16bit": None,
    "animated_gif": None,
    "invalid_json": "malformed_json",
    "non_utf8": "non_utf8",
    "missing_image_field": "missing_image_field",
    "missing_suffix": "missing_suffix",
    "wrong_type_suffix": "bad_field",
    "wrong_type_prefix": "bad_field",
    "wrong_type_image": "missing_image_field",
    "long_caption": None,
    "path_escape": "path_escape",
}
REFUSED = sorted(k for k, v in EXPECTED.items() if v is not None)
ACCEPTED = sorted(k for k, v in EXPECTED.items() if v is None)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_spec("builtin:tiny")


def _script():
    spec = importlib.util.spec_from_file_location("make_bad_corpus", ROOT / "scripts" / "make_bad_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def input_cfg(path, **kw):
    data = {"source": "jsonl", "path": str(path), "image_dir": str(DATASET)}
    return {"data": data, "res": RES, "text_len": TEXT_LEN, "batch_size": 2, "num_workers": 2, **kw}


def rows(batch):
    return [tuple(r) for r in batch["text"].tolist()]


def test_corpus_matches_the_script_and_is_small(tmp_path):
    script = _script()
    assert sorted(script.CASES) == sorted(EXPECTED)
    script.main(["--out", str(tmp_path / "bad")])
    fresh = sorted(p.relative_to(tmp_path / "bad") for p in (tmp_path / "bad").rglob("*") if p.is_file())
    committed = sorted(p.relative_to(CORPUS) for p in CORPUS.rglob("*") if p.is_file())
    assert fresh == committed, "Stale corpus: run scripts/make_bad_corpus.py"
    for rel in fresh:  # JSONL and hand-built bytes are exact; Pillow-encoded images may differ between versions.
        if rel.suffix == ".jsonl" or rel.name in ("zero.jpg", "text.jpg", "bomb_30000x30000.png"):
            assert (tmp_path / "bad" / rel).read_bytes() == (CORPUS / rel).read_bytes(), rel
    assert sum((CORPUS / rel).stat().st_size for rel in committed) < 200_000
    assert (DATASET / "images" / "bomb_30000x30000.png").stat().st_size < 200  # Header only.


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_skip_policy_drops_and_counts_the_bad_example(tok, case):
    path = DATASET / f"{case}.jsonl"
    report = pipeline.BadInputReport()
    it = pipeline.make_train_iter(input_cfg(path), tok, process_index=0, process_count=1, report=report)
    usable = 5 if EXPECTED[case] is None else 4
    batches = [next(it) for _ in range(usable)]  # 2 x usable rows: more than one epoch of the 5 examples.
    seen = [r for b in batches for r in rows(b)]
    assert len(set(seen)) == usable  # Every good example, and no other row.
    for b in batches:
        assert b["image"].shape == (2, RES, RES, 3) and np.isfinite(b["image"]).all()
        assert -1 <= b["image"].min() and b["image"].max() <= 1
    if EXPECTED[case] is None:
        assert report.entries == [] and "bad input: none" in report.summary()
    else:  # Counted once although the pipeline met it in both epochs.
        assert report.entries == [(str(path), CASE_LINE, EXPECTED[case])]
        assert report.counts == {EXPECTED[case]: 1}
        assert f"{path}:{CASE_LINE}" in report.summary()
    assert report.num_truncated == (1 if case == "long_caption" else 0)


@pytest.mark.parametrize("case", REFUSED)
def test_error_policy_names_file_and_line(tok, case):
    path = DATASET / f"{case}.jsonl"
    with pytest.raises(BadExample, match=re.escape(f"{path}:{CASE_LINE}: ")) as info:
        it = pipeline.make_train_iter(input_cfg(path, bad_input="error"), tok, process_index=0, process_count=1)
        for _ in range(3):  # One epoch of five examples: the bad one is met.
            next(it)
    assert info.value.reason == EXPECTED[case]
    assert (info.value.file, info.value.line) == (str(path), CASE_LINE)


@pytest.mark.parametrize("case", ACCEPTED)
def test_error_policy_accepts_unusual_but_valid_inputs(tok, case):
    path = DATASET / f"{case}.jsonl"
    data = input_cfg(path)["data"]
    batches = list(
        pipeline.make_eval_batches(
            data, input_cfg(path, bad_input="error"), tok, 5, kind="train", process_index=0, process_count=1
        )
    )
    assert len(batches) == 1 and batches[0]["_mask"].all()
    meta = batches[0]["_meta"][CASE_LINE - 1]
    assert meta["line"] == CASE_LINE and meta["id"] == f"{case}.jsonl:{CASE_LINE}"
    image = batches[0]["image"][CASE_LINE - 1]
    assert image.shape == (RES, RES, 3) and -1 <= image.min() and image.max() <= 1
    if case == "one_pixel":  # (10, 200, 30) everywhere after upscaling.
        np.testing.assert_allclose(image[RES // 2, RES // 2], np.array([10, 200, 30]) / 127.5 - 1, atol=1e-5)
    if case == "long_caption":  # Cut to the sequence length: the loss covers the suffix to the end.
        assert batches[0]["mask_loss"][CASE_LINE - 1, -1] == 1


@pytest.mark.parametrize("kind", ["train", "prompt"])
def test_all_cases_in_one_file_through_evaluation(tok, tmp_path, kind):
    """Each case as one line of one file: parse-time failures are left out, load-time ones masked, all counted.

    Prompts (kind "prompt", for decoding) need no target, so there a line without a suffix is usable.
    """
    expected = {**EXPECTED, "missing_suffix": None} if kind == "prompt" else EXPECTED
    script = _script()
    names = sorted(expected)
    path = tmp_path / "all.jsonl"
    path.write_bytes(b"\n".join(script.CASES[n] for n in names) + b"\n")
    report = pipeline.BadInputReport()
    data = input_cfg(path)["data"]
    batches = list(
        pipeline.make_eval_batches(
            data, input_cfg(path), tok, 4, kind=kind, process_index=0, process_count=1, report=report
        )
    )
    metas = [m for b in batches for m in b["_meta"]]
    mask = [bool(v) for b in batches for v in b["_mask"]]
    accepted_lines = {m["line"] for m, ok in zip(metas, mask) if ok}
    assert accepted_lines == {i + 1 for i, n in enumerate(names) if expected[n] is None}
    bad_rows = {m["line"]: m["bad"] for m in metas if m.get("bad")}
    assert bad_rows and all(expected[names[line - 1]] == reason for line, reason in bad_rows.items())
    assert sorted(report.entries, key=lambda e: e[1]) == [
        (str(path), i + 1, expected[n]) for i, n in enumerate(names) if expected[n] is not None
    ]
    assert report.counts == dict(collections.Counter(v for v in expected.values() if v is not None))
    with pytest.raises(BadExample, match=re.escape(f"{path}:")) as info:
        list(
            pipeline.make_eval_batches(
                data, input_cfg(path, bad_input="error"), tok, 4, kind=kind, process_index=0, process_count=1
            )
        )
    # Rows that cannot be parsed fail when the file is read, before any image is opened.
    parse_time = [
        i + 1
        for i, n in enumerate(names)
        if expected[n] in ("malformed_json", "non_utf8", "missing_image_field", "bad_field")
    ]
    assert info.value.line == min(parse_time)
    assert info.value.reason == expected[names[info.value.line - 1]]
