"""Evaluation over whole splits with the bundled demo model: every example scored once, decoding compiled once,
and `paligemma-ft evaluate` (table, eval_metrics.json, predictions)."""

import json
import re
import shutil
import textwrap

import ml_collections
import numpy as np
import pytest

from paligemma_ft import decode as decode_lib
from paligemma_ft.checkpoints.loading import checkpoint_path
from paligemma_ft.commands import cli
from paligemma_ft.data.shapes import encode_image, make_example
from paligemma_ft.evaluate.evaluators import PP_NOT_RUN
from paligemma_ft.evaluate.runner import (
    EvalConfigError,
    check_evals,
    decoding,
    evaluate_command,
    format_table,
    run_evals,
)
from paligemma_ft.predictor import load_predictor

DECODE_LEN = 13  # Used by no other test, so this file's decode function starts with no trace.


def _config(n=37, batch_size=8, **evals):
    data = dict(source="shapes", n=n, seed=0, task="caption", image_size=64)
    return ml_collections.ConfigDict(
        dict(
            model_name_or_preset="demo",
            model={},
            model_init="builtin:demo",
            tokenizer="builtin:tiny",
            input=dict(data=data, prefix="caption en", res=64, text_len=16, batch_size=8, num_workers=0),
            evals=evals
            or dict(val=dict(type="caption", data=data, batch_size=batch_size, max_decode_len=DECODE_LEN, bootstrap=0)),
        )
    )


def test_37_examples_in_batches_of_8_are_scored_once_with_one_compilation(tmp_path):
    config = _config()
    predictor = load_predictor("builtin:demo", "builtin:tiny", preset="demo", res=64)
    shapes, generate = [], predictor.generate

    def recording(batch, **kw):
        shapes.append((np.shape(batch["text"]), int(np.sum(batch["_mask"]))))
        return generate(batch, **kw)

    predictor.generate = recording
    before = decode_lib.trace_count(predictor.model, DECODE_LEN)
    metrics = run_evals(config, predictor, tmp_path, step=3)
    after = decode_lib.trace_count(predictor.model, DECODE_LEN)

    assert after - before == 1  # Five batches, the last one padded: one trace (one compilation) in all.
    assert [rows for _, rows in shapes] == [8, 8, 8, 8, 5] and len({s for s, _ in shapes}) == 1
    assert metrics["val/n"] == 37
    rows = [json.loads(line) for line in (tmp_path / "predictions_val_step3.jsonl").read_text().splitlines()]
    assert len(rows) == 37 and len({r["id"] for r in rows}) == 37
    assert all(isinstance(r["prediction"], str) and r["references"] for r in rows)
    assert (tmp_path / "gallery_val_step3.html").exists()
    assert 0.0 <= metrics["val/cider"] and np.isfinite(list(metrics.values())).all()


def test_big_vision_pred_and_pred_kw_decode_as_our_own_keys(tmp_path):
    data = dict(source="shapes", n=6, seed=0, task="caption", image_size=64)
    ours = dict(type="caption", data=data, batch_size=8, max_decode_len=6, sampler="beam(2)", bootstrap=0)
    theirs = dict(
        type="coco_caption",
        data=data,
        batch_size=8,
        pred="beam_decode",
        pred_kw=dict(max_decode_len=6, beam_size=2, eos_token=1),
        bootstrap=0,
    )
    predictor = load_predictor("builtin:demo", "builtin:tiny", preset="demo", res=64)
    seen, generate = [], predictor.generate

    def recording(batch, **kw):
        seen.append((predictor.max_decode_len, predictor.sampler))
        return generate(batch, **kw)

    predictor.generate = recording
    run_evals(_config(ours=ours, theirs=theirs), predictor, tmp_path, step=0)
    assert seen == [(6, "beam(2)"), (6, "beam(2)")]
    a, b = ((tmp_path / f"predictions_{n}_step0.jsonl").read_text() for n in ("ours", "theirs"))
    assert [json.loads(x)["prediction"] for x in a.splitlines()] == [
        json.loads(x)["prediction"] for x in b.splitlines()
    ]


@pytest.mark.parametrize(
    "entry, want",
    [
        (dict(pred="decode", pred_kw=dict(max_decode_len=9, sampler="nucleus(0.5)")), (9, "nucleus(0.5)")),
        (dict(pred="decode_with_logp", pred_kw=dict(best_of_n=1, eos_look_behind=0)), (32, "greedy")),
        (dict(max_decode_len=5, pred_kw=dict(max_decode_len=5)), (5, "greedy")),
        (dict(type="perplexity", pred="logits"), (32, "greedy")),
        (dict(pred="logits"), "pred='logits': this evaluator takes one of decode, decode_with_logp, beam_decode"),
        (dict(pred_kw=dict(beam=2)), "config.evals.e.pred_kw: unknown key(s) ['beam']"),
        (dict(pred_kw=dict(best_of_n=4)), "config.evals.e.pred_kw.best_of_n=4: only 1 is supported"),
        (dict(max_decode_len=5, pred_kw=dict(max_decode_len=6)), "max_decode_len is given twice, 5 and pred_kw"),
        (dict(pred="beam_decode"), "pred='beam_decode' takes pred_kw.beam_size"),
        (dict(pred_kw=dict(beam_size=3)), "pred_kw.beam_size needs pred='beam_decode'"),
        (dict(pred="beam_decode", pred_kw=dict(beam_size=0)), "config.evals.e.pred_kw.beam_size=0: must be"),
        (dict(pred_kw=dict(sampler="top_k(0)")), "config.evals.e.sampler: sampler 'top_k(0)': k must be"),
    ],
)
def test_decoding_settings_and_their_errors(entry, want):
    ecfg = {"type": "caption", **entry}
    if isinstance(want, tuple):
        assert decoding("e", ecfg) == want
    else:
        with pytest.raises(EvalConfigError, match=re.escape(want)):
            decoding("e", ecfg)


@pytest.mark.parametrize("key, where", [("split", "data.split"), ("prompt", "prefix"), ("every", "options")])
def test_big_vision_keys_that_do_nothing_here_are_refused(key, where):
    data = dict(source="shapes", n=4, seed=0, task="caption", image_size=64)
    config = _config(val=dict(type="caption", data=data, bootstrap=0, **{key: "x"}))
    with pytest.raises(ValueError, match=rf"evaluator 'val'.*'{key}'.*{re.escape(where)}"):
        run_evals(config, None, "unused", step=0)


def test_a_big_vision_pp_fn_is_accepted_with_one_warning(caplog):
    data = dict(source="shapes", n=4, seed=0, task="caption", image_size=64)
    pp = "decode|resize(224)|strfmt('caption en', outkey='prefix')|tok(key='prefix')"
    config = _config(val_pp=dict(type="caption", data=data, bootstrap=0, pp_fn=pp))
    for _ in range(2):
        check_evals(config.evals.to_dict())
    warned = [r.getMessage() for r in caplog.records if "pp_fn" in r.getMessage()]
    assert warned == [f"config.evals.val_pp.pp_fn: {PP_NOT_RUN}"]
    assert "config.input.prefix" in PP_NOT_RUN


CONFIG_FILE = """
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model_name_or_preset = ""       # Inferred from the checkpoint's shapes.
    c.model = dict()
    c.model_init = ""                 # Nothing: --workdir or --checkpoint must say what to evaluate.
    c.tokenizer = "builtin:tiny"
    data = dict(source="shapes", n=10, seed=0, task="caption", image_size=64)
    c.input = dict(data=data, prefix="caption en", res=64, text_len=16, batch_size=4, num_workers=0)
    c.evals = dict(
        val=dict(type="caption", data=data, batch_size=4, max_decode_len=8, bootstrap=0),
        ppl=dict(type="perplexity", data=data, batch_size=4),
    )
    return c
"""


def test_cli_evaluate_prints_a_table_and_writes_eval_metrics(tmp_path, capsys):
    config = tmp_path / "cfg.py"
    config.write_text(textwrap.dedent(CONFIG_FILE))
    workdir = tmp_path / "run"
    workdir.mkdir()
    shutil.copy(checkpoint_path("builtin:demo"), workdir / "params.npz")  # As a finished run leaves it.
    (workdir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 5, "train/loss": 1.0}\n')

    assert cli.main(["evaluate", "--config", str(config), "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    record = json.loads((workdir / "eval_metrics.json").read_text())
    assert record["step"] == 5 and record["checkpoint"] == str(workdir)
    metrics = record["metrics"]
    assert metrics["val/n"] == 10 and metrics["ppl/n"] == 10
    assert np.isclose(metrics["ppl/perplexity"], np.exp(metrics["ppl/loss"]))
    assert format_table(metrics) in out
    table = out.splitlines()
    assert any(line.split() == ["evaluator", "metric", "value"] for line in table)
    assert any(line.split()[:2] == ["val", "cider"] for line in table)
    assert any(line.split() == ["ppl", "n", "10"] for line in table)
    for name in ("val", "ppl"):
        assert (workdir / f"predictions_{name}_step5.jsonl").exists()
        assert (workdir / f"gallery_{name}_step5.html").exists()

    # --checkpoint with --outdir and --only: the checkpoint's file, one evaluator, the outputs elsewhere.
    outdir = tmp_path / "elsewhere"
    assert (
        cli.main(
            [
                "evaluate",
                "--config",
                str(config),
                "--checkpoint",
                "builtin:demo",
                "--outdir",
                str(outdir),
                "--only",
                "ppl",
            ]
        )
        == 0
    )
    record = json.loads((outdir / "eval_metrics.json").read_text())
    assert set(record["metrics"]) == {"ppl/loss", "ppl/perplexity", "ppl/n"} and record["step"] == 0
    assert sorted(p.name for p in outdir.iterdir()) == [
        "eval_metrics.json",
        "gallery_ppl_step0.html",
        "predictions_ppl_step0.jsonl",
    ]
    assert np.isclose(record["metrics"]["ppl/loss"], metrics["ppl/loss"], rtol=1e-5)  # Same params, same split.


def test_cli_evaluate_errors_are_one_line(tmp_path, capsys):
    config = tmp_path / "cfg.py"
    config.write_text(textwrap.dedent(CONFIG_FILE))
    empty = tmp_path / "empty_run"
    empty.mkdir()
    cases = [  # (extra argv, words the message must contain)
        ([], ["--checkpoint", "--workdir", "model_init"]),
        (["--checkpoint", "builtin:demo"], ["--outdir"]),
        (["--workdir", str(empty)], [str(empty), "params.npz"]),
        (["--checkpoint", "builtin:demo", "--outdir", str(tmp_path), "--only", "nope"], ["nope", "ppl", "val"]),
        (["--checkpoint", "builtin:nope", "--outdir", str(tmp_path)], ["builtin:nope"]),
    ]
    for extra, words in cases:
        assert cli.main(["evaluate", "--config", str(config), *extra]) == 2, extra
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and err.count("\n") == 1, (extra, err)
        for word in words:
            assert word in err, (extra, word, err)
    assert not (tmp_path / "eval_metrics.json").exists()


def test_bad_rows_are_listed_with_file_line_and_reason(tmp_path, capsys):
    """A split with good rows, a missing image, a malformed line and a text file named .png: the bad rows are
    masked, and listed in the output folder; the command names the list."""
    folder = tmp_path / "split"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(encode_image(make_example(0, i, "caption", 64)["image"]))
    (folder / "fake.png").write_text("not an image")
    lines = [
        '{"image": "0.png", "suffix": "a"}',
        '{"image": "missing.png", "suffix": "b"}',
        '{"image": "1.png", "suffix": "c"',
        '{"image": "fake.png", "suffix": "d"}',
        '{"image": "2.png", "suffix": "e"}',
    ]
    (folder / "val.jsonl").write_text("\n".join(lines) + "\n")
    split = str(folder / "val.jsonl")
    data = dict(source="jsonl", path=split)
    config = _config(val=dict(type="caption", data=data, batch_size=4, max_decode_len=DECODE_LEN, bootstrap=0))
    outdir = tmp_path / "out"
    metrics = evaluate_command(config, checkpoint="builtin:demo", outdir=outdir)
    assert metrics["val/n"] == 2  # Lines 1 and 5; line 3 cannot be parsed, lines 2 and 4 have no usable image.
    listed = [json.loads(line) for line in (outdir / "bad_rows_val.jsonl").read_text().splitlines()]
    assert sorted((r["file"], r["line"], r["reason"]) for r in listed) == [
        (split, 2, "missing_image"),
        (split, 3, "malformed_json"),
        (split, 4, "unreadable_image"),
    ]
    assert all(r["detail"] for r in listed)
    out = capsys.readouterr().out
    assert f"val: 3 bad row(s) of the split were not scored; listed in {outdir / 'bad_rows_val.jsonl'}" in out
    # A clean split later: the stale list is removed.
    (folder / "val.jsonl").write_text("\n".join([lines[0], lines[4]]) + "\n")
    evaluate_command(config, checkpoint="builtin:demo", outdir=outdir)
    assert not (outdir / "bad_rows_val.jsonl").exists()
    assert "bad row" not in capsys.readouterr().out
