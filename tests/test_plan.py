"""`paligemma-ft plan`: the trainer's step compiled for abstract inputs; numbers consistent with the model."""

import json
import math
import re
import resource

import jax
import pytest

from paligemma_ft.commands import cli, plan
from paligemma_ft.config import load_config
from paligemma_ft.model import get_preset

DEMO = "configs/demo.py"


def _mib(text: str, row: str) -> float:
    """The value of a per-device row (`  parameters   3.97 MiB`) in MiB."""
    value, unit = re.search(rf"^  {row}\s+([\d.]+) (MiB|GiB)", text, re.M).groups()
    return float(value) * (1024 if unit == "GiB" else 1)


# The shipped demo model (presets "demo": 64 px, 8 px patches), counted by hand.
# ViT, width 96, 3 blocks, MLP 192: patch embedding 8·8·3·96 + 96 = 18,528; position embedding 64·96 = 6,144; per
# block two LayerNorms 2·192, q/k/v/out 4·(96·96 + 96), MLP 96·192 + 192 + 192·96 + 96: 74,784, x3 = 224,352;
# encoder norm 192; head into the LLM width 96·128 + 128 = 12,416. Total 261,632.
# LLM, width 128, 3 layers, 4 heads sharing 1 kv head of dim 32, MLP 384, vocabulary 1,664: embedding 1,664·128 =
# 212,992; per layer q 4·128·32, kv 2·128·32, attn_vec 4·32·128, gating 2·128·384, linear 384·128, two norms 2·128:
# 188,672, x3 = 566,016; final norm 128. Total 779,136.
DEMO_PARAMS = 261_632 + 779_136
PG2_3B_224_PARAMS = 3_032_094_960  # big_vision's PaliGemma 2 3B at 224 px (reference 3.3).


def test_demo_plan_from_the_command_line(tmp_path, capsys, traced_train_flops):
    assert cli.main(["plan", "--config", DEMO, "--memory-gib", "1", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    n_params = int(re.search(r"Parameters: ([\d,]+) \(([\d,]+) trainable\)", out).group(1).replace(",", ""))
    assert n_params == DEMO_PARAMS
    # Replicated float32 parameters; Adam keeps two float32 moments per trainable parameter.
    assert _mib(out, "parameters") == pytest.approx(n_params * 4 / 2**20, abs=0.006)
    assert _mib(out, "optimizer state") == pytest.approx(2 * n_params * 4 / 2**20, abs=0.01)
    assert "XLA memory analysis" in out and "fits with 10 % headroom: yes" in out
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["params"] == n_params and saved["fits"] is True
    assert saved["peak_bytes"] >= saved["param_bytes"] + saved["opt_bytes"] + saved["temp_bytes"]
    # Full fine-tuning (the demo trains every parameter), loss on all L = 48 text positions: what the traced
    # gradient multiplies.
    cfg, res = get_preset("demo")
    assert saved["text_len"] == 48
    assert saved["flops_per_example"] == traced_train_flops(cfg, res, 48, 48, True)


def test_fsdp_mesh_divides_the_state_and_a_small_device_gets_suggestions():
    assert jax.device_count() == 8
    config = load_config(
        DEMO,
        [
            "--config.model_init=",
            "--config.model_name_or_preset=tiny_pg1",
            "--config.input.res=32",
            "--config.mesh=[('data', 2), ('fsdp', 4)]",
            "--config.sharding_strategy=[('.*', 'fsdp(axis=\"fsdp\", min_size_mb=0)')]",
        ],
    )
    p = plan.make_plan(config, memory_gib=1e-5)
    assert p.mesh == {"data": 2, "fsdp": 4} and p.per_device_batch == 2  # Batch over data x fsdp.
    total = p.params * 4
    # Most leaves split 4 ways (a few, e.g. odd-sized ones, stay whole): between a quarter and a third.
    assert total / 4 <= p.param_bytes <= total / 3
    assert total * 2 / 4 <= p.opt_bytes <= total * 2 / 3
    assert p.peak_bytes >= p.param_bytes + p.opt_bytes and p.fits is False
    text = plan.format_plan(p)
    assert "fits with 10 % headroom: NO" in text and "To fit:" in text and p.suggestions
    # 10 KiB holds not even the parameters: more sharding and fewer trainable parameters are what can help.
    assert any(s.startswith("Sharding:") for s in p.suggestions), p.suggestions
    assert any(s.startswith("Trainable set:") for s in p.suggestions)


def test_suggestions_follow_the_numbers(fake_plan):
    # State 12 GiB + gradients 2 x 4 GiB + activations (38 - 8 = 30 GiB) / M must fit 0.9 x 40 = 36 GiB: M = 2.
    p = fake_plan(temp_bytes=38 * plan.GiB)
    assert p.fits is False and "--config.grad_accum_steps=2" in plan.suggest(p)[0]
    # Already 2 micro-batches (of 4 examples): halving them again means 4 in all.
    assert "--config.grad_accum_steps=4" in plan.suggest(fake_plan(micro_batches=2, temp_bytes=38 * plan.GiB))[0]
    # Without remat the first cure is remat; a frozen majority gets no trainable-set advice.
    advice = plan.suggest(fake_plan(remat={"img": "full", "llm": "none"}, trainable=100, temp_bytes=400 * plan.GiB))
    assert any("remat_policy=full" in s for s in advice) and not any("Trainable" in s for s in advice)
    # Fits comfortably: nothing to say; unknown memory: say how to give it.
    assert plan.suggest(fake_plan(peak_bytes=10 * plan.GiB)) == []
    assert "--memory-gib" in plan.suggest(fake_plan(memory_limit=None))[0]


def test_3b_plan_uses_abstract_shapes_only(traced_train_flops):
    """PaliGemma 2 3B at batch 8 (12 GB of float32 parameters) is planned without allocating it. Arithmetic
    mode here: compiling the 3B step on a 2-core CPU takes about as long as the rest of this file."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux.
    config = load_config(
        DEMO,
        [
            "--config.model_init=",
            "--config.model_name_or_preset=pg2_3b_224",
            "--config.input.res=224",
            "--config.input.batch_size=8",
            "--config.input.text_len=32",
        ],
    )
    # No tokenizer is loaded (a plan needs shapes only), so the demo's tiny one raises no vocabulary warning.
    p = plan.make_plan(config, device="NVIDIA H100 80GB HBM3", arithmetic_only=True)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 2 * 2**20  # < 2 GiB more.
    assert p.params == p.trainable == PG2_3B_224_PARAMS
    # 8 devices (conftest), parameters replicated by the demo's rule: the full 12 GB on each, Adam twice that.
    assert p.param_bytes == PG2_3B_224_PARAMS * 4 and p.opt_bytes >= 2 * p.param_bytes
    assert p.source.startswith("arithmetic") and p.compile_seconds is None
    assert p.memory_limit == 80e9 and p.fits is True  # An H100's 80 GB; 1 example per device fits.
    cfg, res = get_preset("pg2_3b_224")
    assert math.isclose(p.flops_per_example, traced_train_flops(cfg, res, 32, 32, True))
