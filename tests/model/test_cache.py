"""The KV cache's own arithmetic: int8 quantization error, the int8 cache's layout and size."""

import jax
import jax.numpy as jnp
import numpy as np

import l4jax
from l4jax.model.cache import KVCache, LayerKV, as_keys, quantize, write


def test_quantize_error_is_at_most_half_a_step_per_vector():
    x = jax.random.normal(jax.random.key(0), (3, 5, 64)) * jnp.arange(1, 6)[:, None]
    q, scale = quantize(x)
    assert q.dtype == jnp.int8 and scale.shape == (3, 5)
    assert int(jnp.abs(q).max()) == 127  # the largest element of each vector lands on the end of the range
    np.testing.assert_allclose(scale, jnp.abs(x).max(-1) / 127, rtol=1e-6)
    err = jnp.abs(q * scale[..., None] - x)
    assert bool(jnp.all(err <= scale[..., None] / 2 + 1e-6))
    q0, s0 = quantize(jnp.zeros((2, 8)))  # an all-zero vector: zeros with scale 0, not NaN
    assert not q0.any() and not s0.any()


def test_int8_cache_has_a_scale_per_token_and_kv_head_and_half_the_bytes():
    cfg = l4jax.load_config("scout").text
    bf16 = KVCache.abstract(cfg, 2, 16384, jnp.bfloat16)
    int8 = KVCache.abstract(cfg, 2, 16384, jnp.int8)
    assert bf16.k_scale is None
    for i in range(cfg.num_hidden_layers):
        L = int8.length(i)
        assert int8.k[i].shape == (2, 8, L, 128) and int8.v[i].shape == (2, 8, 128, L)
        assert int8.k_scale[i].shape == int8.v_scale[i].shape == (2, 8, L)
    nbytes = lambda c: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((c.k, c.v, c.k_scale, c.v_scale)))  # noqa: E731,E501
    assert nbytes(int8) / nbytes(bf16) == (128 + 4) / 256


def test_int8_write_then_read_back_within_the_rounding():
    B, K, L, hd, T = 2, 2, 8, 16, 11  # a ring of 8 entries, 11 tokens: the last 8 survive
    k, v = jax.random.normal(jax.random.key(1), (2, B, T, K, hd))
    empty = LayerKV(jnp.zeros((B, K, L, hd), jnp.int8), jnp.zeros((B, K, hd, L), jnp.int8),
                    jnp.zeros((B, K, L)), jnp.zeros((B, K, L)))
    kv = write(empty, k, v, jnp.arange(T)[None])
    keys, values = as_keys(kv, jnp.float32)  # [B, L, K, hd], entry e holds slot e + 8 if e < 3, else slot e
    slots = np.where(np.arange(L) < T - L, np.arange(L) + L, np.arange(L))
    for got, want in ((keys, k[:, slots]), (values, v[:, slots])):
        step = np.abs(want).max(-1, keepdims=True) / 127
        assert np.all(np.abs(np.asarray(got) - np.asarray(want)) <= step / 2 + 1e-6)
