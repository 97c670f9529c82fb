"""Scoring through the cache: with a float cache it is the full forward's log-softmax; the int8 cache stays close to
it, on one device and on a mesh alike, and on the main job's trained model keeps its perplexity and greedy tokens."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import l4jax
from l4jax.infer.score import logits_through_cache, score_through_cache
from tiny import hf_model, save


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return l4jax.load(save(hf_model("scout", seed=3), tmp_path_factory.mktemp("scout")))


IDS = np.random.default_rng(5).integers(3, 300, (2, 30))  # 30 tokens: chunks of 8 wrap the ring three times


def test_float_cache_scores_equal_the_full_forward(model):
    logp = score_through_cache(model, IDS, prefix=5)
    ref = np.asarray(jax.nn.log_softmax(model(IDS)[:, 4:-1]))
    want = np.take_along_axis(ref, IDS[:, 5:, None], -1)[..., 0]
    np.testing.assert_allclose(logp, want, atol=2e-5)
    np.testing.assert_allclose(logits_through_cache(model, IDS, prefix=5), np.asarray(model(IDS))[:, 4:-1], atol=2e-5)


@pytest.mark.slow  # the default suite stays under 10 minutes
def test_int8_cache_scores_close_to_the_float_cache_on_a_mesh_too(model):
    exact = score_through_cache(model, IDS, prefix=5)
    int8 = score_through_cache(model, IDS, prefix=5, kv_dtype="int8")
    assert 0 < np.abs(int8 - exact).max() < 0.02  # int8 rounding moves the scores, a little
    sharded = l4jax.Model(model.config, model.params, mesh=l4jax.make_mesh(data=2, tensor=2, expert=2))
    np.testing.assert_allclose(score_through_cache(sharded, IDS, prefix=5, kv_dtype="int8"), int8, atol=2e-5)


def test_errors_name_the_argument(model):
    with pytest.raises(ValueError, match="prefix"):
        score_through_cache(model, IDS, prefix=30)
    with pytest.raises(ValueError, match="kv_dtype"):
        score_through_cache(model, IDS, prefix=5, kv_dtype="int4")


@pytest.mark.slow
def test_int8_cache_on_the_main_jobs_model(main_job):
    """The README's main job (300 steps, ~4 minutes on 2 cores), then ``bench/kv_int8.py``: held-out perplexity
    through the int8 cache within 0.5% of the bf16 cache's, and greedy continuations that agree for 16 tokens."""
    repo, env = Path(__file__).resolve().parents[2], {**os.environ, "XLA_FLAGS": ""}
    check = subprocess.run([sys.executable, "bench/kv_int8.py", "--model", str(main_job / "model"), "--json"],
                           capture_output=True, text=True, timeout=900, env={**env, "JAX_PLATFORMS": "cpu"}, cwd=repo)
    assert check.returncode == 0, check.stderr[-3000:]
    got = json.loads(check.stdout.strip().splitlines()[-1])
    assert got["ppl_bfloat16"] < 60  # a trained model (a random one scores ~512)
    assert got["ppl_rise_pct"] <= 0.5, got
    assert min(got["greedy_agree"]) >= 16, got
