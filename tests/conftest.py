"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from l4jax.plan.targets import COMPILE_ONLY_ENV  # noqa: E402

# The plan tests compile for H100s and TPUs without them: set up before any backend starts.
for name, value in COMPILE_ONLY_ENV.items():
    os.environ.setdefault(name, value)

jax.config.update("jax_default_matmul_precision", "highest")
