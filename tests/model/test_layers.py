"""Shared layers: the weightless RMS norm used as QK-norm."""

import jax.numpy as jnp
import numpy as np

from l4jax.model.layers import rms_normalize


def test_qk_norm_is_weightless_rms_per_head():
    x = jnp.array([[3.0, 4.0], [1.0, 0.0]])
    np.testing.assert_allclose(rms_normalize(x, 0.0), [[3 / np.sqrt(12.5), 4 / np.sqrt(12.5)], [np.sqrt(2), 0]],
                               rtol=1e-6)
