"""The grouped matmul: values and gradients against per-group dense matmuls, and its tile schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l4jax.model import gmm as gmm_module
from l4jax.model.gmm import _schedule, gmm, mgpu_fits


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


def _mgpu_stand_ins(calls):
    """The Mosaic GPU kernels' contracts in plain JAX, for the CPU: outputs in the input dtype, rows outside every
    group left as garbage (NaN), the blocks checked against the shapes as the kernels check them."""
    def ragged(lhs, rhs, *, group_sizes, transpose_rhs=False, block_k, block_n, grid_block_n, **_):
        rhs_ = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
        assert lhs.shape[1] % block_k == 0 and rhs_.shape[2] % (block_n * grid_block_n) == 0
        calls.append("dx" if transpose_rhs else "y")
        y = jax.lax.ragged_dot(lhs, rhs_, group_sizes, preferred_element_type=jnp.float32).astype(lhs.dtype)
        return jnp.where((jnp.arange(lhs.shape[0]) < group_sizes.sum())[:, None], y, jnp.nan)

    def transposed(lhs, rhs, *, group_sizes, block_m, block_n, **_):
        assert lhs.shape[1] % block_m == 0 and rhs.shape[1] % block_n == 0
        calls.append("dw")
        ends = jnp.cumsum(group_sizes)
        g = jnp.searchsorted(ends, jnp.arange(lhs.shape[0]), side="right")  # each row's group (G: none)
        onehot = jax.nn.one_hot(g, group_sizes.shape[0], dtype=jnp.float32)  # [M, G]
        dw = jnp.einsum("mg,mk,mn->gkn", onehot, lhs.astype(jnp.float32), rhs.astype(jnp.float32))
        return jnp.where((group_sizes > 0)[:, None, None], dw, jnp.nan).astype(lhs.dtype)  # empty: unwritten

    return lambda: (ragged, transposed)


def test_mgpu_wrapper_zeroes_what_the_kernels_leave_and_matches_the_tile_schedule(monkeypatch):
    """The "mgpu" backend's wrapper (its kernels run only on Hopper GPUs, checked there by bench/kernels.py): with
    stand-ins that leave rows past sum(sizes) and empty groups' dw unwritten, values and gradients equal the tile
    schedule's, with exact zeros where the kernels write nothing."""
    calls = []
    monkeypatch.setattr(gmm_module, "_mgpu_kernels", _mgpu_stand_ins(calls))
    rng = np.random.default_rng(0)
    M, K, N = 300, 128, 256
    sizes = jnp.asarray([0, 97, 0, 150, 3, 0], jnp.int32)  # sum 250 < M: 50 rows belong to no group
    x = jnp.asarray(rng.normal(size=(M, K)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(6, K, N)) * 0.1, jnp.bfloat16)
    proj = jnp.asarray(rng.normal(size=(M, N)), jnp.float32)
    loss = lambda impl: lambda x, w: jnp.sum(gmm(x, w, sizes, impl=impl).astype(jnp.float32) * proj)  # noqa: E731
    (ours, gx, gw), (ref, rx, rw) = (
        (gmm(x, w, sizes, impl=impl), *jax.grad(loss(impl), (0, 1))(x, w)) for impl in ("mgpu", "scan"))
    assert calls == ["y", "y", "dx", "dw"]  # the forward traced twice (value, then under grad)
    for a, b in ((ours, ref), (gx, rx), (gw, rw)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2 * np.abs(b).max())
    assert not np.asarray(ours[250:], np.float32).any() and not np.asarray(gx[250:], np.float32).any()
    assert not np.asarray(gw[np.array([0, 2, 5])], np.float32).any()


def test_mgpu_takes_only_the_shapes_its_kernels_tile():
    bf = jnp.bfloat16
    assert mgpu_fits(jnp.zeros((10, 256), bf), jnp.zeros((4, 256, 384), bf))
    assert not mgpu_fits(jnp.zeros((10, 64), bf), jnp.zeros((4, 64, 128), bf))          # K = 64
    assert not mgpu_fits(jnp.zeros((10, 128), bf), jnp.zeros((4, 128, 96), bf))         # N = 96
    assert not mgpu_fits(jnp.zeros((10, 128), jnp.float32), jnp.zeros((4, 128, 128), jnp.float32))
    # Elsewhere the tile schedule runs: the tiny test shapes give the scan's numbers under impl="mgpu".
    x, w = jnp.ones((5, 6)), jnp.ones((2, 6, 3))
    np.testing.assert_array_equal(gmm(x, w, jnp.array([2, 3]), impl="mgpu"), gmm(x, w, jnp.array([2, 3])))
