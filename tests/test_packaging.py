"""A non-editable install carries what l4jax reads at run time: the presets, the shipped corpus and chat template."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_holds_the_presets_and_the_corpus(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("l4jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {p.name for p in (REPO / "l4jax" / "config" / "presets").glob("*.yaml")}
    assert presets >= {"tiny.yaml", "scout.yaml", "maverick.yaml", "behemoth.yaml", "bench.yaml"}
    assert {f"l4jax/config/presets/{n}" for n in presets} <= names
    assert {"l4jax/data/corpus/aesop.txt", "l4jax/data/corpus/tokenizer.json"} <= names
    assert "l4jax/data/templates/llama4.jinja" in names
