"""Multi-process correctness that one process can check: the data order does not depend on the process count,
checkpoint data states are checked on restore, the JAX_* launch variables reach `jax.distributed.initialize`,
and the global-batch paths (padding, this process's rows, gathered evaluation results) give what the local
paths give. tests/test_multiprocess_run.py runs the real thing over two processes.
"""

import json
import logging

import jax
import numpy as np
import pytest
from PIL import Image

from paligemma_ft import multihost, sharding
from paligemma_ft.checkpoints import state as train_state
from paligemma_ft.data import pipeline
from paligemma_ft.evaluate import evaluators
from paligemma_ft.predictor import load_predictor
from paligemma_ft.tokenizer import Tokenizer

RES, TEXT_LEN = 32, 24


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_spec("builtin:tiny")


def input_cfg(data, **kw):
    return {"data": data, "res": RES, "text_len": TEXT_LEN, "batch_size": 8, "num_workers": 2, **kw}


def shapes_data(n):
    return {"source": "shapes", "n": n, "image_size": 32}


def with_bad_examples(tmp_path, n=10, bad=(2, 5, 6)):
    """A jsonl of `n` examples whose lines in `bad` (1-based) name missing images."""
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "good.jpg")
    lines = [
        json.dumps({"image": "missing.jpg" if k + 1 in bad else "good.jpg", "suffix": f"a red circle {k}"})
        for k in range(n)
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return {"source": "jsonl", "path": str(path)}


def merged(cfg, tok, processes, batches, state=None):
    """The global batches as `processes` processes read them: each batch is the processes' rows in order."""
    its = [pipeline.make_train_iter(cfg, tok, process_index=p, process_count=processes) for p in range(processes)]
    if state is not None:
        for it in its:
            it.set_state(state)
    out = []
    for _ in range(batches):
        parts = [next(it) for it in its]
        out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    return out


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for key in w:
            np.testing.assert_array_equal(g[key], w[key])


@pytest.mark.parametrize("bad", [False, True])
def test_global_batches_do_not_depend_on_the_process_count(tok, tmp_path, bad):
    data = with_bad_examples(tmp_path) if bad else shapes_data(12)
    cfg = input_cfg(data)
    one = merged(cfg, tok, 1, 4)  # 32 rows: past the end of the first epochs (12 or 10 examples).
    for processes in (2, 4, 8):
        assert_same_batches(merged(cfg, tok, processes, 4), one)
    if bad:  # Every missing image (lines 2, 5, 6) was replaced by a good example.
        texts = {tok.decode(row) for b in one for row, m in zip(b["text"].tolist(), b["mask_loss"]) if m.any()}
        numbers = {int(t.split("a red circle ")[1].split()[0]) for t in texts}
        assert numbers == {0, 2, 3, 6, 7, 8, 9}


def test_resume_with_another_process_count(tok):
    cfg = input_cfg(shapes_data(12))
    one = pipeline.make_train_iter(cfg, tok, process_index=0, process_count=1)
    first = [next(one) for _ in range(3)]
    state = json.loads(json.dumps(one.get_state()))
    assert state["batches"] == 3
    assert_same_batches(first + merged(cfg, tok, 2, 3, state), merged(cfg, tok, 1, 6))


@pytest.mark.parametrize("processes", [2, 4])
def test_eval_batches_do_not_depend_on_the_process_count(tok, processes):
    data = shapes_data(13)
    cfg = input_cfg(data)

    def batches(p, pc):
        return list(pipeline.make_eval_batches(data, cfg, tok, 8, process_index=p, process_count=pc))

    one = batches(0, 1)
    parts = [batches(p, processes) for p in range(processes)]
    assert [len(p) for p in parts] == [len(one)] * processes == [2] * processes
    for k, want in enumerate(one):
        real = want["_mask"]  # Padding rows are copies of whatever example is at hand: only their mask counts.
        np.testing.assert_array_equal(np.concatenate([p[k]["_mask"] for p in parts]), real)
        for key in ("image", "text"):
            np.testing.assert_array_equal(np.concatenate([p[k][key] for p in parts])[real], want[key][real])
        ids = [m.get("id") for p in parts for m in p[k]["_meta"]]
        assert [i for i, r in zip(ids, real) if r] == [m["id"] for m, r in zip(want["_meta"], real) if r]
    assert np.concatenate([b["_mask"] for b in one]).sum() == 13


def test_check_state_tells_damage_from_another_config(tok):
    it = pipeline.make_train_iter(input_cfg(shapes_data(12)), tok, process_index=0, process_count=1)
    good = it.get_state()
    assert it.check_state(good) == 0
    damaged = [
        [],
        {**good, "version": 7},
        {**good, "batches": -1},
        {**good, "batches": "3"},
        {**good, "fingerprint": {"batch_size": 8}},
    ]
    for state in damaged:
        with pytest.raises(ValueError) as info:
            it.check_state(state)
        assert not isinstance(info.value, pipeline.DataStateMismatch), state
    other = {**good, "fingerprint": {**good["fingerprint"], "shuffle_seed": 3}}
    with pytest.raises(pipeline.DataStateMismatch, match=r"shuffle_seed \(saved 3, now 0\)"):
        it.check_state(other)
    with pytest.raises(pipeline.DataStateMismatch, match="earlier paligemma_ft"):
        it.check_state({"grain": {}, "fingerprint": {}})


# --- Checkpoint data states ------------------------------------------------------------------------------------


@pytest.fixture()
def ckpt(tmp_path, tok):
    """(directory, abstract state, shardings, iterator, save(step, data_state)) for a tiny replicated state."""
    state = {"w": jax.numpy.arange(16.0).reshape(4, 4), "step": jax.numpy.int32(0)}
    abstract = jax.eval_shape(lambda: state)
    shard = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
    it = pipeline.make_train_iter(input_cfg(shapes_data(12)), tok, process_index=0, process_count=1)

    def save(step, data_state):
        manager = train_state.make_manager(tmp_path)
        train_state.save(manager, step, {**state, "step": jax.numpy.int32(step)}, data_state)
        manager.close()

    return tmp_path, abstract, shard, it, save


def edit_data(step_dir, edit):
    path = step_dir / "data" / "metadata"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def restore(ckpt):
    directory, abstract, shard, it, _ = ckpt
    return train_state.restore_latest(train_state.make_manager(directory), abstract, shard, check_data=it.check_states)


def test_every_process_state_is_saved_and_own_entry_restored(ckpt):
    directory, _, _, it, save = ckpt
    next(it)
    save(1, it.get_state())
    saved = json.loads((directory / "1" / "data" / "metadata").read_text())
    assert saved[train_state.PROCESSES_KEY] == [it.get_state()]  # One entry per process (one here).
    state, data = restore(ckpt)
    assert int(state["step"]) == 1 and data == it.get_state()


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: {**d, "processes": [{**d["processes"][0], "batches": -4}]},  # Valid JSON, wrong value.
        lambda d: {**d, "processes": [{"version": 2}]},
        lambda d: {**d, "processes": []},
        lambda d: {**d, "processes": {"0": d["processes"][0]}},
        lambda d: {**d, "processes": [d["processes"][0], {**d["processes"][0], "batches": 9}]},  # Out of step.
        lambda d: {**d, "extra": 1},
        lambda d: [d],
    ],
)
def test_a_bad_data_state_falls_back_to_the_previous_checkpoint(ckpt, caplog, edit):
    directory, _, _, it, save = ckpt
    save(1, it.get_state())
    next(it)
    save(2, it.get_state())
    edit_data(directory / "2", edit)
    with caplog.at_level(logging.WARNING, logger="paligemma_ft.checkpoints.state"):
        state, data = restore(ckpt)
    assert int(state["step"]) == 1 and data["batches"] == 0
    assert "Checkpoint step 2 in" in caplog.text and (directory / "2.damaged").is_dir()


def test_a_data_state_of_another_config_is_refused_and_left_alone(ckpt):
    directory, _, _, it, save = ckpt
    save(1, it.get_state())
    edit_data(
        directory / "1",
        lambda d: {
            **d,
            "processes": [{**d["processes"][0], "fingerprint": {**it.get_state()["fingerprint"], "batch_size": 4}}],
        },
    )
    with pytest.raises(train_state.CheckpointMismatchError, match=r"batch_size \(saved 4, now 8\)"):
        restore(ckpt)
    assert sorted(p.name for p in directory.iterdir()) == ["1"]


def test_another_process_count_resumes_from_equal_states(ckpt):
    directory, _, _, it, save = ckpt
    next(it)
    save(1, it.get_state())
    edit_data(directory / "1", lambda d: {**d, "processes": d["processes"] * 2})  # As 2 processes save it.
    assert restore(ckpt)[1] == it.get_state()


def test_a_checkpoint_without_checksums_is_restored_with_a_warning(ckpt, caplog):
    directory, _, _, it, save = ckpt
    save(1, it.get_state())
    edit_data(directory / "1", lambda d: {k: v for k, v in d.items() if k != train_state.CHECKSUM_KEY})
    with caplog.at_level(logging.WARNING, logger="paligemma_ft.checkpoints.state"):
        state, _ = restore(ckpt)
    assert int(state["step"]) == 1
    assert "has no checksums" in caplog.text and "without an integrity check" in caplog.text


# --- Launch ----------------------------------------------------------------------------------------------------


def test_launch_variables_reach_initialize(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **k: calls.append(k))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(sharding, "_no_cached_cpu_collectives", lambda: calls.append("cache checked"))
    for var in ("SLURM_NTASKS", "SLURM_JOB_ID", "BV_JAX_INIT", "TPU_WORKER_HOSTNAMES", "JAX_LOCAL_DEVICE_IDS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert sharding.maybe_initialize_distributed({}) is True
    assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}, "cache checked"]
    group = {"enabled": None, "process_id": 1, "local_device_ids": [0, 1]}  # Config keys win over variables.
    assert sharding.maybe_initialize_distributed({"distributed": group}) is True
    assert calls[-2] == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 4,
        "process_id": 1,
        "local_device_ids": [0, 1],
    }
    monkeypatch.setenv("JAX_PROCESS_ID", "first")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='first' must be an integer"):
        sharding.maybe_initialize_distributed({})
    monkeypatch.setenv("JAX_PROCESS_ID", "4")
    with pytest.raises(ValueError, match="process id 4 is outside"):
        sharding.maybe_initialize_distributed({})


@pytest.mark.parametrize("version, cache_after", [("0.10.2", True), ("0.12.1", False), ("0.13.0.dev1", False)])
def test_multi_process_cpu_runs_on_new_jax_leave_the_compilation_cache(monkeypatch, caplog, version, cache_after):
    monkeypatch.setattr(jax, "__version__", version)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    before = jax.config.jax_enable_compilation_cache
    try:
        jax.config.update("jax_enable_compilation_cache", True)
        with caplog.at_level(logging.WARNING):
            sharding._no_cached_cpu_collectives()
        assert jax.config.jax_enable_compilation_cache is cache_after
        warned = [r.getMessage() for r in caplog.records if "compilation cache is off" in r.getMessage()]
        assert len(warned) == (0 if cache_after else 1)
        assert not warned or f"jax {version} on CPU with 2 processes" in warned[0]
    finally:
        jax.config.update("jax_enable_compilation_cache", before)


def test_an_incomplete_launch_names_the_variables(monkeypatch):
    def initialize(**kwargs):
        raise ValueError("Number of processes must be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    for var in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    with pytest.raises(ValueError, match=r"Number of processes must be defined\. Set .*JAX_NUM_PROCESSES"):
        sharding.maybe_initialize_distributed({})


# --- Global batches and gathered results -----------------------------------------------------------------------


def test_allgather_json_and_to_host_on_one_process():
    assert multihost.allgather_json({"a": [1, "x"]}) == [{"a": [1, "x"]}]
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    x = jax.device_put(
        np.arange(16.0).reshape(8, 2), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    )
    np.testing.assert_array_equal(multihost.to_host({"x": x})["x"], np.arange(16.0).reshape(8, 2))


@pytest.mark.slow  # fast: the other multihost tests
def test_global_decode_pads_and_returns_this_process_rows(monkeypatch):
    """The path a multi-process evaluation takes (a global batch over the params' mesh, padded to the devices,
    outputs cut back to this process's rows) decodes what the local path decodes."""
    predictor = load_predictor("builtin:demo", max_decode_len=6)
    images = [np.full((64, 64, 3), c, np.uint8) for c in (0, 90, 250)]
    batch = predictor.prompt_batch(images, "caption en")
    local = predictor.generate(batch)
    local_losses = predictor.losses(_train_batch(predictor, batch))
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    predictor.params = jax.device_put(predictor.params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    monkeypatch.setattr(multihost, "spans_processes", lambda tree: True)
    assert predictor.generate(batch) == local  # 3 rows padded to the 8 devices, then cut back to 3.
    np.testing.assert_allclose(predictor.losses(_train_batch(predictor, batch)), local_losses, rtol=1e-5)


def _train_batch(predictor, batch):
    text = np.concatenate([batch["text"], np.ones_like(batch["text"][:, :1])], axis=1)
    mask = np.concatenate([batch["mask_input"], np.ones_like(batch["mask_input"][:, :1])], axis=1)
    return {"image": batch["image"], "text": text, "mask_ar": 1 - mask, "mask_loss": 1 - mask}


def test_evaluation_results_are_gathered_in_split_order(monkeypatch):
    """Process 0's view of a 2-process evaluation: the other process's examples (from `allgather_json`) join its
    own, by batch then process then row, and a repeated id across processes is still an error."""

    def example(i):
        return evaluators._Example(f"id{i}", None, "caption en", [f"ref {i}"], f"out {i}")

    mine = [(0, 0, example(0)), (0, 1, example(1)), (1, 0, example(4))]
    theirs = [(0, 0, example(2)), (0, 1, example(3))]
    monkeypatch.setattr(jax, "process_count", lambda: 2)

    def allgather(value):
        other = [(b, i, {**vars(ex)}) for b, i, ex in theirs]
        return [json.loads(json.dumps(value)), json.loads(json.dumps(other))]

    monkeypatch.setattr(multihost, "allgather_json", allgather)
    gathered = evaluators._gather(mine)
    assert [ex.id for _, _, ex in gathered] == [f"id{i}" for i in range(5)]
    assert gathered[2][2] == example(2)
    theirs = [(0, 0, example(1))]
    evaluator = evaluators.make_evaluator("val", {"type": "vqa"})

    class Predictor:
        def generate(self, batch):
            return ["x"] * len(batch["_mask"])

    meta = [{"id": "id0", "prefix": "q", "references": ["x"]}, {"id": "id1", "prefix": "q", "references": ["x"]}]
    with pytest.raises(ValueError, match=r"batch 0, row 0: id 'id1' was already scored"):
        evaluator._collect(Predictor(), [{"_mask": np.ones(2, bool), "_meta": meta}])
