"""The shipped configs: each one loads and trains 2 steps on the demo model; longcap100 is the colab's recipe.

Every `configs/*.py` runs through `train.run` with the tiny-model override the README documents
(`model_init=builtin:demo`, `tokenizer=builtin:tiny`, `model_name_or_preset=""`) and its data pointed at small
generated folders (JSONL in both file-name layouts, COCO annotation files), on 2 of the 8 simulated devices.
The longcap100 numbers (learning rates, trainable set, dtypes) are checked on the real PaliGemma 2 3B shapes with
`jax.eval_shape`, so nothing of 3B size is allocated.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import loc_fixtures
import numpy as np
import pytest

from paligemma_ft import adapters, decode, predictor
from paligemma_ft.checkpoints import npz as ckpt_lib
from paligemma_ft.config import apply_override, load_config
from paligemma_ft.data import make_train_iter, shapes
from paligemma_ft.evaluate import evaluator_type
from paligemma_ft.model import Model, lora
from paligemma_ft.tokenizer import Tokenizer
from paligemma_ft.training import loop as train
from paligemma_ft.training import optim
from paligemma_ft.training import setup as setup_lib
from paligemma_ft.training import step as step_lib
from paligemma_ft.utils import tree_flatten_with_names

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))
# Configs whose data paths follow a required `data_dir` placeholder (every config has the key, declared None).
USER_DATA_CONFIGS = [
    name for name in CONFIGS if "c.data_dir = config_dict.placeholder(str)" in (CONFIG_DIR / name).read_text()
]
DEMO_NPZ = predictor.resolve_checkpoint("builtin:demo")
TINY_MODEL = [
    "--config.model_init=builtin:demo",
    "--config.tokenizer=builtin:tiny",
    '--config.model_name_or_preset=""',
    "--config.input.res=64",
]
# The metric every evaluator type reports (see paligemma_ft.evaluate).
PRIMARY_METRIC = {
    "caption": "cider",
    "vqa": "acc",
    "perplexity": "loss",
    "detection": "map",
    "segmentation": "mask_map",
    "refexp": "acc50",
}
# Generated data per config (default "caption"); the localization folders come from tests/loc_fixtures.py.
DATA_TASK = {
    "vqa.py": "count",
    "coco_detection.py": "coco_instances",
    "refcoco.py": "refexp",
    "refcoco.py:seg": "refexp",
}
VARIANTS = ["refcoco.py:seg"]  # Config variants (`file.py:arg`) trained like the files.
FAST_CONFIGS = {"demo.py", "longcap100.py"}  # ~10 s each: the others run with the slow tests.


@pytest.fixture(scope="module", autouse=True)
def quick_compiles():
    """Compiles with few XLA optimizations (about half the compile time; these runs are 2 tiny steps).

    The in-memory caches are cleared afterwards, so later tests never reuse these less-optimized executables.
    """
    saved = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", saved)
    jax.clear_caches()


def _write_coco(root: pathlib.Path, folder: dict[str, pathlib.Path]) -> None:
    """COCO 2017's layout from a shapes folder: two captions per image (short and long), images copied."""
    (root / "annotations").mkdir()
    for split, jsonl, offset in (("train", folder["train"], 0), ("val", folder["val"], 8)):
        (root / f"{split}2017").mkdir()
        images, anns = [], []
        for i, line in enumerate(jsonl.read_text().splitlines()):
            rel = json.loads(line)["image"]
            name = pathlib.Path(rel).name
            shutil.copy(root / rel, root / f"{split}2017" / name)
            images.append({"id": 100 + i, "file_name": name})
            for task in ("caption", "long_caption"):
                caption = shapes.make_example(0, offset + i, task, 64)["suffix"]
                anns.append({"id": len(anns), "image_id": 100 + i, "caption": caption})
        (root / "annotations" / f"captions_{split}2017.json").write_text(
            json.dumps({"images": images, "annotations": anns})
        )


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
    """task -> a folder with train.jsonl / val.jsonl, the longcap100 names, and (captions) COCO's files."""
    dirs = {}
    for task in ("caption", "count"):
        root = tmp_path_factory.mktemp(task)
        folder = shapes.write_shapes_folder(root, 8, seed=0, task=task, n_val=4, image_size=64)
        shutil.copy(folder["train"], root / "data_train90.jsonl")
        shutil.copy(folder["val"], root / "data_val10.jsonl")
        if task == "caption":
            _write_coco(root, folder)
        dirs[task] = root
    # COCO instances (boxes, polygons, RLE) and referring expressions (JSONL, pixel boxes, PNG masks).
    root = tmp_path_factory.mktemp("coco_instances")
    loc_fixtures.write_coco(root, 8, "train")
    loc_fixtures.write_coco(root, 4, "val", start=8)
    dirs["coco_instances"] = root
    root = tmp_path_factory.mktemp("refexp")
    loc_fixtures.write_jsonl(root, "train.jsonl", loc_fixtures.jsonl_rows(8, refexp=True))
    loc_fixtures.write_jsonl(root, "val.jsonl", loc_fixtures.jsonl_rows(4, start=8, refexp=True))
    dirs["refexp"] = root
    return dirs


def tiny_config(name: str, data_dir: pathlib.Path | None):
    """`configs/<name>` on the demo model: 2 steps, batch 4 on 2 devices, short texts, few eval examples."""
    config = load_config(str(CONFIG_DIR / name), TINY_MODEL)
    overrides = [
        "--config.input.text_len=16",
        "--config.input.batch_size=4",
        "--config.input.num_workers=0",
        "--config.total_steps=2",
        "--config.ckpt_steps=0",
    ]
    if data_dir is not None:
        overrides.append(f"--config.data_dir={data_dir}")
    if config.input.data.get("source") == "shapes":
        overrides.append("--config.input.data.n=16")
    if config.input.data.get("task") == "segment":  # vae-oid.npz is not available offline: a random codec.
        overrides.append("--config.input.data.codec=random:0")
    for eval_name, ecfg in config.evals.items():
        prefix = f"--config.evals.{eval_name}."
        overrides.append(prefix + "batch_size=4")
        if "max_decode_len" in ecfg:
            overrides.append(prefix + "max_decode_len=6")
        if "sampler" in ecfg:  # One greedy decoder compiled for all configs; beam search is test_decode's.
            decode.parse_sampler(ecfg.sampler)  # The shipped spec must parse.
            overrides.append(prefix + "sampler=greedy")
        if "bootstrap" in ecfg:
            overrides.append(prefix + "bootstrap=0")
        if ecfg.data.get("source") == "shapes":
            overrides.append(prefix + "data.n=4")
        if ecfg.data.get("task") == "segment":
            overrides += [prefix + "data.codec=random:0", prefix + "codec=random:0"]
    for item in overrides:
        apply_override(config, item)
    with config.unlocked():
        config.quiet = True
        config.num_devices = 2  # The batch of 4 splits over 2 devices; the demo model's tensors are replicated.
    return config


def _flat(tree) -> dict[str, np.ndarray]:
    return dict(tree_flatten_with_names(tree))


@pytest.fixture(scope="module")
def demo_shapes():
    """The demo model's parameter shapes as the trainer builds them (every tiny config has the same model)."""
    config = tiny_config("forkme.py", None)
    model, res, _ = setup_lib.make_model(config)
    return model, predictor.init_shapes(model, res, config.input.text_len + 1)


@pytest.mark.parametrize(  # Two configs in the fast set (`-m "not slow"`), every one in CI.
    "name", [n if n in FAST_CONFIGS else pytest.param(n, marks=pytest.mark.slow) for n in CONFIGS + VARIANTS]
)
def test_config_trains_two_steps_on_the_demo_model(name, data_dirs, demo_shapes, tmp_path):
    config = tiny_config(name, data_dirs[DATA_TASK.get(name, "caption")])
    model, demo_shapes = demo_shapes
    # The override gives every config the same demo model (LoRA configs add adapters to it).
    assert setup_lib.make_model(config)[0].clone(lora=None) == model
    workdir = tmp_path / "run"
    train.run(config, workdir)

    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(np.isfinite(r["train/loss"]) for r in steps)
    # The logged lr, by big_vision's cosine schedule over these 2 steps: every config warms up for
    # max(1, round(0.05 * 2)) = 1 step, so the update of step 1 (count 0) has lr 0 and step 2 (count 1) the peak.
    # longcap100 evaluates a 3-step schedule one count later (schedule_step_offset=1; 10 % warmup = 1 step): the
    # peak at count 1, then lr * 0.5 * (1 + cos(pi * (2 - 1) / (3 - 1))) = lr / 2 at count 2.
    expected = [config.lr, config.lr / 2] if config.get("schedule_step_offset") else [0.0, config.lr]
    assert [r["train/lr"] for r in steps] == pytest.approx(expected, rel=1e-6)
    # Every evaluator ran before and after training and reported its metric.
    for eval_name, ecfg in config.evals.items():
        key = f"{eval_name}/{PRIMARY_METRIC[evaluator_type(ecfg.type)]}"
        assert [r["step"] for r in rows if key in r] == [0, 2], key
        assert all(np.isfinite(r[key]) for r in rows if key in r)

    # The exported parameters: the config's storage dtypes; frozen ones bitwise the demo checkpoint's values.
    initial = _flat(ckpt_lib.load_params(DEMO_NPZ))
    final = _flat(ckpt_lib.load_params(workdir / "params.npz"))
    assert sorted(final) == sorted(initial)
    spec = lora.spec_from_config(config)
    if spec is None:
        trainable = _flat(optim.trainable_mask(demo_shapes, config.schedule))
    else:  # LoRA: params.npz merges the adapters, so exactly the adapted weights change.
        trainable = {pname: spec.adapts(pname) for pname in final}
    dtypes = _flat(optim.param_dtypes(demo_shapes, adapters.training_config(config, spec)))
    assert any(trainable.values())
    for pname, value in final.items():
        assert value.dtype == dtypes[pname], pname
        start = initial[pname].astype(dtypes[pname])
        if trainable[pname]:
            assert not np.array_equal(value, start), f"trainable {pname} did not change"
        else:
            assert value.tobytes() == start.tobytes(), f"frozen {pname} changed"


@pytest.mark.parametrize("name", USER_DATA_CONFIGS)
def test_config_without_data_dir_stops_before_compute(name, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the run reached training or evaluation")

    monkeypatch.setattr(step_lib, "train_step", refuse)
    monkeypatch.setattr(train, "run_evals", refuse)
    config = tiny_config(name, None)
    assert config.data_dir is None
    # The trainer names the missing key and how to set it, before loading any model or data.
    with pytest.raises(ValueError, match=r"config\.data_dir is not set: pass --config\.data_dir=DIR"):
        train.run(config, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_forkme_reads_the_longcap100_file_names(data_dirs, tmp_path):
    root = tmp_path / "longcap"
    root.mkdir()
    for item in ["data_train90.jsonl", "data_val10.jsonl", "images"]:
        (shutil.copytree if item == "images" else shutil.copy)(data_dirs["caption"] / item, root / item)
    config = load_config(
        str(CONFIG_DIR / "forkme.py"),
        [
            f"--config.data_dir={root}",
            "--config.train_file=data_train90.jsonl",
            "--config.val_file=data_val10.jsonl",
            "--config.input.batch_size=4",
            "--config.input.res=32",
            "--config.input.num_workers=0",
        ],
    )
    assert {e.data.path for e in config.evals.values()} == {str(root / "data_val10.jsonl")}
    batch = next(make_train_iter(config.input, Tokenizer.from_spec("builtin:tiny")))
    assert batch["image"].shape == (4, 32, 32, 3)


def test_vqa_tfds_variant_reads_tfds_records():
    config = load_config(
        str(CONFIG_DIR / "vqa.py") + ":tfds", ["--config.tfds_name=my_vqa:1.0.0", "--config.val_split=train[90%:]"]
    )
    train_data, val_data = config.input.data.to_dict(), config.evals.val.data.to_dict()
    assert train_data["source"] == val_data["source"] == "tfds"
    assert train_data["name"] == val_data["name"] == "my_vqa:1.0.0"
    assert (train_data["split"], val_data["split"]) == ("train", "train[90%:]")
    assert train_data["fields"] == {"image": "image", "prefix": "question", "suffix": "answers"}
    with pytest.raises(ValueError, match="unknown variant"):
        load_config(str(CONFIG_DIR / "vqa.py") + ":tfsd")


# --- longcap100: the colab's recipe on the real model's shapes --------------------------------------------------


@pytest.fixture(scope="module")
def longcap100():
    """(config, PaliGemma 2 3B 224 parameter shapes) — shapes only, via `jax.eval_shape`."""
    config = load_config(str(CONFIG_DIR / "longcap100.py"))
    cfg, res = predictor.model_config(config.model_name_or_preset, None, config.model)
    assert res == config.input.res == 224
    return config, predictor.init_shapes(Model(**cfg), res, config.input.text_len + 1)


def test_longcap100_learning_rates_are_the_colabs(longcap100):
    config, pg2_shapes = longcap100
    assert config.total_steps == 64 and config.input.batch_size == 8 and config.input.text_len == 128
    _, sched_fns = optim.make_optimizer(
        config, pg2_shapes, total_steps=config.total_steps, batch_size=config.input.batch_size
    )
    # As train.py logs it: the update of step s (1-based) uses count s - 1.
    lrs = {s: config.lr * float(sched_fns[0](s - 1)) for s in range(1, 65)}
    # The colab: base 0.03, warmup round(0.1 * 65) = 6 steps, then cosine to step 65, evaluated at 1..64.
    assert [lrs[s] for s in range(1, 7)] == pytest.approx([0.005 * k for k in range(1, 7)], rel=1e-6)
    assert lrs[6] == pytest.approx(0.03, rel=1e-6)
    assert lrs[64] == pytest.approx(0.03 * 0.5 * (1 + math.cos(math.pi * 58 / 59)), rel=1e-4)
    assert 1.5e-5 < lrs[64] < 2.5e-5
    assert all(lrs[s] > lrs[s + 1] > 0 for s in range(6, 64))
    # The whole curve, by the colab's formula: linear warmup over 6 counts, cosine over counts 6..65.
    colab = {
        s: 0.03 * min(1.0, s / 6) * 0.5 * (1 + math.cos(math.pi * min(max((s - 6) / 59, 0.0), 1.0)))
        for s in range(1, 65)
    }
    assert [lrs[s] for s in range(1, 65)] == pytest.approx([colab[s] for s in range(1, 65)], rel=1e-4)

    # The applied update is that lr: plain SGD moves a trainable leaf by exactly -lr * gradient, frozen ones not.
    small = {
        "img": {"embedding": {"kernel": jnp.zeros(3)}},
        "llm": {"layers": {"attn": {"q_einsum": {"w": jnp.zeros(3)}}, "mlp": {"linear": jnp.zeros(3)}}},
    }
    tx, _ = optim.make_optimizer(config, small, total_steps=config.total_steps, batch_size=config.input.batch_size)
    state, grads = tx.init(small), jax.tree.map(jnp.ones_like, small)
    for s in range(1, 65):
        updates, state = tx.update(grads, state, small)
        flat = _flat(updates)
        assert float(flat["llm/layers/attn/q_einsum/w"][0]) == pytest.approx(-colab[s], rel=1e-4)
        assert not np.any(flat["llm/layers/mlp/linear"]) and not np.any(flat["img/embedding/kernel"])


def test_longcap100_trains_attention_only_in_float32(longcap100):
    config, pg2_shapes = longcap100
    trainable = _flat(optim.trainable_mask(pg2_shapes, config.schedule))
    attn = {n for n in trainable if n.startswith("llm/layers/attn/")}
    assert {n for n, t in trainable.items() if t} == attn
    assert attn == {f"llm/layers/attn/{p}_einsum/w" for p in ("q", "kv", "attn_vec")}
    assert any(n.startswith("img/") for n in trainable)  # The image encoder is there, and frozen.
    dtypes = _flat(optim.param_dtypes(pg2_shapes, config))
    assert {str(dtypes[n]) for n in attn} == {"float32"}
    assert {str(d) for n, d in dtypes.items() if n not in attn} == {"float16"}
    # Plain SGD keeps no per-parameter state: only scalar counters.
    tx, _ = optim.make_optimizer(config, pg2_shapes, total_steps=config.total_steps, batch_size=config.input.batch_size)
    assert all(leaf.shape == () for leaf in jax.tree.leaves(jax.eval_shape(tx.init, pg2_shapes)))
    assert config.optax_name == "big_vision.sgd" and not config.wd and not config.grad_clip_norm
