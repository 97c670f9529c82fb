"""Sampling: the exact sets top-k / top-p allow (against numpy and by hand), that nothing outside them is ever
drawn, greedy = argmax, reproducibility, and that temperature-1 draws follow the softmax."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from l4jax.infer.sampling import filter_logits, sample


def allowed_numpy(logits: np.ndarray, top_k: int | None, top_p: float | None) -> np.ndarray:
    """Independent float64 reference of the kept set: boolean [B, V]."""
    out = np.zeros(logits.shape, dtype=bool)
    for b, row in enumerate(logits.astype(np.float64)):
        order = np.argsort(-row, kind="stable")              # descending, lower id first on ties
        kept = order[:top_k] if top_k is not None else order
        if top_p is not None and top_p < 1.0:
            p = np.exp(row[kept] - row[kept].max())
            p /= p.sum()
            n, total = 0, 0.0
            while n == 0 or total < top_p:                     # smallest prefix reaching top_p, at least one
                total += p[n]
                n += 1
            kept = kept[:n]
        out[b, kept] = True
    return out


def draws(logits, n_keys: int, **kw) -> np.ndarray:
    """[n_keys, B] tokens, one independent key per draw."""
    keys = jax.random.split(jax.random.key(123), n_keys)
    fn = jax.jit(jax.vmap(functools.partial(sample, logits, **kw)))
    return np.asarray(fn(keys))


# -- the filter ---------------------------------------------------------------------------------------------------
def test_top_p_by_hand():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))

    def kept(p):
        return np.isfinite(np.asarray(filter_logits(logits, top_p=p)))[0].tolist()

    assert kept(0.8) == [True, True, False, False]             # 0.5 + 0.3 reaches 0.8 exactly
    assert kept(0.81) == [True, True, True, False]
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.4) == [True, False, False, False]
    assert kept(0.96) == [True, True, True, True]
    assert kept(1e-9) == [True, False, False, False]           # the top token always survives
    # Kept logits pass through unchanged (they are renormalised only by the final softmax).
    np.testing.assert_allclose(np.asarray(filter_logits(logits, top_p=0.8))[0, :2], np.log([0.5, 0.3]), rtol=1e-6)


def test_top_k_by_hand_and_ties_go_to_the_lower_id():
    logits = jnp.array([[1.0, 3.0, 3.0, 2.0, 3.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    out = np.asarray(filter_logits(logits, top_k=2))
    assert np.isfinite(out).tolist() == [[False, True, True, False, False], [True, True, False, False, False]]
    assert out[0, 1] == 3.0 and out[0, 4] == -np.inf
    # top-p applies to the renormalised top-k distribution: of [5, 4] the top token has prob 0.731 < 0.75.
    out = np.isfinite(np.asarray(filter_logits(logits, top_k=2, top_p=0.75)))
    assert out[1].tolist() == [True, True, False, False, False]
    out = np.isfinite(np.asarray(filter_logits(logits, top_k=2, top_p=0.7)))
    assert out[1].tolist() == [True, False, False, False, False]


def test_no_filter_keeps_everything():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 17)) * 4, jnp.float32)
    for kw in ({}, {"top_p": 1.0}, {"top_k": 17}, {"top_k": 17, "top_p": 1.0}):
        np.testing.assert_array_equal(np.asarray(filter_logits(logits, **kw)), np.asarray(logits))


@pytest.mark.parametrize("top_k,top_p", [(1, None), (5, None), (None, 0.3), (None, 0.9), (8, 0.6), (3, 0.999)])
def test_filter_matches_numpy(top_k, top_p):
    logits = (np.random.default_rng(7).normal(size=(6, 40)) * 3).astype(np.float32)
    logits[0, :5] = logits[0, 0]                                # ties at the top
    logits[1, 10:] = logits[1, 9]                               # ties in the tail
    got = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p)))
    np.testing.assert_array_equal(got, allowed_numpy(logits, top_k, top_p))


# -- sampling -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k,top_p,temperature", [(4, None, 1.0), (None, 0.7, 1.0), (10, 0.8, 2.0),
                                                     (None, 0.5, 5.0)])
def test_excluded_tokens_are_never_drawn(top_k, top_p, temperature):
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(4, 64)) * 2, jnp.float32)
    allowed = allowed_numpy(np.asarray(logits) / temperature, top_k, top_p)
    tokens = draws(logits, 4000, temperature=temperature, top_k=top_k, top_p=top_p)
    for b in range(4):
        seen = np.unique(tokens[:, b])
        assert set(seen.tolist()) <= set(np.flatnonzero(allowed[b]).tolist()), f"row {b} drew an excluded token"
        # Every allowed token that has at least 1% probability shows up in 4000 draws.
        scaled = np.asarray(logits[b]) / temperature
        p = np.where(allowed[b], np.exp(scaled - scaled.max()), 0)
        p /= p.sum()
        assert set(np.flatnonzero(p > 0.01).tolist()) <= set(seen.tolist())


def test_temperature_zero_is_argmax_and_ignores_the_key():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(5, 1000)), jnp.float32)
    expect = np.argmax(np.asarray(logits), axis=-1)
    for seed in range(3):
        got = sample(logits, jax.random.key(seed))
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(got), expect)
    # With filters set it is still argmax, and the lowest id wins a tie.
    tie = jnp.array([[0.0, 2.0, 2.0, 1.0]])
    assert sample(tie, jax.random.key(0), top_k=2, top_p=0.5).tolist() == [1]


def test_fixed_key_reproduces_and_different_keys_differ():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(8, 50)), jnp.float32)
    f = jax.jit(functools.partial(sample, temperature=0.8, top_k=20, top_p=0.9))
    a, b = np.asarray(f(logits, jax.random.key(42))), np.asarray(f(logits, jax.random.key(42)))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, np.asarray(sample(logits, jax.random.key(42), temperature=0.8, top_k=20,
                                                       top_p=0.9)))   # jit and eager agree
    c = np.asarray(f(logits, jax.random.key(43)))
    assert not np.array_equal(a, c)


def test_temperature_one_follows_softmax():
    # 200k draws from one row: chi-square goodness of fit against softmax(logits), and a max-abs check.
    logits = jnp.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5])
    n = 200_000
    tokens = np.asarray(sample(jnp.broadcast_to(logits, (n, 8)), jax.random.key(0), temperature=1.0))
    counts = np.bincount(tokens, minlength=8)
    probs = np.exp(np.asarray(logits, np.float64))
    probs /= probs.sum()
    chi2, pvalue = stats.chisquare(counts, probs * n)
    assert pvalue > 1e-3, (chi2, counts, probs * n)
    assert np.max(np.abs(counts / n - probs)) < 0.005


def test_temperature_sharpens_and_flattens():
    logits = jnp.array([1.0, 0.0])
    n = 100_000
    for t in (0.5, 2.0):
        tokens = np.asarray(sample(jnp.broadcast_to(logits, (n, 2)), jax.random.key(1), temperature=t))
        p0 = 1 / (1 + np.exp(-1 / t))                          # softmax([1/t, 0])[0]: 0.881 at t=0.5, 0.622 at t=2
        assert abs(np.mean(tokens == 0) - p0) < 0.006


def test_bf16_logits_and_leading_axes():
    logits = jnp.array([[[0.0, 5.0, 1.0]], [[9.0, 0.0, 0.0]]], dtype=jnp.bfloat16)     # [2, 1, 3]
    out = filter_logits(logits, top_k=1)
    assert out.dtype == jnp.float32 and out.shape == (2, 1, 3)
    assert np.isfinite(np.asarray(out)).tolist() == [[[False, True, False]], [[True, False, False]]]
    assert sample(logits, jax.random.key(0), temperature=1.0, top_k=1).tolist() == [[1], [0]]


# -- errors -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,err,msg", [
    ({"top_k": 0}, ValueError, r"top_k must be in \[1, vocab size 10\], got 0"),
    ({"top_k": 11}, ValueError, r"top_k must be in \[1, vocab size 10\], got 11"),
    ({"top_k": 2.0}, TypeError, r"top_k must be a Python int"),
    ({"top_p": 0.0}, ValueError, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, ValueError, r"top_p must be in \(0, 1\], got 1.5"),
    ({"top_p": float("nan")}, ValueError, r"top_p must be in \(0, 1\], got nan"),
    ({"temperature": -0.1}, ValueError, r"temperature must be >= 0 \(0 means greedy\), got -0.1"),
    ({"temperature": jnp.float32(0.7)}, TypeError, r"temperature must be a Python float \(it is static\)"),
])
def test_errors_name_the_argument(kw, err, msg):
    with pytest.raises(err, match=msg):
        sample(jnp.zeros((2, 10)), jax.random.key(0), **kw)


def test_traced_temperature_is_rejected_under_jit():
    with pytest.raises(TypeError, match="temperature must be a Python float"):
        jax.jit(lambda x, k, t: sample(x, k, temperature=t))(jnp.zeros((1, 4)), jax.random.key(0), 0.5)
