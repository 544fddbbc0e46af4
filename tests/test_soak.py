"""The soak benchmark's analysis (bench/soak.py) and the orbax memory reproduction run as documented."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import soak  # noqa: E402


def _samples(rss_of_step, steps=2000, per_step=4):
    """One sample every 1/per_step steps; a spike of +300 MiB every 250 steps (an evaluation)."""
    out = []
    for i in range(steps * per_step):
        step = i // per_step
        out.append((i * 0.1, step, rss_of_step(step) + (300.0 if step % 250 == 0 else 0.0)))
    return out


def test_summary_of_flat_memory_ignores_spikes_and_reports_no_growth():
    noise = np.random.default_rng(0).normal(0, 2, 2000)
    s = soak.summarize(_samples(lambda step: 600 + noise[step]), 2000, warmup=500, window=100)
    assert abs(s["growth_mib"]) < 4 and abs(s["slope_mib_per_1000_steps"]) < 4
    assert s["peak_mib"] > 850 and s["peak_after_warmup_mib"] > 850  # The spikes are seen, but not in baselines.


def test_summary_measures_a_linear_leak():
    s = soak.summarize(_samples(lambda step: 600 + 0.02 * step), 2000, warmup=500, window=100)
    assert s["slope_mib_per_1000_steps"] == pytest.approx(20, abs=0.5)
    assert s["growth_mib"] == pytest.approx(0.02 * 1100, abs=4)  # Medians of the first and last quarters.
    assert s["noise_mib"] < 1


def test_summary_refuses_too_few_windows():
    with pytest.raises(SystemExit, match="windows after warm-up"):
        soak.summarize(_samples(lambda step: 600.0, steps=600), 600, warmup=500, window=100)


def test_orbax_save_memory_runs_and_reports_per_save():
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "orbax_save_memory.py"),
            "--arrays",
            "3",
            "--size",
            "10",
            "--saves",
            "4",
            "--warmup",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "orbax-checkpoint" in out.stdout and "3 arrays x 10 float32" in out.stdout
    assert out.stdout.count("more saves:") == 4 and "KiB per save" in out.stdout
