"""The one loading path (`checkpoints/loading.py`): specs, tokenizer rules shared by every command, and parameters
loaded where the checkpoint has them and initialised where it does not, with no change to the trainer."""

from __future__ import annotations

import logging
import textwrap

import jax
import ml_collections
import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from paligemma_ft.checkpoints import loading
from paligemma_ft.checkpoints import npz as ckpt_lib
from paligemma_ft.commands import cli
from paligemma_ft.config import load_config
from paligemma_ft.data.shapes import encode_image, make_example
from paligemma_ft.evaluate.runner import evaluate_command
from paligemma_ft.model import Model, get_preset
from paligemma_ft.predictor import load_predictor
from paligemma_ft.tokenizer import Tokenizer
from paligemma_ft.training import loop as train
from paligemma_ft.utils import tree_flatten_with_names

_DATA = dict(source="shapes", n=32, seed=0, task="caption", image_size=32)

ADAPTER_MODULE = '''
"""A PaliGemma with one new parameter: a zero-initialised bias added to the text embeddings."""
import flax.linen as nn

from paligemma_ft.model import Model
from paligemma_ft.model.presets import resolve_llm_config


class AdapterModel(Model):
    def setup(self):
        super().setup()
        width = resolve_llm_config(self.llm)["width"]
        self.adapter = self.param("adapter", nn.initializers.zeros_init(), (width,))

    def embed_text(self, tokens, train=False):
        ztxt, out = super().embed_text(tokens, train=train)
        return ztxt + self.adapter.astype(ztxt.dtype), out
'''


def _released_layout_npz(path, preset="tiny_pg1", seed=0):
    """Random parameters of a preset, written as the Kaggle files are: every name under `params/`, float32."""
    cfg, res = get_preset(preset)
    z = np.zeros((1, 4), np.int32)
    shapes = jax.eval_shape(Model(**cfg).init, jax.random.PRNGKey(0), np.zeros((1, res, res, 3)), z, z)["params"]
    rng = np.random.default_rng(seed)
    flat = {n: (rng.standard_normal(s.shape) * 0.05).astype(np.float32) for n, s in tree_flatten_with_names(shapes)}
    with ckpt_lib.NpzWriter(path) as writer:
        for name, array in flat.items():
            writer.write("params/" + name, array)
    return flat


def _train_config(model_init, **overrides):
    c = load_config("configs/demo.py").to_dict()
    c.update(
        model_name_or_preset="",
        model_init=str(model_init),
        tokenizer="builtin:tiny",
        total_steps=2,
        ckpt_steps=0,
        quiet=True,
        evals={},
    )
    c["input"].update(data=dict(_DATA), res=32, text_len=16, batch_size=8)
    c.update(overrides)
    return ml_collections.ConfigDict(c)


@pytest.mark.slow
def test_a_new_parameter_trains_from_a_released_layout_npz_with_no_trainer_change(tmp_path, monkeypatch, caplog):
    (tmp_path / "adapter_model.py").write_text(textwrap.dedent(ADAPTER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    stored = _released_layout_npz(tmp_path / "pt.npz")
    config = _train_config(
        tmp_path / "pt.npz",
        model={"model_class": "adapter_model:AdapterModel"},
        schedule=[("adapter", {}), (".*", None)],  # Only the new parameter trains: the others must stay as stored.
    )
    with caplog.at_level(logging.INFO):
        train.run(config, tmp_path / "run")
    assert "Initialising 1 parameter(s) the checkpoint" in caplog.text and ": adapter" in caplog.text
    assert f"Loaded {len(stored)} parameter(s)" in caplog.text
    final = dict(tree_flatten_with_names(ckpt_lib.load_params(tmp_path / "run" / "params.npz")))
    assert set(final) == set(stored) | {"adapter"}
    for name, array in stored.items():  # Loaded from the file, bit for bit (frozen for 2 steps).
        assert final[name].tobytes() == array.tobytes(), name
    assert np.abs(final["adapter"]).max() > 0  # Born zero by its init, then trained.


def test_dont_load_reinitialises_a_stored_parameter(tmp_path, caplog):
    stored = _released_layout_npz(tmp_path / "pt.npz")
    model, res, checkpoint = loading.make_model(_train_config(tmp_path / "pt.npz"))
    shapes = loading.init_shapes(model, res, 8)
    mesh = jax.make_mesh((8,), ("data",))
    replicated = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), shapes)

    def init():
        z = np.zeros((1, 8), np.int32)
        return model.init(jax.random.PRNGKey(0), np.zeros((1, res, res, 3)), z, z)["params"]

    with caplog.at_level(logging.INFO):
        params = loading.load_params(checkpoint, shapes, replicated, init_fn=init, dont_load=["img/head/.*"])
    flat = dict(tree_flatten_with_names(params))
    assert "matched by dont_load: img/head/bias, img/head/kernel" in caplog.text
    assert not np.asarray(flat["img/head/kernel"]).any()  # The ViT head's zero init, not the stored values.
    assert np.asarray(flat["llm/final_norm/scale"]).tobytes() == stored["llm/final_norm/scale"].tobytes()
    assert all(x.sharding.is_fully_replicated and len(x.sharding.device_set) == 8 for x in flat.values())


def test_inference_refuses_a_checkpoint_that_lacks_parameters(tmp_path, monkeypatch):
    """predict / evaluate / the app: an uninitialised parameter would only produce noise, so it is an error."""
    (tmp_path / "adapter_model.py").write_text(textwrap.dedent(ADAPTER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    _released_layout_npz(tmp_path / "pt.npz")
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"(?s)1 missing.*adapter  expected shape \(64,\)"):
        loading.load_model(str(tmp_path / "pt.npz"), model_overrides={"model_class": "adapter_model:AdapterModel"})
    with pytest.raises(ValueError, match=r"model_class='nowhere:X' cannot be imported"):
        loading.load_model(str(tmp_path / "pt.npz"), model_overrides={"model_class": "nowhere:X"})


# ------------------------------------------------------------------------------- one tokenizer rule for all


BUNDLE = "someone/demo-ft/jax/demo-ft/1"


def _bigger_tokenizer(extra):
    proto = model_pb2.ModelProto()
    proto.ParseFromString(Tokenizer.from_spec("builtin:tiny").model_bytes)
    for i in range(extra):
        proto.pieces.add(piece=f"<extra{i:03d}>", score=0.0, type=model_pb2.ModelProto.SentencePiece.USER_DEFINED)
    return proto.SerializeToString()


@pytest.fixture
def kaggle_bundle(tmp_path, monkeypatch):
    """A kagglehub cache holding a bundle (checkpoint + paligemma_tokenizer.model), with a vocabulary that is not
    the builtin tiny one's, so no fallback can stand in for the bundle's tokenizer."""
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "cache"))
    for name in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(name, raising=False)
    *parts, version = BUNDLE.split("/")
    variation = (tmp_path / "cache").joinpath("models", *parts)
    bundle = variation / version
    bundle.mkdir(parents=True)
    params = ckpt_lib.load_params(loading.checkpoint_path("builtin:demo"))
    table = params["llm"]["embedder"]["input_embedding"]
    params["llm"]["embedder"]["input_embedding"] = np.concatenate([table, np.zeros((36, table.shape[1]), table.dtype)])
    ckpt_lib.save_params(bundle / "demo-ft.npz", params)
    (bundle / "paligemma_tokenizer.model").write_bytes(_bigger_tokenizer(36))
    (variation / f"{version}.complete").touch()
    return bundle


def test_train_predict_and_evaluate_find_the_tokenizer_in_a_kaggle_bundle(kaggle_bundle, tmp_path, capsys):
    spec = f"kaggle:{BUNDLE}"
    found = str(kaggle_bundle / "paligemma_tokenizer.model")
    config = _train_config(spec, tokenizer="")
    config.input.res = 64
    assert train.setup(config).tok.name == found  # Training, as before.
    assert load_predictor(spec).tok.name == found  # The app and the notebook load through load_predictor.
    image = tmp_path / "scene.png"
    image.write_bytes(encode_image(make_example(1, 0, "caption", 64)["image"]))
    assert cli.main(["predict", "--checkpoint", spec, "--image", str(image), "--prompt", "caption en"]) == 0
    assert capsys.readouterr().out.startswith(f"{image}\t")
    eval_config = _train_config(spec, tokenizer="")
    eval_config.input.res = 64
    eval_config.evals = {
        "val": dict(type="caption", batch_size=8, max_decode_len=4, bootstrap=0, data=dict(_DATA, n=8))
    }
    metrics = evaluate_command(eval_config, None, spec, outdir=tmp_path / "eval", stdout=None)
    assert metrics["val/n"] == 8


def test_without_any_tokenizer_every_command_gives_the_same_message(tmp_path, capsys):
    params = ckpt_lib.load_params(loading.checkpoint_path("builtin:demo"))
    table = params["llm"]["embedder"]["input_embedding"]
    params["llm"]["embedder"]["input_embedding"] = np.concatenate([table, np.zeros((36, table.shape[1]), table.dtype)])
    ckpt_lib.save_params(tmp_path / "ft.npz", params)
    image = tmp_path / "scene.png"
    image.write_bytes(encode_image(make_example(1, 0, "caption", 64)["image"]))
    assert cli.main(["predict", "--checkpoint", str(tmp_path / "ft.npz"), "--image", str(image), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "needs a tokenizer" in err and "paligemma_tokenizer.model" in err and loading.TOKENIZER_URL in err
    config = _train_config(tmp_path / "ft.npz", tokenizer="")
    with pytest.raises(loading.TokenizerNotFoundError, match="needs a tokenizer"):
        train.setup(config)
    (tmp_path / "tokenizer.model").write_bytes(_bigger_tokenizer(36))  # Next to the file: found by both.
    config.input.res = 64
    assert train.setup(config).tok.name == str(tmp_path / "tokenizer.model")
    assert load_predictor(str(tmp_path / "ft.npz")).tok.name == str(tmp_path / "tokenizer.model")


def test_a_workdir_brings_its_own_tokenizer_and_model_settings(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    ckpt_lib.save_params(workdir / "params.npz", ckpt_lib.load_params(loading.checkpoint_path("builtin:demo")))
    (tmp_path / "tok.model").write_bytes(Tokenizer.from_spec("builtin:tiny").model_bytes)
    (workdir / "config.json").write_text(
        '{"tokenizer": "%s", "model_name_or_preset": "", "model": {"llm": {"dropout": 0.25}}}'
        % (tmp_path / "tok.model")
    )
    checkpoint = loading.resolve_checkpoint(str(workdir))
    assert checkpoint.kind == "workdir" and checkpoint.path == str(workdir / "params.npz")
    assert loading.resolve_tokenizer(None, checkpoint, 1664) == str(tmp_path / "tok.model")
    cfg, res = loading.model_config(None, checkpoint, None)
    assert cfg["llm"]["dropout"] == 0.25 and res == 64
