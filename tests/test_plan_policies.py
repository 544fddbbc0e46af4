"""`paligemma-ft plan --policies`: peak and largest batch per remat policy; the compute dtype of the target."""

import re

import pytest

from paligemma_ft.commands import cli, plan
from paligemma_ft.config import load_config

DEMO = "configs/demo.py"
TINY = ["--config.model_init=", "--config.model_name_or_preset=tiny_pg1", "--config.input.res=32"]
# Activations large enough next to the weights for the compute dtype to show.
TINY_BATCH = [*TINY, "--config.input.batch_size=64", "--config.input.text_len=48"]


def test_largest_batch_is_linear_in_the_activations(fake_plan):
    # Budget 0.9 x 40 = 36 GiB; the step peaks at 30 GiB with 8 examples per device and each further example per
    # device adds 1.5 GiB: 4 more fit, 12 per device on 4 data shards.
    assert plan.largest_batch(fake_plan(), 30 * plan.GiB, 1.5 * plan.GiB) == 48
    # 3 micro-batches of 3: each step adds one example to every micro-batch, 3 per device (9 + 4 x 3).
    micro = fake_plan(micro_batches=3, per_device_batch=9, batch_size=36)
    assert plan.largest_batch(micro, 30 * plan.GiB, 1.5 * plan.GiB) == 4 * 21
    assert plan.largest_batch(fake_plan(), 40 * plan.GiB, 1.5 * plan.GiB) == 4 * 5  # Does not fit: 3 fewer per device.
    assert plan.largest_batch(fake_plan(), 90 * plan.GiB, 1.5 * plan.GiB) == 0
    assert plan.largest_batch(fake_plan(memory_limit=None), 30 * plan.GiB, 1.5 * plan.GiB) is None


def test_cli_lists_every_policy_with_its_peak_and_batch(capsys):
    argv = ["plan", "--config", DEMO, *TINY, "--memory-gib", "0.02", "--arithmetic-only", "--policies"]
    cli.main(argv)
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^(none|dots|dots_with_no_batch_dims_saveable|full)\s+([\d.]+ MiB)\s", out, re.M))
    assert list(rows) == ["none", "dots", "dots_with_no_batch_dims_saveable", "full"], out
    peaks = [float(v.split()[0]) for v in rows.values()]
    assert peaks == sorted(peaks, reverse=True)  # Less kept from none to full.
    assert "compute float32 (auto for cpu)" in out


def _one_device_config(**extra):
    config = load_config(DEMO, TINY_BATCH)
    with config.unlocked():
        config.num_devices = 1  # 64 examples on the device: activations outweigh the weights' copies.
        config.update(extra)  # compute_dtype: declared by config_base; set directly until then.
    return config


@pytest.mark.slow  # ~50 s of compiles; fast: the CLI and arithmetic policy tests
def test_compiled_policies_for_a_gpu_target_in_bfloat16():
    p = plan.make_plan(_one_device_config(), device="H100", policies=["none", "full"])
    assert p.compute_dtype == "bfloat16" and p.compute_dtype_source == "auto for gpu"
    none, full = p.policies
    assert (none.policy, full.policy) == ("none", "full") and none.source.startswith("XLA")
    assert none.peak_bytes > full.peak_bytes and full.peak_bytes == p.peak_bytes  # The config's own: full.
    assert none.fits and full.fits and full.largest_batch >= none.largest_batch > p.batch_size
    text = plan.format_plan(p)
    assert "Lightest policy that fits: none" in text and "compute bfloat16 (auto for gpu)" in text
    # bfloat16 activations: the same step in float32 needs more temporaries.
    f32 = plan.make_plan(_one_device_config(compute_dtype="float32"), device="H100")
    assert f32.compute_dtype_source == "config.compute_dtype" and f32.temp_bytes > p.temp_bytes


def test_unknown_policy_fails_before_compiling():
    with pytest.raises(ValueError, match="Unknown remat_policy 'most'"):
        plan.make_plan(load_config(DEMO, TINY), policies=["most"])
