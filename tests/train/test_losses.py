"""The blocked cross-entropy against the whole-logits one: the same sums and gradients, T not a multiple of the
block, padding masked out."""

import jax
import jax.numpy as jnp
import numpy as np

from l4jax.train.losses import cross_entropy, cross_entropy_by_blocks


def test_blocked_cross_entropy_equals_whole_logits():
    B, T, D, V = 2, 37, 8, 50
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    mask = jnp.asarray(rng.random((B, T)) > 0.2, jnp.float32)

    def whole(h, w):
        return cross_entropy(jnp.einsum("btd,dv->btv", h, w), targets, mask)[0]

    def blocked(h, w):
        return cross_entropy_by_blocks(h, w, targets, mask, block=8)[0]

    np.testing.assert_allclose(blocked(hidden, head), whole(hidden, head), rtol=1e-6)
    assert float(cross_entropy_by_blocks(hidden, head, targets, mask, block=8)[1]) == float(mask.sum())
    for a, b in zip(jax.grad(blocked, (0, 1))(hidden, head), jax.grad(whole, (0, 1))(hidden, head)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
