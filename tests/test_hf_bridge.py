"""The two-way Hugging Face bridge (`paligemma-ft convert`, `model_init=hf:...`), proved against transformers.

Tiny PaliGemma 1 (multi-query and multi-head) and 2 models: `.npz` -> HF -> `.npz` is bitwise; transformers'
logits on our export equal ours; transformers' greedy `generate` on the exported demo model emits the tokens
`paligemma-ft predict` emits; a folder written by transformers itself imports with equal logits; a run trains from
a Hugging Face cache laid out as huggingface_hub lays it; bad inputs get one line each.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")
safetensors = pytest.importorskip("safetensors")

from paligemma_ft.checkpoints import hf, hf_files, loading  # noqa: E402
from paligemma_ft.checkpoints import npz as ckpt_lib  # noqa: E402
from paligemma_ft.commands import cli  # noqa: E402
from paligemma_ft.commands.convert import convert  # noqa: E402
from paligemma_ft.model import Model, get_preset  # noqa: E402
from paligemma_ft.tokenizer import Tokenizer, make_prompt, stack  # noqa: E402
from paligemma_ft.utils import tree_flatten_with_names  # noqa: E402

PRESETS = ["tiny_pg1", "tiny_pg1_mha", "tiny_pg2"]
TOL = 1e-4
TEXT_LEN, PREFIX_LEN = 8, 3


def random_params(preset, seed=0, dtype=np.float32):
    """Every leaf drawn at init-like scales (so norms and biases are non-trivial), as a flat {name: array}."""
    cfg, res = get_preset(preset)
    z = np.zeros((1, 4), np.int32)
    shapes = jax.eval_shape(Model(**cfg).init, jax.random.PRNGKey(0), np.zeros((1, res, res, 3)), z, z)["params"]
    rng = np.random.default_rng(seed)
    flat = {}
    for name, leaf in tree_flatten_with_names(shapes):
        stacked = int("encoderblock/" in name or "llm/layers/" in name)
        width = 32 if name.startswith("img/") else 64
        if leaf.ndim - stacked >= 2 or name.endswith("pos_embedding"):
            x = rng.normal(0, width**-0.5, leaf.shape)
        elif name.startswith("img/") and name.endswith("/scale"):
            x = 1 + rng.normal(0, 0.1, leaf.shape)
        else:
            x = rng.normal(0, 0.1, leaf.shape)
        flat[name] = x.astype(dtype)
    return cfg, res, flat


def inputs(res, vocab, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (2, res, res, 3)).astype(np.float32)
    text = rng.integers(0, vocab, (2, TEXT_LEN)).astype(np.int32)
    mask_ar = np.array([[0] * PREFIX_LEN + [1] * (TEXT_LEN - PREFIX_LEN)] * 2, np.int32)
    return image, text, mask_ar


def our_logits(cfg, params, image, text, mask_ar):
    tree = {k: v for k, v in params.items()}
    from paligemma_ft.utils import recover_tree

    nested = recover_tree(tree.keys(), (np.asarray(v, np.float32) for v in tree.values()))
    return np.asarray(jax.jit(lambda p: Model(**cfg).apply({"params": p}, image, text, mask_ar)[0])(nested))


def hf_logits(model, image, text, mask_ar, vocab, n_img):
    """HF's logits on the text positions: `<image>` placeholders in front, prefix-LM through token_type_ids."""
    placeholder = np.full((text.shape[0], n_img), model.config.image_token_index)
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(np.concatenate([placeholder, text], 1).astype(np.int64)),
            pixel_values=torch.from_numpy(image).permute(0, 3, 1, 2).to(model.dtype),
            token_type_ids=torch.from_numpy(np.concatenate([np.zeros_like(placeholder), mask_ar], 1)),
        )
    return out.logits[:, n_img:, :vocab].float().numpy()


def write_npz(path, flat):
    with ckpt_lib.NpzWriter(path) as writer:
        for name, array in flat.items():
            writer.write(name, array)


# --------------------------------------------------------------------------------- npz -> HF -> npz, logits


@pytest.mark.parametrize("preset", PRESETS)
def test_npz_to_hf_to_npz_is_bitwise_and_transformers_logits_match(preset, tmp_path):
    cfg, res, flat = random_params(preset, seed=PRESETS.index(preset))
    write_npz(tmp_path / "p.npz", flat)
    # Tiny shards, so the index and several files are exercised.
    convert(str(tmp_path / "p.npz"), str(tmp_path / "hf"), tokenizer="builtin:tiny", shard_size="40KB", progress=False)
    index = json.loads((tmp_path / "hf" / hf_files.INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((tmp_path / "hf" / s).is_file() for s in shards)
    with safetensors.safe_open(str(tmp_path / "hf" / shards[0]), "pt") as f:  # The safetensors library reads ours.
        assert f.metadata() == {"format": "pt"} and list(f.keys())
    convert(str(tmp_path / "hf"), str(tmp_path / "back.npz"), progress=False)
    back = dict(tree_flatten_with_names(ckpt_lib.load_params(tmp_path / "back.npz")))
    assert back.keys() == flat.keys()
    for name in flat:
        assert back[name].dtype == flat[name].dtype and back[name].tobytes() == flat[name].tobytes(), name

    model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    vocab = cfg["llm"]["vocab_size"]
    assert model.config.image_token_index == vocab and model.config.text_config.vocab_size == hf.hf_vocab_size(vocab)
    image, text, mask_ar = inputs(res, vocab)
    ours = our_logits(cfg, flat, image, text, mask_ar)
    theirs = hf_logits(model, image, text, mask_ar, vocab, (res // 8) ** 2)
    assert np.abs(ours).max() > 1.0
    np.testing.assert_allclose(theirs, ours, atol=TOL, rtol=0)


def test_bf16_stays_bf16_unless_dtype_says_otherwise(tmp_path):
    _, _, flat = random_params("tiny_pg2", dtype=ml_dtypes.bfloat16)
    write_npz(tmp_path / "p.npz", flat)
    summary = convert(str(tmp_path / "p.npz"), str(tmp_path / "hf"), progress=False)
    assert set(summary.dtypes) == {"bfloat16"}
    assert "tokenizer: builtin:tiny" in summary.notes  # The tiny vocabulary's tokenizer, by the one rule.
    with safetensors.safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    convert(str(tmp_path / "hf"), str(tmp_path / "f32.npz"), dtype="float32", progress=False)
    back = dict(tree_flatten_with_names(ckpt_lib.load_params(tmp_path / "f32.npz")))
    for name, array in flat.items():
        assert back[name].dtype == np.float32
        np.testing.assert_array_equal(back[name], array.astype(np.float32))


# ------------------------------------------------------------------------------ the demo: CLI, generate


def test_demo_both_ways_on_the_command_line_and_generate_matches_predict(tmp_path, capsys):
    from paligemma_ft.data.shapes import encode_image, make_example

    assert cli.main(["convert", "builtin:demo", str(tmp_path / "hf"), "--tokenizer", "builtin:tiny", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Wrote" in out and "model.safetensors" in out and "tokenizer: builtin:tiny" in out
    # DST's folder does not exist yet: it is created.
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "new" / "demo.npz"), "--quiet"]) == 0
    assert "dropped" in capsys.readouterr().out  # The <image> and padding rows.
    demo = dict(tree_flatten_with_names(ckpt_lib.load_params(loading.checkpoint_path("builtin:demo"))))
    back = dict(tree_flatten_with_names(ckpt_lib.load_params(tmp_path / "new" / "demo.npz")))
    assert all(back[n].tobytes() == demo[n].tobytes() for n in demo) and back.keys() == demo.keys()

    images = [make_example(i, 3, "caption", 64)["image"] for i in range(3)]
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"scene{i}.png")
        paths[-1].write_bytes(encode_image(image))
    args = ["predict", "--max-decode-len", "20", "--prompt", "caption en"] + sum(
        [["--image", str(p)] for p in paths], []
    )
    assert cli.main(args) == 0
    ours = [line.split("\t", 1)[1] for line in capsys.readouterr().out.splitlines()]

    from paligemma_ft import decode as decode_lib
    from paligemma_ft.predictor import load_predictor, until_eos

    predictor = load_predictor("builtin:demo")  # What `predict` runs, token ids instead of text.
    batch = predictor.prompt_batch(images, "caption en")
    our_tokens = [
        until_eos(r) for r in np.asarray(decode_lib.decode(predictor.model, predictor.params, batch, max_decode_len=20))
    ]
    assert [predictor.tok.decode(t) for t in our_tokens] == ours

    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tok = Tokenizer.from_spec("builtin:tiny")
    theirs, their_tokens = [], []
    for image in images:
        batch = processor(text="<image>caption en", images=image, return_tensors="pt")
        prompt = stack([make_prompt(tok, "caption en", 4)[0]])["text"][0]
        assert batch["input_ids"][0, 64:].tolist() == prompt.tolist()  # The processor tokenizes as we do.
        with torch.no_grad():
            tokens = model.generate(**batch, max_new_tokens=20, do_sample=False)[0, batch["input_ids"].shape[1] :]
        their_tokens.append(until_eos(tokens.tolist()))
        theirs.append(tok.decode(their_tokens[-1]))
    assert their_tokens == our_tokens and theirs == ours and all(ours)


# ------------------------------------------------------------------- a folder written by transformers itself


@pytest.mark.parametrize("preset", PRESETS)
def test_transformers_save_pretrained_folder_imports_with_equal_logits(preset, tmp_path):
    cfg, res = get_preset(preset)
    torch.manual_seed(PRESETS.index(preset))
    model = transformers.PaliGemmaForConditionalGeneration(hf.to_hf_config(cfg, image_size=res)).eval()
    with torch.no_grad():
        for p in model.parameters():  # Beyond HF's init (std 0.02, norms 0): logits of a useful size.
            p.normal_(0, 0.15)
    model.save_pretrained(tmp_path / "hf", max_shard_size="50KB")  # transformers' own layout, sharded.
    assert (tmp_path / "hf" / hf_files.INDEX).is_file()
    loaded = loading.load_model(str(tmp_path / "hf"), "builtin:tiny")  # Through the one loading path.
    vocab = cfg["llm"]["vocab_size"]
    assert loaded.model.llm["vocab_size"] == vocab and loaded.res == res
    image, text, mask_ar = inputs(res, vocab, seed=1)
    ours = np.asarray(loaded.model.apply({"params": loaded.params}, image, text, mask_ar)[0])
    theirs = hf_logits(model, image, text, mask_ar, vocab, (res // 8) ** 2)
    assert np.abs(ours).max() > 1.0
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------- model_init=hf: from the HF cache


def fake_hub_cache(cache, repo_id, folder, commit="0123456789abcdef0123456789abcdef01234567"):
    """`folder`'s files laid out as huggingface_hub caches a download: blobs by hash, a snapshot of symlinks,
    refs/main naming the commit."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in sorted(folder.iterdir()):
        blob = root / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copy(path, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / path.name)
    return snapshot


@pytest.mark.slow
def test_model_init_hf_trains_from_a_fake_hf_cache(tmp_path, monkeypatch, caplog):
    import ml_collections

    from paligemma_ft.config import load_config
    from paligemma_ft.training import loop as train

    cfg, res, flat = random_params("tiny_pg2")
    write_npz(tmp_path / "p.npz", flat)
    convert(str(tmp_path / "p.npz"), str(tmp_path / "export"), tokenizer="builtin:tiny", progress=False)
    snapshot = fake_hub_cache(tmp_path / "hub", "someone/tiny-paligemma", tmp_path / "export")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hf_files.cached_snapshot("someone/tiny-paligemma") == snapshot
    with pytest.raises(FileNotFoundError, match=r"'hf:someone/other' is not in the Hugging Face cache .*hub"):
        hf_files.cached_snapshot("someone/other")

    c = load_config("configs/demo.py").to_dict()
    c.update(model_name_or_preset="", model_init="hf:someone/tiny-paligemma", tokenizer="", total_steps=2)
    c.update(ckpt_steps=0, quiet=True, evals={})
    c["input"].update(data=dict(source="shapes", n=32, seed=0, task="caption", image_size=32), res=32)
    c["input"].update(text_len=16, batch_size=8)
    config = ml_collections.ConfigDict(c)
    setup = train.setup(config)
    assert setup.tok.name == str(snapshot / "tokenizer.model")  # Found with the checkpoint, as for Kaggle.
    with caplog.at_level(logging.INFO):
        train.run(config, tmp_path / "run")
    assert f"Loaded {len(flat)} parameter(s) from hf:someone/tiny-paligemma" in caplog.text
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]


def test_sliding_window_shorter_than_the_sequences_warns_naming_the_setting(tmp_path):
    cfg, res, flat = random_params("tiny_pg2")
    write_npz(tmp_path / "p.npz", flat)
    convert(str(tmp_path / "p.npz"), str(tmp_path / "hf"), tokenizer="builtin:tiny", progress=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["text_config"].update(sliding_window=20, layer_types=["sliding_attention", "full_attention"])
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    run = {"model_init": str(tmp_path / "hf"), "model_name_or_preset": "", "input": {"res": res, "text_len": 16}}
    with pytest.warns(UserWarning, match=r"text_config\.sliding_window=20 .*\(16 image \+ config\.input\.text_len=16"):
        loading.make_model(run)
    summary = convert(str(tmp_path / "hf"), str(tmp_path / "back.npz"), progress=False)
    assert any("sliding_window=20" in n for n in summary.notes)


# ------------------------------------------------------------------------------------------- bad inputs


def _one_error_line(capsys, *args):
    assert cli.main(["convert", *args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_get_one_clear_line_each(tmp_path, capsys):
    # Not PaliGemma.
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    with open(tmp_path / "llama" / "model.safetensors", "wb") as f:
        header = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
        f.write(len(header).to_bytes(8, "little") + header + bytes(4))
    err = _one_error_line(capsys, str(tmp_path / "llama"), str(tmp_path / "x.npz"))
    assert "describes a 'llama' model" in err and "config.json" in err

    # Missing shards.
    cfg, res, flat = random_params("tiny_pg1")
    write_npz(tmp_path / "p.npz", flat)
    convert(str(tmp_path / "p.npz"), str(tmp_path / "hf"), shard_size="40KB", progress=False)
    shards = sorted(p for p in (tmp_path / "hf").iterdir() if p.name.startswith("model-"))
    shards[1].unlink()
    err = _one_error_line(capsys, str(tmp_path / "hf"), str(tmp_path / "y.npz"))
    assert f"shards listed in {hf_files.INDEX} are missing: {shards[1].name}" in err

    # A dtype the target cannot hold: a value past float16's range, and float8 into an .npz.
    flat["img/head/bias"][0] = 1e6
    write_npz(tmp_path / "big.npz", flat)
    err = _one_error_line(capsys, str(tmp_path / "big.npz"), str(tmp_path / "f16"), "--dtype", "float16")
    assert "img/head/bias" in err or "projector.linear.bias" in err
    assert "do not fit float16" in err and not (tmp_path / "f16" / "model.safetensors").exists()
    convert(str(tmp_path / "p.npz"), str(tmp_path / "hf8"), progress=False)
    _to_float8(tmp_path / "hf8" / "model.safetensors")
    err = _one_error_line(capsys, str(tmp_path / "hf8"), str(tmp_path / "z.npz"))
    assert "float8" in err and "not a plain numeric dtype" in err and not (tmp_path / "z.npz").exists()

    # Not an empty destination; a pickle-only folder.
    err = _one_error_line(capsys, str(tmp_path / "p.npz"), str(tmp_path / "hf8"))
    assert "exists and is not an empty folder" in err
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text('{"model_type": "paligemma"}')
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"pickle")
    err = _one_error_line(capsys, str(tmp_path / "bin"), str(tmp_path / "b.npz"))
    assert "pytorch_model.bin, which are pickles and are not read" in err


def _to_float8(path):
    """Rewrites one tensor of a safetensors file as float8 (same shape), with the safetensors library."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    name = next(k for k in tensors if k.endswith("post_layernorm.bias"))
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_vocabulary_rows_used_by_added_tokens_are_refused_and_an_untied_head_too(tmp_path):
    cfg, res, flat = random_params("tiny_pg1")
    write_npz(tmp_path / "p.npz", flat)
    convert(str(tmp_path / "p.npz"), str(tmp_path / "hf"), tokenizer="builtin:tiny", progress=False)
    tok_json = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    tok_json["added_tokens"].append({"id": 1665, "content": "<my_token>", "special": True})
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(tok_json))
    with pytest.raises(ckpt_lib.CheckpointError, match=r"used by tokens the tokenizer added \(1665 '<my_token>'\)"):
        convert(str(tmp_path / "hf"), str(tmp_path / "v.npz"), progress=False)
    summary = convert(str(tmp_path / "hf"), str(tmp_path / "v.npz"), keep_vocab=True, progress=False)
    assert ckpt_lib.read_specs(tmp_path / "v.npz")["llm/embedder/input_embedding"].shape[0] == hf.hf_vocab_size(1664)
    assert any("kept all" in n for n in summary.notes)

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    head = tensors["language_model.model.embed_tokens.weight"].clone()
    head[0, 0] += 1
    tensors["language_model.lm_head.weight"] = head
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ckpt_lib.CheckpointError, match="lm_head.weight differs from .*embed_tokens.weight"):
        convert(str(tmp_path / "hf"), str(tmp_path / "w.npz"), keep_vocab=True, progress=False)


def test_orbax_step_of_a_workdir_converts(tmp_path):
    import jax.numpy as jnp

    from paligemma_ft.checkpoints import state as train_state
    from paligemma_ft.utils import recover_tree

    _, _, flat = random_params("tiny_pg1")
    params = recover_tree(flat.keys(), (jnp.asarray(v) for v in flat.values()))
    state = {"params": params, "opt": {"mu": jnp.zeros(3)}, "step": jnp.int32(7), "rng": jax.random.PRNGKey(0)}
    manager = train_state.make_manager(tmp_path / "run" / "checkpoints", async_save=False)
    train_state.save(manager, 7, state, {"grain": {}})
    manager.close()
    convert(str(tmp_path / "run"), str(tmp_path / "s7.npz"), step=7, progress=False)
    back = dict(tree_flatten_with_names(ckpt_lib.load_params(tmp_path / "s7.npz")))
    assert back.keys() == flat.keys() and all(back[n].tobytes() == flat[n].tobytes() for n in flat)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"no training checkpoint step 3 .*steps there: \[7\]"):
        convert(str(tmp_path / "run"), str(tmp_path / "s3.npz"), step=3, progress=False)
    assert cli.main(["convert", str(tmp_path / "run"), str(tmp_path / "hf"), "--step", "--quiet"]) == 0  # Latest.
    assert (tmp_path / "hf" / "model.safetensors").is_file()


@pytest.mark.slow
def test_bench_convert_smoke(tmp_path, capsys):
    """bench/bench_convert.py at a tiny size: both directions run, the round trip is checked, nothing is left."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "bench_convert.py"
    spec = importlib.util.spec_from_file_location("bench_convert", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--preset", "tiny_pg2", "--shard-size", "100KB", "--dir", str(tmp_path), "--no-results"])
    out = capsys.readouterr().out
    assert "| npz -> HF |" in out and "| HF -> npz |" in out and "same names/shapes/dtypes True" in out
    assert list(tmp_path.iterdir()) == []  # The generated files were deleted.
