"""Tests for big_vision `.npz` checkpoint IO (format, header checks), fitting to the model, validation, placement."""

import logging
import os
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import scipy.ndimage
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from paligemma_ft.checkpoints import fit, placement
from paligemma_ft.checkpoints import npz as ckpt
from paligemma_ft.utils import recover_tree, tree_flatten_with_names

# Real PaliGemma names with tiny shapes (scan layout: depth 2 stacked on axis 0).
SHAPES = {
    "img/embedding/kernel": (2, 2, 3, 8),
    "img/embedding/bias": (8,),
    "img/pos_embedding": (1, 16, 8),
    "img/Transformer/encoderblock/LayerNorm_0/scale": (2, 8),
    "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel": (2, 8, 2, 4),
    "img/Transformer/encoder_norm/scale": (8,),
    "img/head/kernel": (8, 8),
    "llm/embedder/input_embedding": (50, 8),
    "llm/layers/attn/kv_einsum/w": (2, 2, 1, 8, 4),
    "llm/layers/mlp/gating_einsum": (2, 2, 8, 16),
    "llm/layers/pre_attention_norm/scale": (2, 8),
    "llm/final_norm/scale": (8,),
}


def make_params(dtype=np.float32, shapes=SHAPES, seed=0):
    rng = np.random.default_rng(seed)
    flat = {n: rng.standard_normal(s, dtype=np.float32).astype(dtype) for n, s in shapes.items()}
    return recover_tree(flat.keys(), flat.values())


def abstract(tree):
    """What `jax.eval_shape` of the model's init gives: a tree of ShapeDtypeStruct."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def flat(tree):
    return dict(tree_flatten_with_names(tree))


def assert_bit_exact(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        assert fa[name].dtype == fb[name].dtype, name
        assert fa[name].shape == fb[name].shape, name
        assert np.ascontiguousarray(fa[name]).tobytes() == np.ascontiguousarray(fb[name]).tobytes(), name


# ----------------------------------------------------------------------------------------------- format


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16], ids=["f32", "f16", "bf16"])
def test_save_load_round_trip_is_bit_exact(tmp_path, dtype):
    params = make_params(dtype)
    path = tmp_path / "p.npz"
    ckpt.save_params(path, params)
    loaded = ckpt.load_params(path)
    assert_bit_exact(loaded, params)
    # On disk: bare names (no params/ prefix), bf16 as 2-byte void as big_vision writes it.
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(SHAPES)
        stored = npz["llm/final_norm/scale"].dtype
    assert stored == (np.dtype("V2") if dtype is ml_dtypes.bfloat16 else np.dtype(dtype))


def test_saved_file_is_readable_by_plain_numpy_like_big_vision(tmp_path):
    params = make_params(ml_dtypes.bfloat16)
    ckpt.save_params(tmp_path / "p.npz", params)
    with np.load(tmp_path / "p.npz", allow_pickle=False) as npz:
        raw = npz["img/head/kernel"]
    np.testing.assert_array_equal(raw.view(ml_dtypes.bfloat16), params["img"]["head"]["kernel"])


def test_loads_kaggle_layout_with_params_prefix(tmp_path):
    params = make_params(np.float16)
    np.savez(tmp_path / "kaggle.npz", **{f"params/{n}": v for n, v in flat(params).items()})
    assert_bit_exact(ckpt.load_params(tmp_path / "kaggle.npz"), params)


def test_loads_bf16_void_arrays_written_by_np_savez(tmp_path):
    params = make_params(ml_dtypes.bfloat16)
    np.savez(tmp_path / "p.bf16.npz", **{f"params/{n}": v.view("V2") for n, v in flat(params).items()})
    loaded = ckpt.load_params(str(tmp_path / "p.bf16.npz"))
    assert flat(loaded)["llm/embedder/input_embedding"].dtype == ml_dtypes.bfloat16
    assert_bit_exact(loaded, params)


@pytest.mark.parametrize("prefix", ["", "params/"])
def test_subtree_selector(tmp_path, monkeypatch, prefix):
    params = make_params()
    np.savez(tmp_path / "p.npz", **{prefix + n: v for n, v in flat(params).items()})
    assert_bit_exact(ckpt.load_params(f"{tmp_path}/p.npz:img"), params["img"])
    assert_bit_exact(ckpt.load_params(f"{tmp_path}/p.npz:llm/layers"), params["llm"]["layers"])
    monkeypatch.chdir(tmp_path)  # A bare relative name works too (big_vision needs `./p.npz:img`).
    assert_bit_exact(ckpt.load_params("p.npz:llm"), params["llm"])
    with pytest.raises(ckpt.CheckpointError, match=r"p\.npz.*no arrays under '.*vit/'.*\['img', 'llm'\]"):
        ckpt.load_params("p.npz:vit")


def test_pickle_bearing_npz_is_refused_with_clear_error(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, **{"img/head/kernel": np.zeros(2), "llm/x": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ckpt.CheckpointError, match=r"evil\.npz.*'llm/x' holds pickled Python objects") as e:
        ckpt.load_params(path)
    assert e.value.__cause__ is None and e.value.__suppress_context__  # No numpy traceback attached.


def test_garbage_truncated_corrupt_missing_and_empty_files_name_the_path(tmp_path):
    good = tmp_path / "good.npz"
    ckpt.save_params(good, make_params())
    data = good.read_bytes()
    cases = {
        "garbage.npz": b"this is not a zip file at all" * 10,
        "truncated.npz": data[: len(data) // 2],
        "empty.npz": b"",
    }
    # Corrupt one byte inside an array's data: the zip CRC check must catch it.
    corrupt = bytearray(data)
    with zipfile.ZipFile(good) as zf:
        info = zf.getinfo("llm/embedder/input_embedding.npy")
    corrupt[info.header_offset + 30 + len(info.filename) + 200] ^= 0xFF
    cases["corrupt.npz"] = bytes(corrupt)
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ckpt.CheckpointError, match=str(tmp_path / name)):
            ckpt.load_params(tmp_path / name)
    with pytest.raises(ckpt.CheckpointError, match=r"missing\.npz' does not exist"):
        ckpt.load_params(tmp_path / "missing.npz")


def test_atomic_save_leaves_no_temp_files_and_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "p.npz"
    ckpt.save_params(path, make_params())
    assert os.listdir(tmp_path) == ["p.npz"]
    before = path.read_bytes()
    bad = make_params(seed=1)
    bad["llm"]["zz_object"] = np.array([{"a": 1}], dtype=object)  # Sorted last: fails after most are written.
    with pytest.raises(ckpt.CheckpointError, match="llm/zz_object"):
        ckpt.save_params(path, bad)
    assert os.listdir(tmp_path) == ["p.npz"]
    assert path.read_bytes() == before


def test_save_into_missing_directory_names_the_path(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match=r"Cannot write checkpoint '.*/nodir/p\.npz'"):
        ckpt.save_params(tmp_path / "nodir" / "p.npz", make_params())


def test_save_accepts_jax_arrays_and_a_leaf_named_file(tmp_path):
    tree = {"file": jnp.arange(3, dtype=jnp.bfloat16), "img": {"head": {"bias": jnp.ones(4)}}}
    ckpt.save_params(tmp_path / "p.npz", tree)
    loaded = ckpt.load_params(tmp_path / "p.npz")
    assert loaded["file"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(loaded["file"], np.arange(3))
    np.testing.assert_array_equal(loaded["img"]["head"]["bias"], np.ones(4))


# ------------------------------------------------------------------------------------------- validation


def test_check_params_lists_every_problem_in_one_error():
    params = make_params()
    expected = abstract(params)
    del params["llm"]["final_norm"]
    del params["img"]["embedding"]["bias"]
    params["llm"]["lm_head"] = np.zeros((8, 50))
    params["img"]["head"]["kernel"] = np.zeros((8, 9))
    with pytest.raises(ckpt.CheckpointMismatchError) as e:
        ckpt.check_params(params, expected, source="'tiny.npz'")
    message = str(e.value)
    assert "tiny.npz" in message and "2 missing, 1 unexpected, 1 with the wrong shape" in message
    assert "llm/final_norm/scale  expected shape (8,)" in message
    assert "img/embedding/bias  expected shape (8,)" in message
    assert "llm/lm_head  found shape (8, 50)" in message
    assert "img/head/kernel  expected shape (8, 8), found shape (8, 9)" in message
    assert e.value.mismatched == [("img/head/kernel", (8, 8), (8, 9))]


def test_check_params_accepts_a_match_with_other_dtypes():
    ckpt.check_params(make_params(np.float16), abstract(make_params()), source="x")


def test_check_params_hints_at_a_selector():
    with pytest.raises(ckpt.CheckpointMismatchError, match="selector"):
        ckpt.check_params(make_params()["img"], abstract(make_params()), source="x")


# ------------------------------------------------------------------------------------------- adaptation


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
def test_posemb_resampled_bilinearly_16_to_64_tokens(dtype, caplog):
    params = make_params(dtype)
    expected = abstract(params)
    expected["img"]["pos_embedding"] = jax.ShapeDtypeStruct((1, 64, 8), dtype)
    with caplog.at_level(logging.INFO):
        out = fit.adapt_params(params, expected)
    old = params["img"]["pos_embedding"]
    by_hand = scipy.ndimage.zoom(old.astype(np.float32).reshape(4, 4, 8), (2, 2, 1), order=1)
    new = out["img"]["pos_embedding"]
    assert new.shape == (1, 64, 8) and new.dtype == dtype
    np.testing.assert_array_equal(new, by_hand.reshape(1, 64, 8).astype(dtype))
    assert "Resampled img/pos_embedding" in caplog.text and "4x4 grid" in caplog.text
    assert "8x8 grid" in caplog.text
    assert out["llm"]["embedder"]["input_embedding"] is params["llm"]["embedder"]["input_embedding"]  # Shared.


def test_vocab_extension_appends_small_random_rows_and_keeps_old_ones(caplog):
    params = make_params()
    expected = abstract(params)
    expected["llm"]["embedder"]["input_embedding"] = jax.ShapeDtypeStruct((80, 8), np.float32)
    with caplog.at_level(logging.INFO):
        out = fit.adapt_params(params, expected, rng_seed=3)
    table = out["llm"]["embedder"]["input_embedding"]
    assert table.shape == (80, 8) and table.dtype == np.float32
    old = params["llm"]["embedder"]["input_embedding"]
    assert table[:50].tobytes() == old.tobytes()
    new_rows = table[50:]
    assert 0.01 < new_rows.std() < 0.03 and abs(new_rows.mean()) < 0.01
    again = fit.adapt_params(params, expected, rng_seed=3)["llm"]["embedder"]["input_embedding"]
    assert again.tobytes() == table.tobytes()  # Deterministic for a seed.
    assert "from 50 to 80 rows" in caplog.text


def test_vocab_larger_than_model_is_cut_only_when_the_extra_rows_are_zero():
    params = make_params()
    expected = abstract(params)
    expected["llm"]["embedder"]["input_embedding"] = jax.ShapeDtypeStruct((40, 8), np.float32)
    with pytest.raises(ValueError, match=r"rows 40\.\.49 hold trained values; set model\.llm\.vocab_size=50"):
        fit.adapt_params(params, expected)
    params["llm"]["embedder"]["input_embedding"][40:] = 0  # Padding rows, as an export pads.
    out = fit.adapt_params(params, expected)
    ckpt.check_params(out, expected, source="x")
    np.testing.assert_array_equal(
        out["llm"]["embedder"]["input_embedding"], params["llm"]["embedder"]["input_embedding"][:40]
    )


def _unscanned_shapes():
    shapes = {}
    for name, shape in SHAPES.items():
        for stacked, fmt in (
            ("img/Transformer/encoderblock/", "img/Transformer/encoderblock_{i}/"),
            ("llm/layers/", "llm/layers/{i}/"),
        ):
            if name.startswith(stacked):
                for i in range(shape[0]):
                    shapes[fmt.format(i=i) + name[len(stacked) :]] = shape[1:]
                break
        else:
            shapes[name] = shape
    return shapes


def test_scan_to_per_layer_and_back_round_trip(caplog):
    scanned = make_params()
    per_layer_expected = abstract(make_params(shapes=_unscanned_shapes()))
    with caplog.at_level(logging.INFO):
        per_layer = fit.adapt_params(scanned, per_layer_expected)
    ckpt.check_params(per_layer, per_layer_expected, source="x")
    f = flat(per_layer)
    assert "img/Transformer/encoderblock_1/LayerNorm_0/scale" in f and "llm/layers/0/attn/kv_einsum/w" in f
    np.testing.assert_array_equal(
        f["llm/layers/1/mlp/gating_einsum"], scanned["llm"]["layers"]["mlp"]["gating_einsum"][1]
    )
    assert "scan layout (depth 2) to per-layer" in caplog.text
    back = fit.adapt_params(per_layer, abstract(scanned))
    assert_bit_exact(back, scanned)


def test_scan_conversion_also_works_on_a_selected_tower():
    scanned = make_params()
    expected = abstract(make_params(shapes=_unscanned_shapes()))["img"]
    out = fit.adapt_params(scanned["img"], expected)
    ckpt.check_params(out, expected, source="x")


def test_stacking_with_a_missing_layer_names_the_parameter():
    per_layer = make_params(shapes=_unscanned_shapes())
    del per_layer["llm"]["layers"]["0"]["mlp"]
    with pytest.raises(ckpt.CheckpointError, match=r"llm/layers/mlp/gating_einsum.*\[1\]"):
        fit.adapt_params(per_layer, abstract(make_params()))


def test_gating_einsum_transposed_from_2_f_d_to_2_d_f(caplog):
    params = make_params()
    expected = abstract(params)
    gating = params["llm"]["layers"]["mlp"]["gating_einsum"]
    params["llm"]["layers"]["mlp"]["gating_einsum"] = np.ascontiguousarray(np.swapaxes(gating, -1, -2))
    assert params["llm"]["layers"]["mlp"]["gating_einsum"].shape == (2, 2, 16, 8)
    with caplog.at_level(logging.INFO):
        out = fit.adapt_params(params, expected)
    np.testing.assert_array_equal(out["llm"]["layers"]["mlp"]["gating_einsum"], gating)
    assert "Transposed llm/layers/mlp/gating_einsum" in caplog.text


def test_fit_plan_reads_adapts_and_lists_problems_from_headers(tmp_path):
    model = make_params()
    expected = abstract(model)
    expected["img"]["pos_embedding"] = jax.ShapeDtypeStruct((1, 64, 8), np.float32)
    expected["llm"]["embedder"]["input_embedding"] = jax.ShapeDtypeStruct((60, 8), np.float32)
    stored = make_params(ml_dtypes.bfloat16)
    np.savez(tmp_path / "pt.bf16.npz", **{f"params/{n}": v.view("V2") for n, v in flat(stored).items()})
    with ckpt.NpzReader(tmp_path / "pt.bf16.npz") as reader:
        plan = fit.plan_fit(reader, expected)
        out = {n: plan.read(n) for n in plan.loaded}
    assert {n: v.shape for n, v in out.items()} == {n: v.shape for n, v in flat(expected).items()}
    assert all(v.dtype == ml_dtypes.bfloat16 for v in out.values())  # No cast when reading.
    assert plan.loaded["img/pos_embedding"] is not None and plan.loaded["llm/final_norm/scale"] is None
    np.testing.assert_array_equal(out["llm/final_norm/scale"], stored["llm"]["final_norm"]["scale"])
    bad = abstract(model)
    bad["llm"]["final_norm"]["scale"] = jax.ShapeDtypeStruct((9,), np.float32)
    with ckpt.NpzReader(tmp_path / "pt.bf16.npz") as reader:
        with pytest.raises(ckpt.CheckpointMismatchError, match=r"(?s)pt\.bf16\.npz.*wrong shape.*llm/final_norm/scale"):
            fit.plan_fit(reader, bad)


def test_fit_plan_initialises_missing_and_dont_load_but_refuses_unexpected(tmp_path, caplog):
    model = abstract(make_params())
    model["llm"]["adapter"] = {"w": jax.ShapeDtypeStruct((8, 2), np.float32)}  # New in the model.
    stored = make_params()
    ckpt.save_params(tmp_path / "p.npz", stored)
    with ckpt.NpzReader(tmp_path / "p.npz") as reader, caplog.at_level(logging.INFO):
        plan = fit.plan_fit(reader, model, dont_load=[r"img/head/.*"])
        plan.log()
    assert plan.missing == ["llm/adapter/w"] and plan.not_loaded == ["img/head/kernel"]
    assert plan.initialised == ["img/head/kernel", "llm/adapter/w"] and "img/head/kernel" not in plan.loaded
    assert "Initialising 1 parameter(s) the checkpoint" in caplog.text and "llm/adapter/w" in caplog.text
    with ckpt.NpzReader(tmp_path / "p.npz") as reader:  # Inference: nothing may be left uninitialised.
        with pytest.raises(ckpt.CheckpointMismatchError, match=r"(?s)1 missing.*llm/adapter/w"):
            fit.plan_fit(reader, model, allow_missing=False)
    smaller = abstract(make_params())
    del smaller["llm"]["final_norm"]
    with ckpt.NpzReader(tmp_path / "p.npz") as reader:
        with pytest.raises(ckpt.CheckpointMismatchError, match=r"(?s)1 unexpected.*llm/final_norm/scale"):
            fit.plan_fit(reader, smaller)
        assert fit.plan_fit(reader, smaller, dont_load=["llm/final_norm/.*"]).skipped == ["llm/final_norm/scale"]
    with ckpt.NpzReader(f"{tmp_path}/p.npz:img", keep_selector=True) as reader:  # Only the ViT: LLM initialised.
        plan = fit.plan_fit(reader, abstract(make_params()))
    assert set(plan.loaded) == {n for n in SHAPES if n.startswith("img/")}
    assert set(plan.missing) == {n for n in SHAPES if n.startswith("llm/")}


# ------------------------------------------------------------------------------------------- placement


def _fsdp_sharding(mesh, shape):
    """Shards the largest axis divisible by the mesh size, replicates otherwise (an fsdp-like tactic)."""
    spec = [None] * len(shape)
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % mesh.size == 0:
            spec[axis] = "data"
            break
    return NamedSharding(mesh, P(*spec))


def test_place_params_on_8_devices_with_fsdp_spec_and_dtype_change():
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",))
    params = make_params()
    reference = jax.tree.map(lambda a: a.copy(), params)
    shardings = jax.tree.map(lambda a: _fsdp_sharding(mesh, a.shape), params)
    dtypes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), params)
    dtypes["img"]["pos_embedding"] = None  # Keep f32.
    placed = placement.place_params(params, shardings, dtypes)
    assert params == {}  # Consumed: the host tree no longer holds the arrays.
    for name, x in flat(placed).items():
        ref = flat(reference)[name]
        assert isinstance(x, jax.Array)
        want_dtype = np.float32 if name == "img/pos_embedding" else jnp.bfloat16
        assert x.dtype == want_dtype, name
        assert x.sharding.is_equivalent_to(flat(shardings)[name], x.ndim), name
        np.testing.assert_array_equal(np.asarray(x), ref.astype(want_dtype))
    kv = placed["llm"]["layers"]["attn"]["kv_einsum"]["w"]
    assert kv.sharding.spec == P(None, None, None, "data", None)
    assert {s.data.shape for s in kv.addressable_shards} == {(2, 2, 1, 1, 4)}


def test_place_params_single_sharding_callable_dtypes_and_keep_input():
    mesh = jax.make_mesh((8,), ("data",))
    params = make_params(ml_dtypes.bfloat16)
    replicated = NamedSharding(mesh, P())
    placed = placement.place_params(
        params, replicated, lambda n: jnp.float32 if n.startswith("img/") else None, consume=False
    )
    assert flat(params).keys() == flat(placed).keys()  # Input left intact.
    assert placed["img"]["head"]["kernel"].dtype == jnp.float32
    assert placed["llm"]["final_norm"]["scale"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(placed["img"]["head"]["kernel"]), params["img"]["head"]["kernel"].astype(np.float32)
    )


def test_place_params_missing_sharding_fails_before_moving_anything():
    mesh = jax.make_mesh((8,), ("data",))
    params = make_params()
    shardings = jax.tree.map(lambda a: NamedSharding(mesh, P()), params)
    del shardings["llm"]["final_norm"]
    with pytest.raises(ValueError, match="llm/final_norm/scale"):
        placement.place_params(params, shardings)
    assert flat(params).keys() == set(SHAPES)  # Nothing consumed.


def test_place_params_indivisible_sharding_names_parameter():
    mesh = jax.make_mesh((8,), ("data",))
    params = {"img": {"embedding": {"bias": np.zeros(6, np.float32)}}}
    with pytest.raises(ValueError, match="img/embedding/bias"):
        placement.place_params(params, NamedSharding(mesh, P("data")))


# ------------------------------------------------------------------------------------- with the real model


def test_real_tiny_model_scan_checkpoint_fits_per_layer_model_at_twice_the_resolution(tmp_path):
    from paligemma_ft.model import Model, get_preset

    def abstract_params(scan, res):
        cfg, _ = get_preset("tiny_pg1")
        cfg["img"]["scan"] = cfg["llm"]["scan"] = scan
        args = (jnp.zeros((1, res, res, 3)), jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4), jnp.int32))
        return jax.eval_shape(Model(**cfg).init, jax.random.PRNGKey(0), *args)["params"]

    _, res = get_preset("tiny_pg1")
    stored = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), abstract_params(True, res))
    ckpt.save_params(tmp_path / "tiny.npz", stored)
    expected = abstract_params(False, 2 * res)
    with ckpt.NpzReader(tmp_path / "tiny.npz") as reader:
        plan = fit.plan_fit(reader, expected, allow_missing=False)  # Raises on any name/shape problem.
        posemb = plan.read("img/pos_embedding")
    assert posemb.shape[1] == 4 * flat(stored)["img/pos_embedding"].shape[1]
    assert set(plan.loaded) == set(flat(expected))


# ---------------------------------------------------------------------------------------- hostile files


def _zip_bomb(path, n_floats=64 * 2**20):
    """A deflated member whose `.npy` header declares n float32 (256 MiB of zeros): about 1 MB on disk."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, array in flat(make_params()).items():
            if name != "llm/final_norm/scale":
                with zf.open(name + ".npy", "w") as f:
                    np.lib.format.write_array(f, array)
        with zf.open("llm/final_norm/scale.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n_floats,)})
            zeros = bytes(1 << 24)
            for _ in range(n_floats * 4 // len(zeros)):
                f.write(zeros)


def test_zip_bomb_is_refused_from_its_headers_in_under_a_second(tmp_path):
    import time
    import tracemalloc

    _zip_bomb(tmp_path / "bomb.npz")
    assert os.path.getsize(tmp_path / "bomb.npz") < 2e6
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(
        ckpt.CheckpointMismatchError, match=r"llm/final_norm/scale  expected shape \(8,\), found shape \(67108864,\)"
    ):
        with ckpt.NpzReader(tmp_path / "bomb.npz") as reader:
            fit.plan_fit(reader, abstract(make_params()))
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 1.0
    assert peak < 20e6  # The 256 MiB member was never inflated.


def test_member_whose_zip_size_disagrees_with_its_header_is_refused(tmp_path):
    path = tmp_path / "forged.npz"
    with zipfile.ZipFile(path, "w") as zf:
        with zf.open("img/head/bias.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (4,)})
            f.write(bytes(1000))  # 1000 bytes of data where the header promises 16.
    with pytest.raises(ckpt.CheckpointError, match=r"forged\.npz.*'img/head/bias' declares 1\d\d\d bytes"):
        ckpt.NpzReader(path)


def test_reader_gives_shapes_without_reading_and_slices_stacked_arrays(tmp_path):
    params = make_params(ml_dtypes.bfloat16)
    ckpt.save_params(tmp_path / "p.npz", params)
    specs = ckpt.read_specs(tmp_path / "p.npz")
    assert {n: s.shape for n, s in specs.items()} == SHAPES
    assert specs["llm/layers/mlp/gating_einsum"].dtype == ml_dtypes.bfloat16
    with ckpt.NpzReader(tmp_path / "p.npz") as reader:
        layer = reader.read("llm/layers/mlp/gating_einsum", 1)  # Read straight from its offset in the file.
    assert layer.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(layer, params["llm"]["layers"]["mlp"]["gating_einsum"][1])
    np.savez_compressed(tmp_path / "c.npz", **{n: v for n, v in flat(make_params()).items()})  # Deflated members.
    with ckpt.NpzReader(tmp_path / "c.npz") as reader:
        np.testing.assert_array_equal(reader.read("img/head/kernel"), make_params()["img"]["head"]["kernel"])
        np.testing.assert_array_equal(
            reader.read("llm/layers/attn/kv_einsum/w", 0), make_params()["llm"]["layers"]["attn"]["kv_einsum"]["w"][0]
        )
