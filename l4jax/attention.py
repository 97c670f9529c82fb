"""Grouped-query attention with Llama 4's per-layer variants.

RoPE layers: interleaved RoPE, then (if ``use_qk_norm``) a weightless RMS norm of q and k per head, and the
chunked causal mask. NoPE layers: no RoPE, no QK-norm, query temperature tuning (if ``attn_temperature_tuning``)
and the global causal mask.

A chunked layer's query never sees a key more than C - 1 slots back (C = attention_chunk_size). When the fresh
tokens are many chunks long (long prefill, long training rows), ``attend_local`` uses that: it cuts the queries into
blocks of C/4, and each block scores only its own and the four previous blocks of keys (plus the cache L): T x
(1.25C + L) scores instead of T x (T + L). The result is the dense path's, whose mask is zero everywhere else.
Otherwise (global layers, and chunked layers over fewer tokens), more than ``QUERY_BLOCK`` fresh tokens go through
``attend_by_query_blocks``: blocks of queries, each scoring only the keys up to its own end, recomputed rather
than kept under autodiff, so neither a long prefill nor a long training row holds a [T, T] score matrix.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import sharding as sh
from .config import TextConfig
from .masks import chunk_ids, document_groups, temperature_scales, visible
from .mlp import INIT
from .norm import rms_normalize
from .rope import apply_rope


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """softmax(q k^T * scale + mask) v with GQA.

    q [B, T, H, hd]; k, v [B, S, K, hd]; mask [B, T, S] bool. Query head h reads kv head h // (H/K).
    The softmax is taken in fp32 (the reference's eager path keeps the input dtype; identical in fp32).
    Rows with no visible key (padding queries) give finite garbage, never NaN.
    """
    B, T, H, hd = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(B, T, H, hd)


def split_blocks(x: jax.Array, block: int, fill=0) -> jax.Array:
    """[B, t, ...] -> [B, ceil(t / block), block, ...], the last block padded with ``fill``."""
    m = -(-x.shape[1] // block)
    x = jnp.pad(x, [(0, 0), (0, m * block - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return x.reshape(x.shape[0], m, block, *x.shape[2:])


def attend_local(q: jax.Array, k: jax.Array, v: jax.Array, q_index: jax.Array, q_group: jax.Array,
                 k_valid: jax.Array, k_group: jax.Array, scale: float, span: int, past: tuple | None = None,
                 block: int | None = None) -> jax.Array:
    """``attend`` for a mask confined to groups (chunks) of at most ``span`` consecutive slots, blockwise.

    q [B, T, H, hd]; k, v [B, T, K, hd] the keys of the same T tokens; q_index [B|1, T] their slots; q_group,
    k_valid, k_group [B, T]. ``past`` = (keys [B, L, K, hd], values, index [B|1, L], valid [B, L], group [B, L])
    for the cached entries, which every block scores in full. Queries go in blocks of ``block`` (default
    span / 4); query block n scores its own key block and the p = ceil((span - 1) / block) before it, which hold
    every key its groups can contain: T x (L + (p + 1) block) scores, 1.25 span per query by default. (Smaller
    blocks waste less but cut the work into more, smaller matmuls; bench/attention.py measures the trade.)
    """
    B, T, H, hd = q.shape
    block = block or max(1, span // 4)
    n, p = -(-T // block), -(-(span - 1) // block)

    def blocks(x, fill):  # [B, T, ...] -> [B, n, block, ...]
        return split_blocks(x, block, fill)

    def keys(x, fill, cached=None):  # [B, T, ...] -> [B, n, L + (p + 1) block, ...]: cache, blocks n-p .. n
        x = blocks(x, fill)
        x = jnp.pad(x, [(0, 0), (p, 0)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        parts = [x[:, j:j + n] for j in range(p + 1)]
        if cached is not None:
            parts.insert(0, jnp.broadcast_to(cached[:, None], (cached.shape[0], n) + cached.shape[1:]))
        return jnp.concatenate(parts, axis=2)

    pk, pv, pi, pval, pg = past if past is not None else (None,) * 5
    kb, vb = keys(k, 0, pk), keys(v, 0, pv)
    # Padding slots (past T, before block 0) are invalid keys; padded query rows are computed and dropped.
    mask = visible(blocks(q_index, -1), keys(q_index, -1, pi), keys(k_valid, False, pval),
                   blocks(q_group, -1), keys(k_group, -1, pg))
    S = kb.shape[2]
    out = attend(blocks(q, 0).reshape(B * n, block, H, hd), kb.reshape(B * n, S, *k.shape[2:]),
                 vb.reshape(B * n, S, *v.shape[2:]), mask.reshape(B * n, block, S), scale)
    return out.reshape(B, n * block, H, hd)[:, :T]


def attend_by_query_blocks(q: jax.Array, k: jax.Array, v: jax.Array, q_index: jax.Array, k_index: jax.Array,
                           k_valid: jax.Array, q_group: jax.Array | None, k_group: jax.Array | None, scale: float,
                           block: int, pieces: int = 8) -> jax.Array:
    """``attend`` with the dense mask, at most ``block`` queries at a time and only the keys they can see.

    q [B, T, H, hd]; k, v [B, L + T, K, hd]: the L cached keys, then the T fresh ones (the queries' own tokens, in
    their order); q_index [B|1, T]; k_index [B|1, L + T]; k_valid [B, L + T]; groups or None.
    A fresh key after a query's own slot is never visible (causal), so the queries go in P <= ``pieces``
    consecutive pieces and piece p scores only the cache and the fresh keys up to its own end; within a piece,
    ``lax.map`` takes one block at a time. Pairs scored: T x L plus about (P + 1) / 2P of T x T.
    Scores held at once: [B, H, block, <= L + T]. Each block is a ``jax.checkpoint``, so under autodiff the
    backward pass recomputes its scores rather than keeping every block's probabilities (as flash attention
    does). The same numbers as one dense pass, up to the order of the sums.
    """
    B, T = q.shape[:2]
    L = k.shape[1] - T
    n = -(-T // block)
    block = -(-T // n)  # n equal blocks of at most ``block``: T = 1025 pads to 2 x 513, not 2 x 1024
    # Blocks per piece: at least 2, since XLA unrolls a one-trip loop and the unrolled blocks' scores may then all
    # be live at once (XLA:CPU's default scheduler keeps every piece's; a loop's body holds one block's at a time).
    per = max(2, -(-n // pieces))

    def blocks(x):  # [B|1, t, ...] -> [m, B|1, block, ...]: lax.map's leading axis
        return jnp.moveaxis(split_blocks(x, block), 1, 0)

    outs = []
    for first in range(0, n, per):
        t0, t1 = first * block, min((first + per) * block, T)
        end = L + t1  # the keys this piece can see
        kp, vp, ip, valid = k[:, :end], v[:, :end], k_index[:, :end], k_valid[:, :end]
        gp = None if k_group is None else k_group[:, :end]

        @jax.checkpoint
        def one(xs, kp=kp, vp=vp, ip=ip, valid=valid, gp=gp):
            qb, ib, gb = xs
            return attend(qb, kp, vp, visible(ib, ip, valid, gb, gp), scale)

        qg = None if q_group is None else blocks(q_group[:, t0:t1])
        out = jax.lax.map(one, (blocks(q[:, t0:t1]), blocks(q_index[:, t0:t1]), qg))
        outs.append(jnp.moveaxis(out, 0, 1).reshape(B, -1, *q.shape[2:])[:, :t1 - t0])
    return jnp.concatenate(outs, axis=1)


# The dense path scores at most this many queries at once: [B, H, 1024, S] fp32 is 2 GiB for the bench preset at
# S = 32768, where all T queries at once would need 64 GiB.
QUERY_BLOCK = 1024


def use_local(T: int, L: int, span: int | None) -> bool:
    """Blockwise chunked attention when it scores fewer pairs than the dense path (T queries x L + T keys)."""
    if span is None:
        return False
    block = max(1, span // 4)
    n, p = -(-T // block), -(-(span - 1) // block)
    return n * block * (L + (p + 1) * block) < T * (L + T)


def cached_slots(length: int, n: jax.Array) -> jax.Array:
    """Absolute slot held by each of ``length`` cache entries after ``n`` tokens were written; -1 where empty.

    Entry e holds the latest slot i < n with i % length == e. For a full-length cache that is just e (if e < n);
    for a chunk-sized ring it is the last ``length`` slots, which is all a chunked layer can ever see.
    """
    e = jnp.arange(length)
    i = e + length * jnp.floor_divide(n - 1 - e, length)
    return jnp.where(i >= 0, i, -1)


def write_cache(cache: dict, k: jax.Array, v: jax.Array, q_index: jax.Array) -> dict:
    """Store the newest k, v [B, T, K, hd] at entries slot % length (only the last ``length`` if T is longer)."""
    length, T = cache["k"].shape[1], k.shape[1]
    start = T - min(T, length)
    entries = q_index[0, start:] % length
    return {"k": cache["k"].at[:, entries].set(k[:, start:].astype(cache["k"].dtype)),
            "v": cache["v"].at[:, entries].set(v[:, start:].astype(cache["v"].dtype))}


class Attention(nn.Module):
    cfg: TextConfig
    layer: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, q_index: jax.Array, token_valid: jax.Array,
                 left_pad: jax.Array, cache: dict | None = None,
                 segments: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, dict | None]:
        """x [B, T, D]; cos/sin [B, T, hd/2]; q_index [1, T] absolute slots of these tokens; token_valid [B, S]
        (False on padding, indexed by absolute slot); left_pad [B]; cache {"k", "v"} [B, L, K, hd] or None.
        ``segments`` = (segment_ids, positions) [B, T] for packed training rows (no cache): each document attends
        only to itself, with chunks and temperature counted from its own first token.

        Returns (out [B, T, D], the cache with these tokens written). Keys are the cached entries followed by the
        fresh ones, so prefill, decode and a plain forward are the same code.
        """
        cfg = self.cfg
        D, H, K, hd = x.shape[-1], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        use_rope = cfg.rope_layers[self.layer]
        chunked = cfg.chunked_layers[self.layer]
        p = lambda name, shape, axes: self.param(  # noqa: E731
            name, nn.with_logical_partitioning(INIT, axes), shape, self.param_dtype).astype(self.dtype)
        wq = p("q", (D, H, hd), (sh.EMBED, sh.HEADS, sh.HEAD_DIM))     # "btd,dhk->bthk"
        wk = p("k", (D, K, hd), (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM))  # "btd,dhk->bthk"
        wv = p("v", (D, K, hd), (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM))  # "btd,dhk->bthk"
        wo = p("o", (H, hd, D), (sh.HEADS, sh.HEAD_DIM, sh.EMBED))     # "bthk,hkd->btd"

        q = jnp.einsum("btd,dhk->bthk", x, wq)
        k = jnp.einsum("btd,dhk->bthk", x, wk)
        v = jnp.einsum("btd,dhk->bthk", x, wv)
        q = nn.with_logical_constraint(q, (sh.BATCH, sh.LENGTH, sh.ACT_HEADS, None))
        k = nn.with_logical_constraint(k, (sh.BATCH, sh.LENGTH, sh.ACT_KV_HEADS, None))
        v = nn.with_logical_constraint(v, (sh.BATCH, sh.LENGTH, sh.ACT_KV_HEADS, None))
        if use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if cfg.use_qk_norm:  # after RoPE, per head, no weight, eps = rms_norm_eps
                q, k = rms_normalize(q, cfg.rms_norm_eps), rms_normalize(k, cfg.rms_norm_eps)
        elif cfg.attn_temperature_tuning:
            # [1|B, T] fp32; a packed document counts slots from its own start, as it would alone in a row.
            s = temperature_scales(q_index if segments is None else segments[1], cfg.floor_scale, cfg.attn_scale)
            q = (q.astype(jnp.float32) * s[:, :, None, None]).astype(q.dtype)

        chunk = cfg.attention_chunk_size if chunked else None
        # Per key: its slot, whether it may be seen at all, and its group (chunk and/or document; None = global).
        if segments is not None:
            seg, pos = segments
            k_valid, group = seg > 0, document_groups(seg, pos, chunk)
        else:
            k_valid = jnp.take(token_valid, q_index[0], axis=1)
            group = None if chunk is None else chunk_ids(q_index, left_pad, chunk)
        past, new_cache, L = None, None, 0
        if cache is not None:
            L = cache["k"].shape[1]
            cached = cached_slots(L, q_index[0, 0])[None]
            c_valid = (cached >= 0) & jnp.take(token_valid, jnp.maximum(cached[0], 0), axis=1)
            c_group = None if chunk is None else chunk_ids(cached, left_pad, chunk)
            past = (cache["k"].astype(k.dtype), cache["v"].astype(v.dtype), cached, c_valid, c_group)
            new_cache = write_cache(cache, k, v, q_index)

        with jax.named_scope("chunked_attention" if chunked else "global_attention"):
            if use_local(k.shape[1], L, chunk):
                out = attend_local(q, k, v, q_index, group, k_valid, group, hd ** -0.5, chunk, past)
            else:
                if past is not None:
                    k, v = jnp.concatenate([past[0], k], 1), jnp.concatenate([past[1], v], 1)
                    k_index = jnp.concatenate([past[2], q_index], 1)
                    k_valid = jnp.concatenate([past[3], k_valid], 1)
                    k_group = None if group is None else jnp.concatenate([past[4], group], 1)
                else:
                    k_index, k_group = q_index, group
                if q.shape[1] > QUERY_BLOCK:
                    out = attend_by_query_blocks(q, k, v, q_index, k_index, k_valid, group, k_group, hd ** -0.5,
                                                 QUERY_BLOCK)
                else:
                    out = attend(q, k, v, visible(q_index, k_index, k_valid, group, k_group), hd ** -0.5)
        return jnp.einsum("bthk,hkd->btd", out, wo), new_cache
