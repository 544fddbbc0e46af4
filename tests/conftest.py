"""Test setup: 8 simulated CPU devices (must be set before jax is imported), float32 matmuls, fast compiles.

The suite is dominated by XLA compile time on CPU, so LLVM's optimization level is lowered and its expensive passes
are off (compiles ~2.5x faster). Results stay float32-exact where tests compare two computations, since both run
under the same flags; benchmarks never run with these flags.
"""

import os

FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
