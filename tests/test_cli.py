"""Config loading with overrides, and the `paligemma-ft` command line (download, inspect, errors)."""

import json
import textwrap

import ml_collections
import pytest
from kaggle_fixtures import PG2, PG2_FILE, put_file

from paligemma_ft.commands import cli
from paligemma_ft.config import load_config, parse_value, save_config
from paligemma_ft.training import loop

# A fresh kagglehub cache, without credentials or network, for every test (conftest's `isolated`).
pytestmark = pytest.mark.usefixtures("isolated")

CONFIG = """
import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    # This file's own keys (the declared ones are in paligemma_ft/config_base.py).
    c.local_keys = ("arg", "optim", "use_ema", "kaggle_key", "hf_token", "pad_token_id")
    c.total_steps = 10                 # steps
    c.seed = 0
    c.model_init = "weights.npz"
    c.arg = arg
    c.optim = ml_collections.ConfigDict({"lr": 1e-3, "betas": (0.9, 0.99), "clip": None})
    c.model = ml_collections.ConfigDict({"img": {"variant": "mu/16", "dropout": 0.0}, "llm": {"vocab": 256}})
    c.use_ema = False
    c.kaggle_key = "s3cr3t"
    c.hf_token = "hf_s3cr3t"
    c.tokenizer = "builtin:tiny"
    c.pad_token_id = 0
    return c
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text(CONFIG)
    return str(path)


def test_overrides_parse_literals_and_nested_keys(config_file):
    c = load_config(
        config_file,
        [
            "--config.total_steps=25",
            "--config.optim.lr=2e-4",
            "config.optim.betas=[0.8, 0.9]",
            "optim.clip=1.0",
            "--config.model.img.variant=So400m/14",
            "--config.model_init='other.npz'",
            "--config.use_ema=true",
        ],
    )
    assert c.total_steps == 25 and isinstance(c.total_steps, int)
    assert c.optim.lr == pytest.approx(2e-4) and c.optim.clip == 1.0
    assert tuple(c.optim.betas) == (0.8, 0.9)
    assert c.model.img.variant == "So400m/14"  # Not a literal: kept as the raw string.
    assert c.model_init == "other.npz" and c.use_ema is True
    assert c.model.llm.vocab == 256  # Untouched siblings stay.


def test_ints_widen_to_float_and_strings_stay_strings(config_file):
    c = load_config(config_file, ["--config.optim.lr=1", "--config.model_init=123"])
    assert c.optim.lr == 1.0 and isinstance(c.optim.lr, float)
    assert c.model_init == "123"  # A file named "123", not the number.
    with pytest.raises(ValueError, match=r"config\.total_steps is a int, got 0\.5"):
        load_config(config_file, ["--config.total_steps=0.5"])


def test_typo_names_the_key_and_suggests(config_file):
    with pytest.raises(ValueError) as info:
        load_config(config_file, ["--config.optim.lrr=1e-4"])
    message = str(info.value)
    assert "config.optim.lrr" in message and "did you mean 'lr'" in message
    with pytest.raises(ValueError, match=r"unknown key config\.totl_steps .*did you mean 'total_steps'"):
        load_config(config_file, ["--config.totl_steps=3"])
    with pytest.raises(ValueError, match="expected --config.KEY=VALUE"):
        load_config(config_file, ["--config.seed"])
    with pytest.raises(ValueError, match="config.seed is a int, not a group"):
        load_config(config_file, ["--config.seed.x=1"])


def test_config_is_locked_and_arg_reaches_get_config(config_file):
    c = load_config(config_file + ":res=448", [])
    assert c.arg == "res=448"
    assert load_config(config_file, []).arg is None
    with pytest.raises(AttributeError):
        c.new_field = 1  # Locked: nothing can add a field that no code reads.


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.py"):
        load_config(str(tmp_path / "missing.py"), [])
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="empty.py: defines no get_config"):
        load_config(str(tmp_path / "empty.py"), [])
    with pytest.raises(ValueError, match="expected a Python file"):
        load_config(str(tmp_path / "exp.yaml"), [])


def test_values_are_never_evaluated(config_file, tmp_path):
    marker = tmp_path / "ran"
    payload = f"__import__('os').system('touch {marker}')"
    assert parse_value(payload) == payload
    c = load_config(config_file, [f"--config.model_init={payload}"])
    assert c.model_init == payload and not marker.exists()
    assert parse_value("[1, 2]") == [1, 2] and parse_value("None") is None and parse_value("a b") == "a b"


def test_save_config_drops_credentials(config_file, tmp_path):
    c = load_config(config_file, ["--config.seed=7"])
    out = tmp_path / "run" / "config.json"
    save_config(c, out)
    text = out.read_text()
    assert "s3cr3t" not in text
    saved = json.loads(text)
    assert "kaggle_key" not in saved and "hf_token" not in saved
    # Names that merely contain a credential word, or non-string values, are not credentials.
    assert saved["tokenizer"] == "builtin:tiny" and saved["pad_token_id"] == 0
    assert saved["seed"] == 7 and saved["optim"]["betas"] == [0.9, 0.99]


def test_download_prints_cached_path(isolated, capsys):
    path = put_file(isolated, PG2 + "/1", PG2_FILE)
    assert cli.main(["download", PG2 + "/1", "--file", PG2_FILE]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(path) and err == ""
    # The handle alone (the example): the table's default file, still served offline from the cache.
    assert cli.main(["download", PG2 + "/1"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(path) and err == ""


def test_download_of_an_uncached_model_without_credentials_fails_cleanly(capsys):
    assert cli.main(["download", PG2 + "/1", "--file", PG2_FILE]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and "Traceback" not in err


def test_inspect_prints_a_table(tmp_path, capsys):
    path = tmp_path / "shapes_cfg.py"
    path.write_text(
        textwrap.dedent("""
        import ml_collections

        def get_config(arg=None):
            return ml_collections.ConfigDict({
                "tokenizer": "builtin:tiny",
                "model": {"img": {"variant": "mu/16"}},
                "input": {"data": {"source": "shapes", "n": 6, "image_size": 32, "task": "count"},
                          "res": 32, "text_len": 16, "batch_size": 4},
            })
    """)
    )
    assert cli.main(["inspect", "--config", str(path), "--config.input.batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "batch 0: " in out and "image f32[2, 32, 32, 3]" in out.replace("float32", "f32")
    assert "image x 4" in out and "mask_loss" in out  # (32 / 16)^2 image tokens, then the token table.


def test_usage_errors_are_one_line(config_file, capsys):
    cases = [
        ["frobnicate"],
        [],
        ["inspect", "--config", config_file, "--bogus=1"],
        ["inspect", "--config", config_file, "--config.optim.lrr=1"],
        ["download", PG2, "--config.seed=1"],
        ["train", "--config", config_file],
        ["inspect", "--config", config_file, "--config.seed"],
    ]
    for argv in cases:
        assert cli.main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    cli.main(["inspect", "--config", config_file, "--config.optim.lrr=1"])
    assert "did you mean 'lr'" in capsys.readouterr().err


def test_overrides_with_a_space_and_the_command_list(capsys):
    assert cli.split_overrides(["--config.seed", "3", "--config.a.b=x=y"]) == ["--config.seed=3", "--config.a.b=x=y"]
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("download", "inspect", "train", "predict", "evaluate", "app", "plan", "convert"):
        assert command in out, command
    assert cli.main([]) == 2
    assert "choose a command: download, inspect, train" in capsys.readouterr().err


def test_train_calls_run_with_the_overridden_config(config_file, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(loop, "run", lambda config, workdir: calls.append((config, workdir)))
    assert cli.main(["train", "--config", config_file, "--workdir", str(tmp_path), "--config.total_steps=3"]) == 0
    ((config, workdir),) = calls
    assert isinstance(config, ml_collections.ConfigDict) and config.total_steps == 3 and workdir == str(tmp_path)
