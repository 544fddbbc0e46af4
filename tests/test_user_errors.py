"""Every failure the user caused is one `error: ...` line on stderr and exit code 2, in every command, before any
compute: damaged checkpoints, bad samplers and decode settings, unusable output folders, a damaged
`metrics.jsonl`, missing Kaggle credentials. `PALIGEMMA_FT_DEBUG=1` raises instead; bugs keep their traceback.
(The app page shows the same failures as messages: tests/test_app.py.)"""

import pathlib
import textwrap

import numpy as np
import pytest

from paligemma_ft import predictor as predictor_lib
from paligemma_ft.checkpoints import npz as ckpt_lib
from paligemma_ft.commands import cli, predict
from paligemma_ft.data.shapes import encode_image, make_example
from paligemma_ft.training import loop as train
from paligemma_ft.training import step as step_lib
from paligemma_ft.training.report import MetricsFileError, MetricsLog

# A fresh kagglehub cache, without credentials or network, for every test (conftest's `isolated`).
pytestmark = pytest.mark.usefixtures("isolated")

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.py")
SMALL = [
    "--config.input.data={'source': 'shapes', 'n': 8, 'seed': 0, 'task': 'caption', 'image_size': 64}",
    "--config.evals={}",
    "--config.total_steps=2",
]
READ_ONLY = "/sys/kernel"  # sysfs: no new file can be made there, not even by root (chmod does not stop root).
KAGGLE_INIT = "--config.model_init=kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224/1"


def one_error(capsys, *words: str) -> str:
    """The stderr of a command that failed as a user error: one `error:` line first, no traceback."""
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert lines and lines[0].startswith("error: "), err
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in err, err
    assert all(line.startswith("  ") for line in lines[1:]), err  # Details, if any, are indented under it.
    for word in words:
        assert word in err, (word, err)
    return err


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "scene.png"
    path.write_bytes(encode_image(make_example(0, 0, "caption", 64)["image"]))
    return str(path)


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    """Damaged `.npz` files: garbage in a zip header, the demo cut in half, a pickled array."""
    folder = tmp_path_factory.mktemp("ckpts")
    demo = pathlib.Path(predictor_lib.resolve_checkpoint("builtin:demo")).read_bytes()
    (folder / "garbage.npz").write_bytes(b"PK\x03\x04" + b"garbage" * 50)
    (folder / "truncated.npz").write_bytes(demo[: len(demo) // 2])
    np.savez(folder / "pickled.npz", **{"img/x": np.array([{"a": 1}], dtype=object)})
    return {name: str(folder / f"{name}.npz") for name in ("garbage", "truncated", "pickled")}


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a command gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(predictor_lib, "load_predictor", refuse)


# ----------------------------------------------------------------------------------------------------- predict


@pytest.mark.parametrize(
    "name, words",
    [("garbage", "not a readable .npz"), ("truncated", "not a readable .npz"), ("pickled", "pickled Python objects")],
)
def test_predict_with_a_damaged_checkpoint(bad_checkpoints, image, capsys, name, words):
    argv = ["predict", "--image", image, "--prompt", "caption en", "--tokenizer", "builtin:tiny"]
    assert cli.main([*argv, "--checkpoint", bad_checkpoints[name]]) == 2
    one_error(capsys, bad_checkpoints[name], words)


def test_predict_with_a_checkpoint_for_another_model(image, capsys):
    argv = ["predict", "--image", image, "--prompt", "caption en", "--preset", "tiny_pg1"]
    assert cli.main(argv) == 2  # The demo checkpoint (3 layers x 128) for the tiny preset (2 x 64).
    err = one_error(capsys, "does not fit the model", "wrong shape")
    assert len(err.splitlines()) > 1  # The mismatched parameters are listed under the error line.


@pytest.mark.parametrize(
    "sampler, words",
    [
        ("temperature(0)", "t must be > 0"),
        ("nucleus(2)", "p must be in (0, 1]"),
        ("beam(0)", "n must be a whole number >= 1"),
        ("beam(-1)", "n must be a whole number >= 1"),
        ("beam(inf)", "n must be a finite number"),
        ("top_k(inf)", "k must be a finite number"),
        ("top_k(2.5)", "k must be a whole number"),
        ("top_k(q=3)", "unknown keyword 'q' for top_k; it takes k, t"),
        ("greedy(k=3)", "unknown keyword 'k' for greedy"),
        ("warp(2)", "unknown sampler 'warp'"),
    ],
)
def test_predict_bad_sampler_before_the_model_loads(image, capsys, no_model, sampler, words):
    assert cli.main(["predict", "--image", image, "--prompt", "caption en", "--sampler", sampler]) == 2
    one_error(capsys, "--sampler", repr(sampler), words)


def test_predict_max_decode_len_zero(image, capsys, no_model):
    assert cli.main(["predict", "--image", image, "--prompt", "caption en", "--max-decode-len", "0"]) == 2
    one_error(capsys, "--max-decode-len")


# ---------------------------------------------------------------------------------------------------- evaluate

EVAL_CONFIG = """
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model_name_or_preset = ""
    c.model = dict()
    c.model_init = ""
    c.tokenizer = "builtin:tiny"
    data = dict(source="shapes", n=4, seed=0, task="caption", image_size=64)
    c.input = dict(data=data, prefix="caption en", res=64, text_len=16, batch_size=4, num_workers=0)
    c.evals = dict(val=dict(type="caption", data=data, batch_size=4, max_decode_len=4, sampler="greedy", bootstrap=0))
    return c
"""


@pytest.fixture
def eval_config(tmp_path):
    path = tmp_path / "eval_cfg.py"
    path.write_text(textwrap.dedent(EVAL_CONFIG))
    return str(path)


@pytest.mark.parametrize(
    "override, words",
    [
        ("--config.evals.val.batch_size=0", "config.evals.val.batch_size=0: must be an integer >= 1"),
        ("--config.evals.val.max_decode_len=0", "config.evals.val.max_decode_len=0: must be an integer >= 1"),
        ("--config.evals.val.sampler='beam(0)'", "config.evals.val.sampler: sampler 'beam(0)': n must be"),
        ("--config.evals.val.sampler='beam(inf)'", "n must be a finite number"),
        ("--config.evals.val.sampler='nucleus(p=0.5, q=1)'", "unknown keyword 'q'"),
    ],
)
def test_evaluate_bad_settings_before_the_model_loads(eval_config, tmp_path, capsys, no_model, override, words):
    argv = ["evaluate", "--config", eval_config, "--checkpoint", "builtin:demo", "--outdir", str(tmp_path / "o")]
    assert cli.main([*argv, override]) == 2
    one_error(capsys, words)
    assert not (tmp_path / "o").exists()


def test_evaluate_with_a_damaged_checkpoint(eval_config, bad_checkpoints, tmp_path, capsys):
    for path in bad_checkpoints.values():
        argv = ["evaluate", "--config", eval_config, "--checkpoint", path, "--outdir", str(tmp_path)]
        assert cli.main(argv) == 2
        one_error(capsys, path)


def test_evaluate_with_a_damaged_metrics_row(eval_config, tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "params.npz").write_bytes(pathlib.Path(predictor_lib.resolve_checkpoint("builtin:demo")).read_bytes())
    (workdir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n[1, 2]\n{"step": 3, "train/loss": 1.0}\n')
    assert cli.main(["evaluate", "--config", eval_config, "--workdir", str(workdir)]) == 2
    one_error(capsys, f"{workdir / 'metrics.jsonl'}:2 is damaged", "Repair or delete that line")
    assert not (workdir / "eval_metrics.json").exists()


def test_evaluate_into_a_file_or_a_read_only_folder(eval_config, tmp_path, capsys, no_model):
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["evaluate", "--config", eval_config, "--checkpoint", "builtin:demo"]
    assert cli.main([*base, "--outdir", str(afile)]) == 2
    one_error(capsys, f"--outdir {afile} is a file, not a folder")
    assert cli.main([*base, "--outdir", str(afile / "sub")]) == 2
    one_error(capsys, f"--outdir {afile / 'sub'} cannot be written")
    assert cli.main([*base, "--outdir", READ_ONLY]) == 2
    one_error(capsys, f"--outdir {READ_ONLY} cannot be written")
    assert cli.main(["evaluate", "--config", eval_config, "--workdir", str(tmp_path / "nowhere")]) == 2
    one_error(capsys, f"--workdir {tmp_path / 'nowhere'} does not exist")


# ------------------------------------------------------------------------------------------------- train, plan


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started before the error was found")

    monkeypatch.setattr(step_lib, "train_step", refuse)
    monkeypatch.setattr(train, "run_evals", refuse)


def test_train_into_a_file_or_a_read_only_folder(tmp_path, capsys, no_training):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for workdir, words in ((afile, "is a file, not a folder"), (READ_ONLY, "cannot be written")):
        assert cli.main(["train", "--config", DEMO, "--workdir", str(workdir), *SMALL]) == 2
        one_error(capsys, f"--workdir {workdir} {words}")
    assert afile.read_text() == "x"


def test_train_with_a_damaged_model_init(bad_checkpoints, tmp_path, capsys, no_training):
    for name, path in bad_checkpoints.items():
        workdir = tmp_path / name
        argv = ["train", "--config", DEMO, "--workdir", str(workdir), *SMALL, f"--config.model_init={path}"]
        assert cli.main(argv) == 2
        one_error(capsys, path)
        assert not (workdir / "metrics.jsonl").exists() and not (workdir / "params.npz").exists()


def test_train_and_plan_without_kaggle_credentials(isolated, tmp_path, capsys, no_training):
    assert cli.main(["train", "--config", DEMO, "--workdir", str(tmp_path / "w"), *SMALL, KAGGLE_INIT]) == 2
    err = one_error(capsys, "No Kaggle credentials found", "KAGGLE_API_TOKEN")
    assert err.splitlines()[0].startswith("error: No Kaggle credentials found")
    assert cli.main(["plan", "--config", DEMO, *SMALL, KAGGLE_INIT, "--arithmetic-only"]) == 2
    one_error(capsys, "No Kaggle credentials found")


# ---------------------------------------------------------------------------------------- debug, bugs, secrets


def test_debug_variable_raises_with_the_traceback(bad_checkpoints, image, monkeypatch):
    monkeypatch.setenv("PALIGEMMA_FT_DEBUG", "1")
    argv = ["predict", "--image", image, "--prompt", "caption en", "--tokenizer", "builtin:tiny"]
    with pytest.raises(ckpt_lib.CheckpointError, match="not a readable .npz"):
        cli.main([*argv, "--checkpoint", bad_checkpoints["garbage"]])


def test_a_bug_is_not_reported_as_a_user_error(image, monkeypatch):
    def broken(args):
        raise KeyError("internal")

    monkeypatch.setattr(predict, "main", broken)
    with pytest.raises(KeyError, match="internal"):
        cli.main(["predict", "--image", image, "--prompt", "caption en"])


def test_error_lines_mask_secrets_and_show_control_characters(image, capsys):
    secret = "hf_" + "aB3dE5gH7jK9mN1pQ3sT5vW7"
    url = "https://someone:pa55w0rd-x@example.com/model.npz"
    assert cli.main(["predict", "--image", image, "--prompt", "x", "--checkpoint", url]) == 2
    err = one_error(capsys, "https://***@example.com/model.npz")
    assert "pa55w0rd" not in err and "someone" not in err
    assert cli.main(["predict", "--image", image, "--prompt", "x", f"--checkpoint={secret}.npz"]) == 2
    assert secret not in one_error(capsys)
    assert cli.main(["predict", "--image", "a\x1b[2Jb.png", "--prompt", "x"]) == 2
    err = one_error(capsys, "a\\x1b[2Jb.png")
    assert "\x1b" not in err


# ------------------------------------------------------------------------------------------------ metrics.jsonl


def test_metrics_log_refuses_damaged_rows_but_not_a_cut_last_line(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write(1, {"train/loss": 2.0})
    log.write(2, {"train/loss": 1.5})
    with open(log.path, "a") as f:
        f.write('{"step": 3, "train/lo')  # A write cut short by a crash: no newline.
    assert [r["step"] for r in log.rows()] == [1, 2]
    for damaged in ('{"step": "3"}\n', "not json\n", '{"loss": 1}\n', "\x00\x00\x00\n"):
        log.path.write_text('{"step": 1, "train/loss": 2.0}\n' + damaged + '{"step": 2}\n')
        with pytest.raises(MetricsFileError, match=r"metrics.jsonl:2 is damaged"):
            log.rows()
