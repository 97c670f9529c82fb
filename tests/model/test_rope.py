"""RoPE: the interleaved-pair rotation by hand, its invariants, and llama3 scaling against transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import Llama4TextConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from l4jax.config import RopeScaling
from l4jax.model.rope import apply_rope, inv_frequencies, rope_angles


def test_rope_rotates_interleaved_pairs_by_hand():
    # hd = 4, theta = 100: inv_freq = [1, 1/10]. Position 2 rotates pair 0 by 2 rad, pair 1 by 0.2 rad.
    x = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
    cos, sin = rope_angles(jnp.array([[2]]), inv_frequencies(4, 100.0))
    out = np.asarray(apply_rope(x, cos, sin)).ravel()
    c0, s0, c1, s1 = np.cos(2), np.sin(2), np.cos(0.2), np.sin(0.2)
    expect = [1 * c0 - 2 * s0, 1 * s0 + 2 * c0, 3 * c1 - 4 * s1, 3 * s1 + 4 * c1]
    np.testing.assert_allclose(out, expect, rtol=1e-6)


def test_rope_position_zero_is_identity_and_norm_preserving():
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 16))
    cos, sin = rope_angles(jnp.array([[0, 5, 9], [0, 1, 1000]]), inv_frequencies(16, 1e4))
    out = apply_rope(x, cos, sin)
    np.testing.assert_allclose(out[:, 0], x[:, 0], atol=0)
    np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


@pytest.mark.parametrize("scaling", [
    None,
    {"factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
    {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
])
def test_inv_frequencies_match_transformers(scaling):
    params = {"rope_type": "default" if scaling is None else "llama3", "rope_theta": 500000.0, **(scaling or {})}
    hf_cfg = Llama4TextConfig(head_dim=128, rope_parameters=params)
    if scaling is None:
        ref = 1.0 / (500000.0 ** (np.arange(0, 128, 2) / 128))
    else:
        ref = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")[0].numpy()
    ours = inv_frequencies(128, 500000.0, None if scaling is None else RopeScaling(**scaling))
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_scout_scaling_divides_29_of_64_frequencies():
    plain = inv_frequencies(128, 500000.0)
    scout = inv_frequencies(128, 500000.0, RopeScaling(16.0, 1.0, 1.0, 8192))
    ratio = plain / scout
    assert np.isfinite(scout).all()
    assert np.sum(np.isclose(ratio, 16.0)) == 29 and np.sum(np.isclose(ratio, 1.0)) == 35
