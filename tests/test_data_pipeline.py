"""Pipeline: batch shapes, exact resume, process sharding, evaluation padding, the bad-input policy."""

import io
import json
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from paligemma_ft.data import pipeline, shapes
from paligemma_ft.data.transforms import BadExample
from paligemma_ft.tokenizer import Tokenizer

RES, TEXT_LEN = 32, 24


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_spec("builtin:tiny")


def input_cfg(data, **kw):
    return {"data": data, "res": RES, "text_len": TEXT_LEN, "batch_size": 4, "num_workers": 2, **kw}


def shapes_data(n, **kw):
    return {"source": "shapes", "n": n, "image_size": 32, **kw}


def text_ids(batch):
    """Row identities for comparing streams: the token rows (shapes captions differ between images)."""
    return [tuple(row) for row in batch["text"].tolist()]


def test_train_batches_have_fixed_shapes_and_dtypes(tok):
    it = pipeline.make_train_iter(input_cfg(shapes_data(10)), tok)  # jax's process index and count: 0 of 1.
    for _ in range(4):  # Past the end of the first epoch.
        batch = next(it)
        assert batch["image"].shape == (4, RES, RES, 3) and batch["image"].dtype == np.float32
        assert -1 <= batch["image"].min() and batch["image"].max() <= 1
        for key in ("text", "mask_ar", "mask_loss"):
            assert batch[key].shape == (4, TEXT_LEN + 1) and batch[key].dtype == np.int32
        assert batch["_mask"].dtype == bool and batch["_mask"].all()


def test_configdict_and_config_errors(tok):
    ml_collections = pytest.importorskip("ml_collections")
    cfg = ml_collections.ConfigDict(input_cfg(shapes_data(8)))
    assert next(pipeline.make_train_iter(cfg, tok, process_index=0, process_count=1))["text"].shape[0] == 4
    with pytest.raises(ValueError, match=r"unknown keys \['batchsize'\]"):
        pipeline.InputConfig.from_config({**input_cfg(shapes_data(8)), "batchsize": 3})
    with pytest.raises(ValueError, match="input.batch_size=4 is not divisible by the 3 processes"):
        pipeline.make_train_iter(input_cfg(shapes_data(8)), tok, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="input.bad_input='ignore'"):
        pipeline.InputConfig.from_config(input_cfg(shapes_data(8), bad_input="ignore"))


def test_shuffle_is_seeded_and_reshuffles_each_epoch(tok):
    def epoch_rows(seed):
        it = pipeline.make_train_iter(
            input_cfg(shapes_data(8), shuffle_seed=seed), tok, process_index=0, process_count=1
        )
        rows = [r for _ in range(4) for r in text_ids(next(it))]
        return rows[:8], rows[8:]

    first, second = epoch_rows(0)
    assert sorted(first) == sorted(second) and first != second  # Same examples, new order.
    assert epoch_rows(0) == (first, second) and epoch_rows(1)[0] != first


def test_exact_resume(tok):
    cfg = input_cfg(shapes_data(11), num_workers=2)
    straight = pipeline.make_train_iter(cfg, tok, process_index=0, process_count=1)
    expected = [next(straight) for _ in range(7)]
    first = pipeline.make_train_iter(cfg, tok, process_index=0, process_count=1)
    before = [next(first) for _ in range(3)]
    state = json.loads(json.dumps(first.get_state()))  # Survives a JSON round trip (checkpoint metadata).
    del first
    resumed = pipeline.make_train_iter({**cfg, "num_workers": 1}, tok, process_index=0, process_count=1)
    resumed.set_state(state)
    after = [next(resumed) for _ in range(4)]
    for got, want in zip(before + after, expected):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    other = pipeline.make_train_iter({**cfg, "shuffle_seed": 5}, tok, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="shuffle_seed"):
        other.set_state(state)


def test_two_processes_see_disjoint_examples_covering_the_data(tok):
    n = 12
    seen = []
    for pi in range(2):
        it = pipeline.make_train_iter(input_cfg(shapes_data(n), batch_size=4), tok, process_index=pi, process_count=2)
        batches = [next(it) for _ in range(3)]  # 3 x 2 rows = one epoch of the 6-example shard.
        assert all(b["text"].shape[0] == 2 for b in batches)  # Global batch 4 over 2 processes.
        seen.append({r for b in batches for r in text_ids(b)})
        assert len(seen[-1]) == 6
    all_rows = {
        r
        for r in text_ids(
            next(
                pipeline.make_eval_batches(
                    shapes_data(n), input_cfg(shapes_data(n)), tok, n, kind="train", process_index=0, process_count=1
                )
            )
        )
    }
    assert len(all_rows) == n
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == all_rows


@pytest.mark.parametrize("n, batch_size, processes", [(37, 8, 1), (32, 8, 1), (37, 8, 2), (3, 4, 4)])
def test_eval_reads_every_example_exactly_once(tok, n, batch_size, processes):
    data = shapes_data(n)
    ids, shapes_seen = [], set()
    per_process = []
    for pi in range(processes):
        batches = list(
            pipeline.make_eval_batches(
                data, input_cfg(data), tok, batch_size, kind="prompt", process_index=pi, process_count=processes
            )
        )
        per_process.append(len(batches))
        for batch in batches:
            shapes_seen.add((batch["image"].shape, batch["text"].shape, batch["mask_input"].shape))
            assert len(batch["_meta"]) == len(batch["_mask"]) == batch_size // processes
            ids += [m["id"] for m, valid in zip(batch["_meta"], batch["_mask"]) if valid]
            assert all(m.get("padding") for m, valid in zip(batch["_meta"], batch["_mask"]) if not valid)
    assert sorted(ids) == sorted(f"shapes-0-{i}" for i in range(n))  # Each exactly once.
    assert len(shapes_seen) == 1  # Padding never changes shapes.
    assert per_process == [pipeline.num_eval_batches(n, batch_size, processes)] * processes
    assert pipeline.num_eval_examples(data) == n


def test_eval_padding_copies_a_real_example(tok):
    data = shapes_data(5)
    last = list(
        pipeline.make_eval_batches(data, input_cfg(data), tok, 4, kind="train", process_index=0, process_count=1)
    )[-1]
    assert last["_mask"].tolist() == [True, False, False, False]
    assert last["mask_loss"].shape == (4, TEXT_LEN + 1)
    for row in range(1, 4):
        np.testing.assert_array_equal(last["text"][row], last["text"][0])
        np.testing.assert_array_equal(last["image"][row], last["image"][0])
    assert last["_meta"][0]["references"] == [shapes.make_example(0, 4)["suffix"]]


# -------------------------------------------------------------------------------------------------- bad input


def jpeg() -> bytes:
    out = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


BAD_CASES = {  # name -> (JSONL line (bytes), files to write, expected reason)
    "malformed_json": (b'{"image": "good.jpg", ', {}, "malformed_json"),
    "non_utf8": (b'{"image": "good.jpg", "suffix": "\xff\xfe"}', {}, "non_utf8"),
    "missing_image": (b'{"image": "nope.jpg", "suffix": "a red circle"}', {}, "missing_image"),
    "truncated_jpeg": (
        b'{"image": "cut.jpg", "suffix": "a red circle"}',
        {"cut.jpg": jpeg()[:200]},
        "unreadable_image",
    ),
    "zero_byte": (b'{"image": "empty.jpg", "suffix": "a red circle"}', {"empty.jpg": b""}, "empty_image"),
    "missing_suffix": (b'{"image": "good.jpg"}', {}, "missing_suffix"),
    "empty_suffix": (b'{"image": "good.jpg", "suffix": ""}', {}, "empty_suffix"),
    "bomb": (b'{"image": "bomb.png", "suffix": "a red circle"}', {"bomb.png": "header"}, "decompression_bomb"),
}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG header claiming width x height pixels, with no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def bad_folder(tmp_path, case):
    line, files, _ = BAD_CASES[case]
    (tmp_path / "good.jpg").write_bytes(jpeg())
    for name, data in files.items():
        (tmp_path / name).write_bytes(png_header_only(30000, 30000) if data == "header" else data)
    good = [json.dumps({"image": "good.jpg", "suffix": f"a red circle {k}"}).encode() for k in range(5)]
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(good[:2] + [line] + good[2:]) + b"\n")  # The bad example is line 3.
    return path


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_skip_counts_and_keeps_shapes(tok, tmp_path, case):
    path = bad_folder(tmp_path, case)
    report = pipeline.BadInputReport()
    it = pipeline.make_train_iter(
        input_cfg({"source": "jsonl", "path": str(path)}, batch_size=2),
        tok,
        process_index=0,
        process_count=1,
        report=report,
    )
    rows = [r for _ in range(5) for r in text_ids(next(it))]  # Two epochs of the 5 good examples.
    assert len(set(rows)) == 5
    assert report.entries == [(str(path), 3, BAD_CASES[case][2])]
    assert report.counts == {BAD_CASES[case][2]: 1}
    written = report.write(tmp_path)
    assert json.loads(written.read_text())["line"] == 3
    assert BAD_CASES[case][2] in report.summary()


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_error_names_file_and_line(tok, tmp_path, case):
    path = bad_folder(tmp_path, case)
    with pytest.raises(BadExample, match=re.escape(f"{path}:3")) as info:
        it = pipeline.make_train_iter(
            input_cfg({"source": "jsonl", "path": str(path)}, batch_size=2, bad_input="error", shuffle_seed=1),
            tok,
            process_index=0,
            process_count=1,
        )
        for _ in range(3):
            next(it)
    assert info.value.reason == BAD_CASES[case][2]


def test_exact_resume_across_skipped_examples(tok, tmp_path):
    cfg = input_cfg({"source": "jsonl", "path": str(bad_folder(tmp_path, "truncated_jpeg"))}, batch_size=2)
    straight = pipeline.make_train_iter(cfg, tok, process_index=0, process_count=1)
    expected = [text_ids(next(straight)) for _ in range(8)]
    first = pipeline.make_train_iter(cfg, tok, process_index=0, process_count=1)
    got = [text_ids(next(first)) for _ in range(3)]
    resumed = pipeline.make_train_iter(cfg, tok, process_index=0, process_count=1)
    resumed.set_state(first.get_state())
    assert got + [text_ids(next(resumed)) for _ in range(5)] == expected


def test_bad_eval_example_is_masked_and_reported(tok, tmp_path):
    path = bad_folder(tmp_path, "missing_image")
    report = pipeline.BadInputReport()
    batches = list(
        pipeline.make_eval_batches(
            {"source": "jsonl", "path": str(path)},
            input_cfg({}),
            tok,
            4,
            process_index=0,
            process_count=1,
            report=report,
        )
    )
    masks = np.concatenate([b["_mask"] for b in batches]).tolist()
    metas = [m for b in batches for m in b["_meta"]]
    assert masks == [True, True, False, True, True, True, False, False]
    assert metas[2]["bad"] == "missing_image" and metas[2]["line"] == 3
    assert report.entries == [(str(path), 3, "missing_image")]


def test_all_bad_examples_stop_with_a_clear_error(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"image": f"missing{k}.jpg", "suffix": "x"}) + "\n" for k in range(3)))
    it = pipeline.make_train_iter(
        input_cfg({"source": "jsonl", "path": str(path)}), tok, process_index=0, process_count=1
    )
    with pytest.raises(ValueError, match="Every example of input.data is bad"):
        next(it)
