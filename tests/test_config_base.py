"""The declared config (`paligemma_ft.config_base`): every key the library reads is declared, works as an override,
typos fail naming close keys (in overrides and in files), values are validated before compute, `plan` needs no
data, and the shipped configs resolve by name, also from an installed wheel."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import tomllib

import jax
import numpy as np
import pytest

from paligemma_ft import config_base, predictor, sharding
from paligemma_ft.checkpoints import npz as ckpt_lib
from paligemma_ft.commands import cli, plan
from paligemma_ft.config import load_config
from paligemma_ft.evaluate.runner import evaluate_command
from paligemma_ft.training import loop as train
from paligemma_ft.training import step as step_lib
from paligemma_ft.utils import tree_flatten_with_names

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.py")
LONGCAP = str(ROOT / "configs" / "longcap100.py")
QUICK = [  # The demo, small: 32 training scenes, no evaluators, 2 steps on 2 devices.
    "--config.input.data.n=32",
    "--config.input.batch_size=4",
    "--config.evals={}",
    "--config.total_steps=2",
    "--config.num_devices=2",
]


class ComputeStarted(AssertionError):
    pass


@pytest.fixture
def no_compute(monkeypatch):
    """Training, evaluation and reading training data raise if a run gets that far."""

    def refuse(*args, **kwargs):
        raise ComputeStarted("the run reached data, training or evaluation")

    monkeypatch.setattr(step_lib, "train_step", refuse)
    monkeypatch.setattr(train, "run_evals", refuse)
    monkeypatch.setattr(train.data_lib, "make_train_iter", refuse)


# --- Keys the library reads: declared, and working as overrides -------------------------------------------------


@pytest.mark.slow  # fast: test_every_declared_key_can_be_overridden
def test_undeclared_before_keys_work_on_the_demo(tmp_path, monkeypatch, capsys):
    """loss_reduction, lr_mults and quiet (once refused as "unknown key") reach the loss, optimizer and console."""
    seen = []
    real_loss = step_lib.loss_fn

    def spy(*args, reduction, **kwargs):  # Traced inside the jitted step: records what the trainer passes.
        seen.append(reduction)
        return real_loss(*args, reduction=reduction, **kwargs)

    monkeypatch.setattr(step_lib, "loss_fn", spy)
    config = load_config(
        DEMO,
        QUICK
        + [
            "--config.loss_reduction=token_mean",
            "--config.lr_mults=[('img/.*', 1e-30)]",  # The image tower barely moves; the LLM trains at full lr.
            "--config.quiet=True",
            "--config.wandb.project=x",  # An open group: accepted (wandb itself is only imported when run with it).
        ],
    )
    assert config.loss_reduction == "token_mean" and config.quiet is True and config.wandb.project == "x"
    with config.unlocked():
        config.wandb = {}  # No Weights & Biases in the test.
    train.run(config, tmp_path / "run")
    assert seen and set(seen) == {"token_mean"}
    assert capsys.readouterr().out == ""  # quiet: no overview, no progress bar, no summary.
    before = dict(tree_flatten_with_names(ckpt_lib.load_params(predictor.resolve_checkpoint("builtin:demo"))))
    after = dict(tree_flatten_with_names(ckpt_lib.load_params(tmp_path / "run" / "params.npz")))
    img_change = max(float(np.abs(after[k] - before[k]).max()) for k in after if k.startswith("img/"))
    llm_change = max(float(np.abs(after[k] - before[k]).max()) for k in after if k.startswith("llm/"))
    assert img_change < 1e-20 < 1e-5 < llm_change


def test_every_declared_key_can_be_overridden():
    config = load_config(DEMO)
    base = config_base.base_config()

    def leaves(node, prefix=""):
        for key, value in node.items():
            if not hasattr(value, "items"):
                yield prefix + key, value
            elif not config_base.is_open(prefix + key):
                yield from leaves(value, prefix + key + ".")

    for path, value in leaves(base):
        load_config(DEMO, [f"--config.{path}={value!r}"])  # Every declared key exists on a loaded config.
    assert config.lora.rank == 0 and config.distributed.enabled is None and config.input.max_image_bytes == 64 * 2**20


def test_library_reads_only_declared_keys():
    """Every `config.X`, `config.get("X")` and `config["X"]` in paligemma_ft/ names a declared key (guards drift)."""
    base = config_base.base_config()
    methods = {"get", "to_dict", "unlocked", "lock", "unlock", "items", "keys", "values", "get_ref", "update"}

    def chain(node: ast.AST) -> list[str] | None:
        """`config.a.b` / `config["a"].get("b")` -> ["a", "b"]; None unless rooted at a name `config`."""
        if isinstance(node, ast.Name):
            return [] if node.id == "config" else None
        if isinstance(node, ast.Attribute):
            head = chain(node.value)
            return None if head is None else [*head, node.attr]
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            head = chain(node.value)
            return None if head is None else [*head, str(node.slice.value)]
        return None

    reads = []
    for file in (ROOT / "paligemma_ft").rglob("*.py"):
        if file.parent.name == "checkpoints" and file.name.startswith("hf"):
            continue  # These read Hugging Face `config.json` dicts, which they also call `config`.
        for node in ast.walk(ast.parse(file.read_text())):
            path = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
                head = chain(node.func.value)
                if head is not None and node.args and isinstance(node.args[0], ast.Constant):
                    path = [*head, str(node.args[0].value)]
            elif isinstance(node, (ast.Attribute, ast.Subscript)):
                path = chain(node)
            if path:
                reads.append((f"{file.relative_to(ROOT)}:{node.lineno}", [p for p in path if p not in methods]))
    assert len(reads) > 40  # The scan sees the library's reads (about 60 when written).
    for where, path in reads:
        node, walked = base, []
        for part in path:
            walked.append(part)
            if config_base.is_open(".".join(walked[:-1])) and len(walked) > 1:
                break  # Inside an open group: its owner checks the keys.
            assert hasattr(node, "keys") and part in node, f"{where}: config.{'.'.join(walked)} is not declared"
            node = node[part]


# --- Typos: in overrides and in files ---------------------------------------------------------------------------


def test_override_typos_name_close_keys():
    with pytest.raises(ValueError, match=r"unknown key config\.loss_reductoin .*did you mean 'loss_reduction'"):
        load_config(DEMO, ["--config.loss_reductoin=token_mean"])
    with pytest.raises(ValueError, match=r"unknown key config\.lora\.rnak .*did you mean 'rank'"):
        load_config(DEMO, ["--config.lora.rnak=4"])
    # Open groups accept new keys (a tower's big_vision keys; checked by the model when it is built).
    config = load_config(DEMO, ["--config.model.llm.remat_policy=full", "--config.evals.val.skip_first=True"])
    assert config.model.llm.remat_policy == "full" and config.evals.val.skip_first is True


def _write(tmp_path, body: str) -> str:
    path = tmp_path / "mine.py"
    path.write_text("import ml_collections\n" + textwrap.dedent(body))
    return str(path)


def test_config_file_typos_name_the_file_the_key_and_close_keys(tmp_path):
    path = _write(tmp_path, "def get_config(arg=None):\n    return ml_collections.ConfigDict(dict(total_step=5))\n")
    with pytest.raises(ValueError, match=r"mine\.py: config\.total_step is not a declared key\. .*'total_steps'"):
        load_config(path)
    nested = "def get_config(arg=None):\n    return ml_collections.ConfigDict(dict(input=dict(batchsize=8)))\n"
    with pytest.raises(ValueError, match=r"mine\.py: config\.input\.batchsize is not .*did you mean 'batch_size'"):
        load_config(_write(tmp_path, nested))
    group = "def get_config(arg=None):\n    return ml_collections.ConfigDict(dict(lora=4))\n"
    with pytest.raises(ValueError, match=r"config\.lora must be a group of keys"):
        load_config(_write(tmp_path, group))
    # A file's own keys are listed in local_keys; open groups take any keys; the rest comes from the base.
    ok = """
    def get_config(arg=None):
        c = ml_collections.ConfigDict()
        c.local_keys = ("train_file",)
        c.train_file = "t.jsonl"
        c.model = dict(llm=dict(dropout=0.1))
        c.evals = dict(mine=dict(type="caption", anything=1))
        return c
    """
    config = load_config(_write(tmp_path, ok), ["--config.train_file=u.jsonl"])
    assert config.train_file == "u.jsonl" and config.model.llm.dropout == 0.1 and config.model.img.to_dict() == {}
    assert config.lr == 1.0 and config.keep_ckpts == 2 and config.input.res == 224  # Declared defaults.
    # The library completes the config again at each entry point: the file's own keys stay accepted.
    assert config_base.complete(config.to_dict()).train_file == "u.jsonl"
    with pytest.raises(ValueError, match=r"the config: config\.val_file is not a declared key"):
        config_base.complete({**config.to_dict(), "val_file": "v.jsonl"})


def test_shipped_configs_resolve_by_name():
    assert load_config("demo").to_dict() == load_config(DEMO).to_dict()
    assert load_config("vqa:tfds").input.data.source == "tfds"
    with pytest.raises(
        FileNotFoundError, match=r"no shipped config of that name \(shipped: coco_captions, coco_detection, demo"
    ):
        load_config("dmeo")
    with pytest.raises(FileNotFoundError, match="the shipped config of that name is --config demo"):
        load_config("elsewhere/demo.py")


def test_every_package_folder_is_in_the_wheel():
    """pyproject lists the packages (configs/ is mapped to paligemma_ft.configs): none may be forgotten."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "paligemma_ft").rglob("__init__.py")} | {
        "paligemma_ft.configs"
    }
    assert set(tool["packages"]) == found
    assert tool["package-dir"] == {"paligemma_ft.configs": "configs"}


def test_distributed_group_reaches_initialize(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **k: calls.append(k))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    config = load_config(
        DEMO, ["--config.distributed.enabled=True", "--config.distributed.coordinator_address='h:1234'"]
    )
    assert sharding.maybe_initialize_distributed(config) is True
    assert calls == [{"coordinator_address": "h:1234"}]
    assert sharding.maybe_initialize_distributed(load_config(DEMO, ["--config.distributed.enabled=False"])) is False


# --- Validation before compute ----------------------------------------------------------------------------------

BAD_VALUES = [
    ("--config.total_steps=-1", r"config\.total_steps=-1: must be an integer >= 0"),
    ("--config.grad_accum_steps=0", r"config\.grad_accum_steps=0: must be an integer >= 1"),
    ("--config.label_smoothing=1.0", r"config\.label_smoothing=1\.0: must be in \[0, 1\)"),
    ("--config.label_smoothing=-0.1", r"config\.label_smoothing=-0\.1: must be in \[0, 1\)"),
    ("--config.wd=-1.0", r"config\.wd=-1\.0: must be >= 0"),
    ("--config.keep_ckpts=0", r"config\.keep_ckpts=0: must be an integer >= 1"),
    ("--config.loss_reduction=sum", r"config\.loss_reduction='sum': must be one of example_mean, token_mean"),
    ("--config.lora.quant=int4", r"config\.lora\.quant='int4': must be one of none, int8, nf4"),
    ("--config.evals.val.batch_size=0", r"config\.evals\.val\.batch_size=0: must be an integer >= 1"),
    ("--config.evals.val.max_decode_len=0", r"config\.evals\.val\.max_decode_len=0: must be an integer >= 1"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES)
def test_bad_values_stop_train_plan_and_evaluate_before_compute(override, message, tmp_path, no_compute):
    config = load_config(DEMO, [override])
    with pytest.raises(ValueError, match=message):
        config_base.validate(config)
    with pytest.raises(ValueError, match=message):
        train.run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # Nothing written, not even config.json.
    with pytest.raises(ValueError, match=message):
        plan.make_plan(config, arithmetic_only=True)
    with pytest.raises(ValueError, match=message):
        evaluate_command(config, outdir=tmp_path / "eval")


def test_total_steps_is_required_for_training_only(tmp_path, no_compute):
    config = config_base.complete({"model_init": "builtin:demo", "input": {"res": 64}})
    assert config.total_steps is None
    config_base.validate(config, training=False)  # evaluate needs no number of steps.
    with pytest.raises(ValueError, match=r"config\.total_steps is not set: pass --config\.total_steps=N"):
        train.run(config, tmp_path / "run")
    with pytest.raises(ValueError, match=r"config\.total_steps is not set"):
        plan.make_plan(config, arithmetic_only=True)


def test_bad_value_from_the_command_line_is_one_line(tmp_path, capsys):
    assert cli.main(["train", "--config", "demo", "--workdir", str(tmp_path / "w"), "--config.grad_accum_steps=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config.grad_accum_steps=0: must be an integer >= 1") and err.count("\n") == 1


def test_resolution_must_be_a_multiple_of_the_patch_size(tmp_path, no_compute):
    # The demo model's patches are 8 x 8 (read from its checkpoint shapes); the preset's SigLIP ones 14 x 14.
    with pytest.raises(ValueError, match=r"config\.input\.res=60: .*patch size 8x8 \(e\.g\. 56 or 64\)"):
        train.run(load_config(DEMO, ["--config.input.res=60"]), tmp_path / "run")
    config = load_config(LONGCAP, ["--config.input.res=225"])
    with pytest.raises(ValueError, match=r"config\.input\.res=225: .*patch size 14x14 \(e\.g\. 224 or 238\)"):
        plan.make_plan(config, arithmetic_only=True)


def test_missing_data_dir_is_named_when_data_is_read(tmp_path, no_compute):
    config = load_config(LONGCAP, ["--config.model_init=builtin:demo", '--config.model_name_or_preset=""'])
    with pytest.raises(ValueError, match=r"config\.data_dir is not set: pass --config\.data_dir=DIR"):
        train.run(config, tmp_path / "run")
    with pytest.raises(ValueError, match=r"config\.data_dir is not set: .*config\.evals\.val\.data\.path"):
        evaluate_command(config, outdir=tmp_path / "eval")


def test_a_data_dir_that_names_no_file_is_named_before_the_model_loads(tmp_path, no_compute, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the run loaded a model before checking its data paths")

    monkeypatch.setattr(train, "setup", refuse)
    missing = tmp_path / "nowhere"
    config = load_config(LONGCAP, [f"--config.data_dir={missing}"])  # A Kaggle checkpoint: never fetched.
    with pytest.raises(FileNotFoundError, match=rf"config\.input\.data\.path: {missing}/\S+ does not exist \(built"):
        train.run(config, tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"config\.evals\.val\.data\.path: .* does not exist"):
        evaluate_command(config, outdir=tmp_path / "eval")


# --- plan: shapes and batch sizes only ------------------------------------------------------------------------


@pytest.fixture
def nothing_to_fetch(monkeypatch):
    """Downloads, checkpoint reads and tokenizer loads fail: a plan must need none of them."""
    from paligemma_ft import tokenizer as tokenizer_lib
    from paligemma_ft.checkpoints import kaggle, loading

    def refuse(*args, **kwargs):
        raise AssertionError("plan fetched or read something")

    monkeypatch.setattr(kaggle, "resolve_model_init", refuse)
    monkeypatch.setattr(loading, "resolve_checkpoint", refuse)
    monkeypatch.setattr(loading, "load_tokenizer", refuse)
    monkeypatch.setattr(loading, "load_params", refuse)
    monkeypatch.setattr(tokenizer_lib.Tokenizer, "from_spec", refuse)
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("mode", [["--arithmetic-only"], []])
def test_plan_of_longcap100_needs_no_data_checkpoint_or_tokenizer(mode, nothing_to_fetch, tmp_path, capsys):
    """The command as a user types it: no data_dir, the Kaggle model_init untouched, the tokenizer file absent."""
    assert load_config(LONGCAP).data_dir is None
    argv = ["plan", "--config", "longcap100", "--memory-gib", "80", "--workdir", str(tmp_path), *mode]
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert re.search(r"^  peak\s+[\d.]+ [MG]iB$", out, re.M), out
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["params"] > 3e9 and saved["res"] == 224 and saved["batch_size"] == 8
    # Per device (8 simulated): the 3B model split FSDP-style, mostly float16 (frozen): 6 GB / 8 and more.
    assert saved["peak_bytes"] > saved["param_bytes"] > 0.5 * 2**30
    assert ("arithmetic" in saved["source"]) == bool(mode)


# --- The wheel: configs by name outside the clone ---------------------------------------------------------------


@pytest.mark.slow
def test_wheel_installed_outside_the_clone_trains_the_demo_by_name(tmp_path):
    """A non-editable install (wheel -> --target) run from an unrelated folder finds `--config demo`."""
    src = tmp_path / "src"  # A copy of the tracked files: the build leaves nothing in the clone.
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    for name in files.stdout.splitlines():
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    wheels, target, cwd = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    cwd.mkdir()
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, src], check=True)
    (wheel,) = wheels.glob("*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", target, wheel], check=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = "import paligemma_ft, paligemma_ft.configs; print(paligemma_ft.__file__)"
    where = subprocess.run([sys.executable, "-c", probe], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(target))  # The installed copy, not the clone.
    argv = ["train", "--config", "demo", "--workdir", "runs/demo", *QUICK]
    run = subprocess.run(
        [sys.executable, "-m", "paligemma_ft.commands.cli", *argv], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (cwd / "runs" / "demo" / "params.npz").stat().st_size > 0
