"""Attention paths: blockwise chunked attention and query blocks equal one dense pass (outputs and gradients),
and score only the keys they can see."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import l4jax
from l4jax.model import attention
from l4jax.model.attention import attend, attend_by_query_blocks, attend_local, use_local
from l4jax.model.cache import cached_slots
from l4jax.model.flash import flash_attend, flash_attend_tpu, segments
from l4jax.model.masks import chunk_ids, document_groups, segment_positions, visible
from masks_reference import segment_mask
from tiny import batch, hf_logits, hf_model, rel_err, save


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


@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
@pytest.mark.parametrize("packed", [False, True])
def test_flash_kernel_equals_dense_attention(packed, kernel):
    """The fused kernels (Pallas' GPU and TPU ones, in interpret mode on the CPU) against the dense path, outputs
    and gradients: left padding and chunks of 8, or packed documents with chunks counted per document; T = 37 is
    padded to a block."""
    B, T, H, K, hd, C = 2, 37, 4, 2, 16, 8
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, hd)), jnp.float32) for n in (H, K, K))
    idx = jnp.arange(T)[None]
    if packed:
        seg = jnp.asarray(np.array([[1] * 10 + [2] * 13 + [3] * 9 + [0] * 5, [1] * 20 + [2] * 12 + [0] * 5]))
        valid, group = seg > 0, document_groups(seg, segment_positions(seg), C)
    else:
        left = jnp.array([0, 5])
        valid, group = idx >= left[:, None], chunk_ids(idx, left, C)
    w = jnp.asarray(rng.normal(size=(B, T, H, hd)), jnp.float32) * valid[:, :, None, None]

    def flash(q, k, v):
        if kernel == "tpu":
            return flash_attend_tpu(q, k, v, segments(valid, group), 0.25)
        return flash_attend(q, k, v, segments(valid, group), 0.25, interpret=True)

    def dense(q, k, v):
        return attend(q, k, v, visible(idx, idx, valid, group, group), 0.25)

    real = np.asarray(valid)
    interpret = pltpu.force_tpu_interpret_mode() if kernel == "tpu" else contextlib.nullcontext()
    # The TPU kernel's forward and backward are both traced in here, and finished before anything else runs: in
    # interpret mode its host callbacks run jax themselves, and a dispatch beside them can deadlock the CPU client.
    with interpret:
        out = np.asarray(flash(q, k, v))
        got = jax.block_until_ready(jax.grad(lambda *a: jnp.sum(flash(*a) * w), (0, 1, 2))(q, k, v))
    np.testing.assert_allclose(out[real], np.asarray(dense(q, k, v))[real], atol=2e-6)
    want = jax.grad(lambda *a: jnp.sum(dense(*a) * w), (0, 1, 2))(q, k, v)
    for g, h in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("mesh", [None, dict(data=2, fsdp=2, tensor=2)])
def test_the_tpu_kernel_in_the_model_matches_transformers(mesh, tmp_path, monkeypatch):
    """The Scout-like model with its training and prefill attention in the TPU flash kernel (interpret mode), on one
    device and on a mesh, where each device runs the kernel on its own rows and heads: transformers' logits, and
    every layer took the kernel."""
    model = hf_model("scout")
    folder = save(model, tmp_path)
    shapes, real = [], attention.flash_attend_tpu
    monkeypatch.setattr(attention, "flash_attend_tpu", lambda q, *a, **k: shapes.append(q.shape) or real(q, *a, **k))
    ids, mask, pos = batch(lengths=(21, 16, 9, 12))
    with pltpu.force_tpu_interpret_mode():
        ours = l4jax.load(folder, mesh=mesh and l4jax.make_mesh(**mesh), attention_impl="flash_tpu")
        logits = np.asarray(ours(ids, mask))  # finished here (see test_flash_kernel_equals_dense_attention)
    per_device = (4, 4) if mesh is None else (1, 2)  # rows over data x fsdp, heads over tensor
    assert len(shapes) == model.config.num_hidden_layers and {(s[0], s[2]) for s in shapes} == {per_device}, shapes
    assert rel_err(logits, hf_logits(model, ids, mask, pos), mask) <= 1e-4


def test_the_tpu_kernel_gives_way_to_xla_for_bf16_at_the_highest_precision(tmp_path, monkeypatch):
    """Mosaic refuses the kernel's bf16 products under a "highest" default matmul precision (this suite's): bf16
    attention then takes the XLA paths, with their logits; at the default precision the kernel runs."""
    folder = save(hf_model("scout"), tmp_path)
    shapes, real = [], attention.flash_attend_tpu
    monkeypatch.setattr(attention, "flash_attend_tpu", lambda q, *a, **k: shapes.append(q.shape) or real(q, *a, **k))
    ids, mask, _ = batch()
    want = np.asarray(l4jax.load(folder, dtype="bfloat16", attention_impl="xla")(ids, mask))
    with pltpu.force_tpu_interpret_mode():
        got = np.asarray(l4jax.load(folder, dtype="bfloat16", attention_impl="flash_tpu")(ids, mask))
        assert shapes == []
        with jax.default_matmul_precision("default"):
            np.asarray(l4jax.load(folder, dtype="bfloat16", attention_impl="flash_tpu")(ids, mask))
    assert len(shapes) == 4
    np.testing.assert_array_equal(got, want)
