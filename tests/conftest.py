"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os
import subprocess
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from l4jax.plan.targets import COMPILE_ONLY_ENV  # noqa: E402

# The plan tests compile for H100s and TPUs without them: set up before any backend starts.
for name, value in COMPILE_ONLY_ENV.items():
    os.environ.setdefault(name, value)

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def main_job(tmp_path_factory) -> Path:
    """The README's main job, run once per session for the slow tests that need a trained model:
    ``l4jax train --config configs/tiny.yaml`` (300 steps, with --export-hf); returns its run folder."""
    out = tmp_path_factory.mktemp("main_job") / "run"
    env = {**os.environ, "XLA_FLAGS": ""}  # the CLI sets up its own 8 simulated devices
    train = subprocess.run([sys.executable, "-m", "l4jax.cli", "train", "--config", "configs/tiny.yaml", "--out",
                            str(out), "--export-hf"], capture_output=True, text=True, timeout=1800, env=env, cwd=REPO)
    assert train.returncode == 0, train.stderr[-3000:]
    return out
