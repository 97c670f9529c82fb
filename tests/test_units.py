"""Unit tests of RoPE, masks, temperature tuning, routing and the grouped matmul against hand-computed cases
and against the reference's own functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import Llama4TextConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from l4jax import attention
from l4jax.attention import attend, attend_by_query_blocks, attend_local, cached_slots, use_local
from l4jax.config import RopeScaling
from l4jax.gmm import _schedule, gmm
from l4jax.masks import (attention_mask, chunk_ids, document_groups, left_padding, positions_from_mask, segment_mask,
                         segment_positions, temperature_scales, visible)
from l4jax.moe import route, routed_experts
from l4jax.norm import rms_normalize
from l4jax.rope import apply_rope, inv_frequencies, rope_angles


# -- RoPE ---------------------------------------------------------------------------------------------------------
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


# -- masks and temperature ------------------------------------------------------------------------------------
def test_positions_and_left_padding():
    m = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(left_padding(m), [2, 0])
    np.testing.assert_array_equal(positions_from_mask(m), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])


def test_chunked_mask_by_hand():
    # Row 0: 1 pad slot, chunk 3 -> real tokens at slots 1..6 form chunks {1,2,3} and {4,5,6}.
    idx = jnp.arange(7)[None]
    valid = jnp.array([[0, 1, 1, 1, 1, 1, 1], [1] * 7]) > 0
    m = np.asarray(attention_mask(idx, idx, valid, jnp.array([1, 0]), 3)).astype(int)
    np.testing.assert_array_equal(m[0, 5], [0, 0, 0, 0, 1, 1, 0])  # slot 5 sees 4, 5: same chunk, causal
    np.testing.assert_array_equal(m[0, 3], [0, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(m[1, 3], [0, 0, 0, 1, 0, 0, 0])  # unpadded: chunks {0,1,2} {3,4,5} {6}
    np.testing.assert_array_equal(m[1, 6], [0, 0, 0, 0, 0, 0, 1])
    full = np.asarray(attention_mask(idx, idx, valid, jnp.array([1, 0]), None)).astype(int)
    np.testing.assert_array_equal(full[0, 5], [0, 1, 1, 1, 1, 1, 0])  # global: everything real and causal


def test_chunks_are_fixed_blocks_not_a_sliding_window():
    idx = jnp.arange(16)[None]
    m = np.asarray(attention_mask(idx, idx, jnp.ones((1, 16), bool), jnp.zeros(1, int), 8))[0]
    assert m.sum(-1).tolist() == [p % 8 + 1 for p in range(16)]


def test_temperature_scales():
    s = np.asarray(temperature_scales(jnp.array([0, 8190, 8191, 16382, 16383]), 8192.0, 0.1))
    np.testing.assert_allclose(s, [1, 1, 1 + 0.1 * np.log(2), 1 + 0.1 * np.log(2), 1 + 0.1 * np.log(3)], rtol=1e-6)


def test_qk_norm_is_weightless_rms_per_head():
    x = jnp.array([[3.0, 4.0], [1.0, 0.0]])
    np.testing.assert_allclose(rms_normalize(x, 0.0), [[3 / np.sqrt(12.5), 4 / np.sqrt(12.5)], [np.sqrt(2), 0]],
                               rtol=1e-6)


# -- routing and experts ------------------------------------------------------------------------------------------
def test_router_takes_sigmoid_of_top_k_logits():
    x = jnp.eye(3)
    router = jnp.array([[2.0, -1.0, 0.5, 0.0], [0.0, 3.0, 1.0, -2.0], [-1.0, -2.0, -3.0, -0.5]])
    scores, experts = route(x, router, 2)
    np.testing.assert_array_equal(experts, [[0, 2], [1, 2], [3, 0]])
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    np.testing.assert_allclose(scores, [[sig(2), sig(0.5)], [sig(3), sig(1)], [sig(-0.5), sig(-1)]], rtol=1e-6)


def test_routed_experts_scale_the_input_and_match_dense_reference():
    rng = np.random.default_rng(0)
    N, D, F, E, k = 13, 6, 5, 4, 2
    x = rng.normal(size=(N, D)).astype(np.float32)
    gate, up = rng.normal(size=(2, E, D, F)).astype(np.float32)
    down = rng.normal(size=(E, F, D)).astype(np.float32)
    scores, experts = route(jnp.asarray(x), jnp.asarray(rng.normal(size=(D, E)), jnp.float32), k)
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    expect = np.zeros((N, D), np.float32)
    for n in range(N):  # reference semantics: expert(score * x), summed over the token's k experts
        for j in range(k):
            e, xs = int(experts[n, j]), float(scores[n, j]) * x[n]
            expect[n] += (silu(xs @ gate[e]) * (xs @ up[e])) @ down[e]
    for impl in ("scan", "ragged_dot"):
        got = routed_experts(jnp.asarray(x), scores, experts, gate, up, down, impl=impl)
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)


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


# -- blockwise chunked attention --------------------------------------------------------------------------------
def _dense_local(q, k, v, q_index, group, valid, scale, past):
    """The reference for attend_local: one dense mask over (cache + fresh) keys."""
    k_index, k_valid, k_group = q_index, valid, group
    if past is not None:
        k, v = jnp.concatenate([past[0], k], 1), jnp.concatenate([past[1], v], 1)
        k_index = jnp.concatenate([jnp.broadcast_to(past[2], (1, past[2].shape[1])), q_index], 1)
        k_valid, k_group = jnp.concatenate([past[3], valid], 1), jnp.concatenate([past[4], group], 1)
    return attend(q, k, v, visible(q_index, k_index, k_valid, group, k_group), scale)


@pytest.mark.parametrize("with_cache", [False, True])
@pytest.mark.parametrize("block", [None, 3, 8])  # the default C/4 (4 blocks back), 3 blocks back, 1 block back
def test_blockwise_chunked_attention_equals_dense(with_cache, block):
    """Left-padded rows whose chunks start at different slots, T not a multiple of C, and (with_cache) a chunk-sized
    ring already holding earlier tokens: the blockwise path gives the dense path's output row for row."""
    B, T, H, K, hd, C = 3, 37, 4, 2, 8, 8
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, hd)), jnp.float32) for n in (H, K, K))
    left_pad = jnp.array([0, 3, 11])
    offset = 13 if with_cache else 0
    token_valid = jnp.arange(offset + T)[None] >= left_pad[:, None]
    q_index = offset + jnp.arange(T)[None]
    group, valid = chunk_ids(q_index, left_pad, C), jnp.take(token_valid, q_index[0], axis=1)
    past = None
    if with_cache:
        slots = cached_slots(C, jnp.asarray(offset))[None]
        past = (jnp.asarray(rng.normal(size=(B, C, K, hd)), jnp.float32),
                jnp.asarray(rng.normal(size=(B, C, K, hd)), jnp.float32), slots,
                (slots >= 0) & jnp.take(token_valid, jnp.maximum(slots[0], 0), axis=1), chunk_ids(slots, left_pad, C))
    assert use_local(T, C if with_cache else 0, C)
    got = attend_local(q, k, v, q_index, group, valid, group, 0.3, C, past, block=block)
    want = _dense_local(q, k, v, q_index, group, valid, 0.3, past)
    real = np.asarray(valid)  # padding queries give garbage on both paths
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-6, atol=1e-6)


def test_blockwise_chunked_attention_on_packed_documents():
    """Packed rows: documents of many lengths, chunks counted from each document's start, padding at the end."""
    C, lengths = 8, [[5, 30, 2, 19], [41, 9]]
    seg = np.zeros((2, 56), np.int32)
    for row, ls in enumerate(lengths):
        seg[row, :sum(ls)] = np.repeat(np.arange(1, len(ls) + 1), ls)
    seg = jnp.asarray(seg)
    pos = segment_positions(seg)
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 56, n, 8)), jnp.float32) for n in (4, 2, 2))
    idx = jnp.arange(56)[None]
    group = document_groups(seg, pos, C)
    got = attend_local(q, k, v, idx, group, seg > 0, group, 0.3, C)
    want = attend(q, k, v, segment_mask(seg, pos, C), 0.3)
    real = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-6, atol=1e-6)


def test_blockwise_path_is_taken_only_when_it_scores_fewer_pairs():
    # Blocks of C/4 scoring 1.25 C keys each, against T keys each.
    assert not use_local(10, 0, 8) and use_local(11, 0, 8) and not use_local(40, 0, None)
    assert use_local(4096, 0, 2048) and not use_local(2048, 0, 2048) and not use_local(1, 2048, 2048)


@pytest.mark.parametrize("L, pieces, chunk", [(13, 8, None), (13, 3, 8), (0, 3, None), (0, 8, 8)])
def test_query_blocks_equal_one_dense_attention(chunk, L, pieces):
    """5 queries at a time (T = 37 not a multiple), each piece of blocks scoring only the keys up to its end, onto
    a cache of L entries or none (a training row): the output and its gradients equal all queries at once."""
    B, T, H, K, hd = 2, 37, 4, 2, 8
    S = L + T
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(B, T, H, hd)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, S, K, hd)), jnp.float32) for _ in range(2))
    left_pad = jnp.array([0, 6])
    q_index, k_index = L + jnp.arange(T)[None], jnp.arange(S)[None]
    k_valid = k_index >= left_pad[:, None]
    real = (q_index >= left_pad[:, None])[:, :, None, None]  # padding queries' rows are garbage on both paths
    w = jnp.asarray(rng.normal(size=(B, T, H, hd)), jnp.float32) * real
    groups = (None, None) if chunk is None else tuple(chunk_ids(i, left_pad, chunk) for i in (q_index, k_index))

    def blocked(q, k, v):
        return attend_by_query_blocks(q, k, v, q_index, k_index, k_valid, *groups, 0.3, 5, pieces)

    def dense(q, k, v):
        return attend(q, k, v, visible(q_index, k_index, k_valid, *groups), 0.3)

    out = [jax.jit(f)(q, k, v) * real for f in (blocked, dense)]
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(out[1]), rtol=1e-6, atol=1e-6)
    got, want = (jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * w), (0, 1, 2)))(q, k, v) for f in (blocked, dense))
    for g, h in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-5, atol=1e-6)


def test_query_blocks_score_only_visible_keys(monkeypatch):
    """Without a cache, 8 blocks of 64 go in 4 pieces of 2; piece p scores only the keys up to its end, so the
    pairs scored are 2 (2 + 4 + 6 + 8) / 64 = 5/8 of the dense path's."""
    B, T, H, K, hd, block = 1, 512, 4, 2, 16, 64
    q, k, v = (jnp.ones((B, T, n, hd)) for n in (H, K, K))
    index, valid = jnp.arange(T)[None], jnp.ones((B, T), bool)
    scored = []  # (queries, keys) of each traced block; lax.map traces a piece's body once

    def recording(q, k, v, mask, scale):
        scored.append((q.shape[1], k.shape[1]))
        return attend(q, k, v, mask, scale)

    monkeypatch.setattr(attention, "attend", recording)
    attention.attend_by_query_blocks(q, k, v, index, index, valid, None, None, 0.1, block)
    assert scored == [(64, 128), (64, 256), (64, 384), (64, 512)]
    assert sum(2 * qn * kn for qn, kn in scored) / T**2 == 5 / 8
    scored.clear()  # 130 queries: 3 equal blocks of 44 (132 slots), not 3 of 64 (192)
    attention.attend_by_query_blocks(q[:, :130], k[:, :130], v[:, :130], index[:, :130], index[:, :130],
                                     valid[:, :130], None, None, 0.1, block)
    assert scored == [(44, 88), (44, 130)]
