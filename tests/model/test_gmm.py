"""The grouped matmul: values and gradients against per-group dense matmuls, and its tile schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l4jax.model.gmm import _schedule, gmm


@pytest.mark.parametrize("M,G,tile", [(40, 4, 8), (37, 5, 16), (1, 8, 128), (64, 16, 8)])
def test_gmm_values_and_gradients(M, G, tile):
    rng = np.random.default_rng(M)
    sizes = rng.multinomial(M, np.ones(G) / G)
    x = jnp.asarray(rng.normal(size=(M, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(G, 6, 5)), jnp.float32)
    expect = np.einsum("mk,mkn->mn", x, np.asarray(w)[np.repeat(np.arange(G), sizes)])
    np.testing.assert_allclose(gmm(x, w, jnp.asarray(sizes), tile=tile), expect, rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
    ours = jax.grad(loss(lambda x, w: gmm(x, w, jnp.asarray(sizes), tile=tile)), (0, 1))(x, w)
    ref = jax.grad(loss(lambda x, w: jax.lax.ragged_dot(x, w, jnp.asarray(sizes, jnp.int32))), (0, 1))(x, w)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_gmm_schedule_visits_only_overlapping_tiles():
    """Work is (valid visits) x tile x K x N; the visits are the (tile, group) pairs that overlap, by hand."""
    # 256 rows, tiles of 32 -> 8 tiles. Groups: 0 rows, 40 rows (tiles 0-1), 0, 216 rows (tiles 1-7), 60 empty.
    sizes = jnp.array([0, 40, 0, 216] + [0] * 60)
    group, tile, valid, _, _ = _schedule(sizes, 8, 32)
    visits = [(int(g), int(t)) for g, t, v in zip(group, tile, valid) if v]
    assert visits == [(1, 0), (1, 1)] + [(3, t) for t in range(1, 8)]
    # All rows on one expert out of 64: exactly the 8 tiles, however many experts exist.
    _, _, valid, _, _ = _schedule(jnp.array([0] * 63 + [256]), 8, 32)
    assert int(valid.sum()) == 8


@pytest.mark.parametrize("sizes", [[0] * 7 + [16], [16] + [0] * 7, [3, 0, 0, 5]])
def test_left_over_visits_add_nothing(sizes):
    """The steps past the real visits point at the last group's first tile; they must add zeros, not a second copy
    of that tile (all rows in the last group is the case where they overlap it). Rows past sum(sizes) stay zero."""
    M, G = 16, len(sizes)
    rng = np.random.default_rng(G)
    x = jnp.asarray(rng.normal(size=(M, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(G, 6, 5)), jnp.float32)
    rows = np.repeat(np.arange(G), sizes)
    expect = np.zeros((M, 5), np.float32)
    expect[:len(rows)] = np.einsum("mk,mkn->mn", x[:len(rows)], np.asarray(w)[rows])
    np.testing.assert_allclose(gmm(x, w, jnp.asarray(sizes), tile=8), expect, rtol=1e-5, atol=1e-5)
    dw = jax.grad(lambda w: jnp.sum(gmm(x, w, jnp.asarray(sizes), tile=8)))(w)
    want = np.stack([np.asarray(x)[:len(rows)][rows == g].sum(0)[:, None].repeat(5, 1) for g in range(G)])
    np.testing.assert_allclose(dw, want, rtol=1e-5, atol=1e-5)
