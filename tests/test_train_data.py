"""What the trainer tells about its data and its evaluations: truncated examples, batches with no loss token,
skipped examples listed in the workdir, and evaluation sampling that a resume reproduces."""

from __future__ import annotations

import io
import json
import pathlib

import pytest
from PIL import Image

from paligemma_ft.commands import cli
from paligemma_ft.config import load_config
from paligemma_ft.training import loop as train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_truncation_is_counted_per_step_and_reported(tiny_config, tmp_path, capsys):
    """ "caption en" takes 4 tokens (bos, 2 pieces, separator) and the shortest scene caption 4 with its EOS, so
    with text_len 6 (7 tokens) every example is cut, keeping 3 target tokens."""
    config = tiny_config(total_steps=2, ckpt_steps=0, evals={}, quiet=False)
    config.input.text_len = 6
    workdir = tmp_path / "run"
    train.run(config, workdir)
    rows = [r for r in _rows(workdir) if "train/loss" in r]
    assert [(r["train/truncated"], r["train/loss_tokens"]) for r in rows] == [(8, 3), (8, 3)]
    out = capsys.readouterr().out
    assert "warning: 8 of 8 examples of step 1 are longer than input.text_len=6 tokens and were cut" in out
    assert "Truncated: 16 of 16 training examples (100.0 %) were longer than input.text_len=6 tokens" in out
    report = (workdir / "report.md").read_text()
    assert "## Data" in report and "- Truncated: 16 of 16 training examples (100.0 %)" in report


def test_no_loss_token_in_the_first_batches_stops_with_one_error_line(tmp_path, capsys):
    """text_len 3 (4 tokens): the prompt and its separator fill every sequence; the loss would be 0."""
    args = ["train", "--config", str(ROOT / "configs" / "demo.py"), "--workdir", str(tmp_path / "run")]
    args += ["--config.model_init=", "--config.model_name_or_preset=tiny_pg1", "--config.input.res=32"]
    args += ["--config.input.data.image_size=32", "--config.input.text_len=3", "--config.input.batch_size=4"]
    args += ["--config.total_steps=5", "--config.evals={}", "--config.num_devices=2", "--config.quiet=True"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: no example in the first 3 training batches has a token with loss")
    assert "input.text_len=3" in err[0] and "Raise --config.input.text_len" in err[0]
    assert [r["train/loss_tokens"] for r in _rows(tmp_path / "run") if "train/loss" in r] == [0, 0, 0]


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, format="PNG")
    return buf.getvalue()


def test_every_skipped_example_is_listed_by_file_and_line_in_the_workdir(tmp_path, capsys):
    """A forkme run over a JSONL folder with a missing image, an undecodable one and a line of broken JSON."""
    data = tmp_path / "mytask"
    (data / "images").mkdir(parents=True)
    lines = []
    for i, color in enumerate(["red", "green", "blue", "white", "black", "yellow"]):
        (data / "images" / f"{i}.png").write_bytes(_png(color))
        lines.append(json.dumps({"image": f"images/{i}.png", "suffix": f"a {color} square"}))
    (data / "images" / "broken.jpg").write_bytes(b"this is not an image")
    lines.insert(2, json.dumps({"image": "images/missing.png", "suffix": "nothing"}))  # Line 3.
    lines.insert(4, '{"image": "images/0.png", "suffix": ')  # Line 5.
    lines.insert(6, json.dumps({"image": "images/broken.jpg", "suffix": "garbage"}))  # Line 7.
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    (data / "val.jsonl").write_text("\n".join(lines[:2]) + "\n")
    config = load_config(
        "forkme",
        [
            f"--config.data_dir={data}",
            "--config.model_init=",
            "--config.model_name_or_preset=tiny_pg1",
            "--config.tokenizer=builtin:tiny",
            "--config.input.res=32",
            "--config.input.text_len=16",
            "--config.input.batch_size=4",
            "--config.total_steps=4",  # 16 examples: every line is read (8 lines with an image).
            "--config.ckpt_steps=2",
            "--config.evals={}",
            "--config.num_devices=2",
            "--config.quiet=True",
        ],
    )
    workdir = tmp_path / "run"
    train.run(config, workdir)
    listed = [json.loads(line) for line in (workdir / "bad_input.jsonl").read_text().splitlines()]
    found = sorted((row["file"], row["line"], row["reason"]) for row in listed)
    jsonl = str(data / "train.jsonl")
    assert [(f, line) for f, line, _ in found] == [(jsonl, 3), (jsonl, 5), (jsonl, 7)]
    reasons = dict(((line, reason) for _, line, reason in found))
    assert reasons[3] == "missing_image" and reasons[5] == "malformed_json" and "image" in reasons[7]
    assert all(row["detail"] for row in listed)
    assert "Bad input: 3 training examples skipped" in capsys.readouterr().out  # Told even to a quiet run.
    assert "[bad_input.jsonl](bad_input.jsonl)" in (workdir / "report.md").read_text()

    # The same command again resumes at the end: the list keeps every example skipped before.
    train.run(config, workdir)
    again = [json.loads(line) for line in (workdir / "bad_input.jsonl").read_text().splitlines()]
    assert sorted((r["file"], r["line"], r["reason"]) for r in again) == found


@pytest.mark.slow  # fast: test_train's resume
def test_a_sampling_evaluator_samples_the_same_after_a_resume(tiny_config, tmp_path, monkeypatch):
    """Evaluation keys come from (seed, step, evaluator): a run interrupted after its step-2 checkpoint and started
    again writes the prediction files of the uninterrupted run, byte for byte."""
    evals = tiny_config()["evals"].to_dict()
    evals["val"].update(sampler="temperature(1.0)", log_steps=2)
    evals["val2"] = dict(evals["val"], sampler="top_k(5)")
    config = lambda: tiny_config(total_steps=4, ckpt_steps=2, evals=evals)  # noqa: E731
    full = tmp_path / "full"
    train.run(config(), full)

    real_save = train.train_state.save

    def save_then_die(manager, step, state, data_state):
        real_save(manager, step, state, data_state)
        if step == 2:
            manager.wait_until_finished()
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(train.train_state, "save", save_then_die)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        train.run(config(), part)
    monkeypatch.setattr(train.train_state, "save", real_save)
    train.run(config(), part)
    names = sorted(p.name for p in (full / "eval").glob("predictions_*.jsonl"))
    assert names == sorted(f"predictions_{e}_step{s}.jsonl" for e in ("val", "val2") for s in (0, 2, 4))
    for name in names:
        assert (part / "eval" / name).read_bytes() == (full / "eval" / name).read_bytes(), name
    # Sampling does draw: the two evaluators, and the same evaluator at two steps, decode differently.
    preds = {n: [json.loads(r)["prediction"] for r in (full / "eval" / n).read_text().splitlines()] for n in names}
    assert preds["predictions_val_step0.jsonl"] != preds["predictions_val2_step0.jsonl"]
    assert len(set(preds["predictions_val_step0.jsonl"])) > 1
