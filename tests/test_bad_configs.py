"""Bad configs and checkpoints stop `train.run` before any compute, with a message naming the culprit.

Each case is the demo config (`configs/demo.py`) with overrides, run on the 8 simulated CPU devices. "Before any
compute" is checked by making the train step and the evaluations fail loudly if they are ever reached, and by
the workdir holding no metrics or checkpoints afterwards.
"""

import pathlib
import re

import jax
import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from paligemma_ft.checkpoints import npz as ckpt_lib
from paligemma_ft.checkpoints import state as train_state
from paligemma_ft.commands import cli
from paligemma_ft.config import load_config
from paligemma_ft.tokenizer import Tokenizer
from paligemma_ft.training import loop as train
from paligemma_ft.training import step as step_lib

DEMO = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py")
SMALL = [  # Whole dicts, so that the test does not depend on the demo's data and evaluation names.
    "--config.input.data={'source': 'shapes', 'n': 32, 'seed': 0, 'task': 'caption', 'image_size': 64}",
    "--config.evals={'val': {'type': 'caption', 'batch_size': 8, 'max_decode_len': 4, 'bootstrap': 0, "
    "'data': {'source': 'shapes', 'n': 8, 'seed': 0, 'task': 'caption', 'image_size': 64, 'offset': 1000}}}",
    "--config.total_steps=2",
]


class ComputeStarted(AssertionError):
    pass


@pytest.fixture
def no_compute(monkeypatch):
    """Makes training and evaluation raise if the run gets that far."""

    def refuse(*args, **kwargs):
        raise ComputeStarted("the run reached training or evaluation")

    monkeypatch.setattr(step_lib, "train_step", refuse)
    monkeypatch.setattr(train, "run_evals", refuse)


def run_fails(tmp_path, overrides, error, match):
    config = load_config(DEMO, SMALL + overrides)
    workdir = tmp_path / "run"
    with pytest.raises(error, match=match):
        train.run(config, workdir)
    assert not (workdir / "metrics.jsonl").exists() and not (workdir / "params.npz").exists()
    assert not list(workdir.glob("checkpoints/*"))  # No training checkpoint (an absent folder holds none).


def test_typo_in_an_override_names_the_key(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown key config\.input\.batchsize .*did you mean 'batch_size'"):
        load_config(DEMO, ["--config.input.batchsize=8"])
    with pytest.raises(ValueError, match=r"unknown key config\.totl_steps .*did you mean 'total_steps'"):
        load_config(DEMO, ["--config.totl_steps=8"])
    # From the command line: one line, exit code 2, nothing created.
    assert cli.main(["train", "--config", DEMO, "--workdir", str(tmp_path / "w"), "--config.lr_rate=1e-3"]) == 2
    assert "config.lr_rate" in capsys.readouterr().err and not (tmp_path / "w").exists()


def test_impossible_mesh(tmp_path, no_compute):
    run_fails(
        tmp_path,
        ["--config.mesh=[('data', 3)]"],
        ValueError,
        r"config\.mesh \[\('data', 3\)\] needs 3 devices but there are 8",
    )
    run_fails(
        tmp_path,
        ["--config.mesh=[('data', -1), ('model', 3)]"],
        ValueError,
        r"config\.mesh .* cannot be laid over 8 devices",
    )


def test_batch_not_dividing_the_devices(tmp_path, no_compute):
    run_fails(
        tmp_path,
        ["--config.input.batch_size=12"],
        ValueError,
        r"input\.batch_size=12 must be divisible by the 8 batch shards .* try 16",
    )


def test_model_init_for_another_model_size(tmp_path, no_compute):
    # The demo checkpoint (3 layers x 128 wide) for the tiny preset's model (2 layers x 64).
    run_fails(
        tmp_path,
        ["--config.model_name_or_preset=tiny_pg1"],
        ckpt_lib.CheckpointMismatchError,
        r"Checkpoint '.*demo\.npz' does not fit the model: .* wrong shape(.|\n)*llm/embedder/input_embedding",
    )


def test_resuming_a_workdir_of_another_model_size(tmp_path, no_compute):
    """The workdir's training checkpoint was written by a run of another model: refused, and left alone."""
    other = train.setup(
        load_config(
            DEMO, SMALL + ["--config.model_init=", "--config.input.res=32", "--config.model_name_or_preset=tiny_pg1"]
        )
    )
    state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), other.state_abstract)  # On the host: quick.
    manager = train_state.make_manager(tmp_path / "run" / "checkpoints")
    train_state.save(manager, 1, state, {"grain": {}, "fingerprint": {}})
    manager.close()
    config = load_config(DEMO, SMALL)
    with pytest.raises(
        train_state.CheckpointMismatchError,
        match=r"Checkpoint step 1 in .*checkpoints was saved "
        r"for another model or optimizer.*Use a new --workdir",
    ):
        train.run(config, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["1"]  # Untouched.
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path, no_compute):
    tok = Tokenizer.from_spec("builtin:tiny")
    proto = model_pb2.ModelProto()
    proto.ParseFromString(tok.model_bytes)
    for i in range(100):  # A tokenizer of another model: 100 pieces more than the demo model embeds.
        proto.pieces.add(piece=f"<extra{i:03d}>", score=0.0, type=model_pb2.ModelProto.SentencePiece.USER_DEFINED)
    path = tmp_path / "other.model"
    path.write_bytes(proto.SerializeToString())
    run_fails(
        tmp_path,
        [f"--config.tokenizer={path}"],
        ValueError,
        re.escape(f"Tokenizer {path} has 1764 pieces but the model from ") + r".*demo\.npz embeds only 1664",
    )
