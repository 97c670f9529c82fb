"""Grouped-query attention with Llama 4's per-layer variants.

RoPE layers: interleaved RoPE, then (if ``use_qk_norm``) a weightless RMS norm of q and k per head, and the
chunked causal mask. NoPE layers: no RoPE, no QK-norm, query temperature tuning (if ``attn_temperature_tuning``)
and the global causal mask.

A chunked layer's query never sees a key more than C - 1 slots back (C = attention_chunk_size). When the fresh
tokens are many chunks long (long prefill, long training rows), ``attend_local`` uses that: it cuts the queries into
blocks of C/4, and each block scores only its own and the four previous blocks of keys (plus the cache L): T x
(1.25C + L) scores instead of T x (T + L). The result is the dense path's, whose mask is zero everywhere else.
Otherwise (global layers, and chunked layers over fewer tokens), more than ``Kernels.query_block`` fresh tokens go
through ``attend_by_query_blocks``: blocks of queries, each scoring only the keys up to its own end, recomputed
rather than kept under autodiff, so neither a long prefill nor a long training row holds a [T, T] score matrix.
With ``Kernels.attention = "flash"`` (a GPU) or ``"flash_tpu"`` (a TPU), fresh tokens with no cached keys before
them (training, a prefill) go through the fused kernel of ``flash.py`` instead.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import TextConfig
from .axes import (ACT_HEADS, ACT_KV_HEADS, BATCH, EMBED, HEAD_DIM, HEADS, KV_HEADS, LENGTH,
                   Partitioning)
from .cache import LayerKV, as_keys, cached_slots, write
from .context import attend_split
from .flash import flash_attend, flash_attend_tpu, segments
from .kernels import Kernels, mosaic_takes_bf16
from .layers import param, project, rms_normalize
from .masks import chunk_ids, document_groups, temperature_scales, visible
from .rope import apply_rope


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, k_axes: str = "bskd",
           v_axes: str = "bskd", k_scale: jax.Array | None = None, v_scale: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T * scale + mask) v with GQA.

    q [B, T, H, hd]; k, v [B, S, K, hd], or laid out as ``k_axes``, ``v_axes`` say (the KV cache's are "bksd" and
    "bkds"); mask [B, T, S] bool; k_scale, v_scale [B, K, S]: an int8 cache's per-key scales, applied to the scores
    and to the probabilities (k and v then hold the int8 values in q's dtype). Query head h reads kv head
    h // (H/K). The softmax is taken in fp32 (the reference's eager path keeps the input dtype; identical in fp32).
    Rows with no visible key (padding queries) give finite garbage, never NaN.
    """
    B, T, H, hd = q.shape
    K = k.shape[k_axes.index("k")]
    qg = q.reshape(B, T, K, H // K, hd)
    scores = jnp.einsum(f"btkgd,{k_axes}->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if k_scale is not None:
        scores = scores * k_scale[:, :, None, None]
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if v_scale is not None:
        probs = probs * v_scale[:, :, None, None]
    out = jnp.einsum(f"bkgts,{v_axes}->btkgd", probs.astype(v.dtype), v)
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
    block, n, p = local_blocks(T, span, block)

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


def local_blocks(T: int, span: int, block: int | None = None) -> tuple[int, int, int]:
    """``attend_local``'s tiling of T queries under groups of at most ``span`` slots: (block size, number of
    query blocks n, previous key blocks p each block scores besides its own)."""
    block = block or max(1, span // 4)
    return block, -(-T // block), -(-(span - 1) // block)


def use_local(T: int, L: int, span: int | None) -> bool:
    """Blockwise chunked attention when it scores fewer pairs than the dense path (T queries x L + T keys)."""
    if span is None:
        return False
    block, n, p = local_blocks(T, span)
    return n * block * (L + (p + 1) * block) < T * (L + T)


@functools.partial(jax.tree_util.register_dataclass, meta_fields=["cache_empty"],
                   data_fields=["cos", "sin", "q_index", "token_valid", "left_pad", "segment_ids", "doc_positions"])
@dataclasses.dataclass(frozen=True)
class Context:
    """What every layer's attention needs to know about the tokens, computed once per forward.

    cos, sin [B, T, hd/2]: RoPE angles of the fresh tokens; q_index [1, T]: their absolute slots; token_valid
    [B, S]: False on padding, by absolute slot; left_pad [B]: padding slots before each row's first token;
    segment_ids, doc_positions [B, T] or None: packed documents (training) and each token's position in its own;
    cache_empty (static): the cache holds nothing yet, so only the fresh keys are scored.
    """

    cos: jax.Array
    sin: jax.Array
    q_index: jax.Array
    token_valid: jax.Array
    left_pad: jax.Array
    segment_ids: jax.Array | None = None
    doc_positions: jax.Array | None = None
    cache_empty: bool = False


class Attention(nn.Module):
    cfg: TextConfig
    layer: int
    part: Partitioning = Partitioning()
    kernels: Kernels = Kernels()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, ctx: Context,
                 kv: LayerKV | None = None) -> tuple[jax.Array, LayerKV | None]:
        """x [B, T, D]; ``kv`` = this layer's cache (``LayerKV``) or None -> (out [B, T, D],
        the cache with these tokens written). Keys are the cached entries and the fresh ones, so prefill, decode
        and a plain forward are the same code."""
        cfg, part = self.cfg, self.part
        D, H, K, hd = x.shape[-1], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q8 = dict(quantized=True)  # a quantized weight reaches project as it is (quant.matmul for few rows)
        wq = param(self, "q", (D, H, hd), (EMBED, HEADS, HEAD_DIM), **q8)     # "btd,dhk->bthk"
        wk = param(self, "k", (D, K, hd), (EMBED, KV_HEADS, HEAD_DIM), **q8)  # "btd,dhk->bthk"
        wv = param(self, "v", (D, K, hd), (EMBED, KV_HEADS, HEAD_DIM), **q8)  # "btd,dhk->bthk"
        wo = param(self, "o", (H, hd, D), (HEADS, HEAD_DIM, EMBED), **q8)     # "bthk,hkd->btd"
        q = part.constrain(project("btd,dhk->bthk", x, wq), (BATCH, LENGTH, ACT_HEADS, None))
        k = part.constrain(project("btd,dhk->bthk", x, wk), (BATCH, LENGTH, ACT_KV_HEADS, None))
        v = part.constrain(project("btd,dhk->bthk", x, wv), (BATCH, LENGTH, ACT_KV_HEADS, None))
        if cfg.rope_layers[self.layer]:
            q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
            if cfg.use_qk_norm:  # after RoPE, per head, no weight, eps = rms_norm_eps
                q, k = rms_normalize(q, cfg.rms_norm_eps), rms_normalize(k, cfg.rms_norm_eps)
        elif cfg.attn_temperature_tuning:
            # [1|B, T] fp32; a packed document counts slots from its own start, as it would alone in a row.
            slots = ctx.q_index if ctx.segment_ids is None else ctx.doc_positions
            s = temperature_scales(slots, cfg.floor_scale, cfg.attn_scale)
            q = (q.astype(jnp.float32) * s[:, :, None, None]).astype(q.dtype)
        chunked = cfg.chunked_layers[self.layer]
        with jax.named_scope("chunked_attention" if chunked else "global_attention"):
            out, kv = self._attend(q, k, v, ctx, kv, cfg.attention_chunk_size if chunked else None)
        return project("bthk,hkd->btd", out, wo), kv

    def _attend(self, q, k, v, ctx: Context, kv, chunk: int | None):
        """Scores q against the cache and the fresh k, v through whichever path scores fewest pairs; returns (out,
        the cache with the fresh tokens written)."""
        scale = self.cfg.head_dim ** -0.5
        if kv is not None and not ctx.cache_empty and k.shape[1] <= kv.length:
            # Decoding: the fresh tokens fit in the cache, so write them first and score the cache alone, with no
            # concatenation of cache and fresh keys (which XLA would then copy to write the cache in place).
            kv = write(kv, k, v, ctx.q_index)
            slots = cached_slots(kv.length, ctx.q_index[0, 0] + k.shape[1])[None]
            c_valid, c_group = self._cached(slots, ctx, chunk)
            q_group = None if chunk is None else chunk_ids(ctx.q_index, ctx.left_pad, chunk)
            mask = visible(ctx.q_index, slots, c_valid, q_group, c_group)
            return attend(q, kv.k.astype(k.dtype), kv.v.astype(v.dtype), mask, scale, "bksd", "bkds",
                          kv.k_scale, kv.v_scale), kv
        # Per key: its slot, whether it may be seen at all, and its group (chunk and/or document; None = global).
        if ctx.segment_ids is not None:
            k_valid, group = ctx.segment_ids > 0, document_groups(ctx.segment_ids, ctx.doc_positions, chunk)
        else:
            k_valid = jnp.take(ctx.token_valid, ctx.q_index[0], axis=1)
            group = None if chunk is None else chunk_ids(ctx.q_index, ctx.left_pad, chunk)
        past, L = None, 0
        if kv is not None:
            if not ctx.cache_empty:  # a prompt in pieces: this piece also sees what the cache held before it
                L = kv.length
                slots = cached_slots(L, ctx.q_index[0, 0])[None]
                past = (*as_keys(kv, k.dtype), slots, *self._cached(slots, ctx, chunk))
            kv = write(kv, k, v, ctx.q_index)
        if past is None and self.part.context > 1 and k.shape[1] > 1:  # a sequence split over devices
            return attend_split(q, k, v, ctx.q_index, k_valid, group, scale, chunk, self.part,
                                self.kernels.query_block), kv
        if past is None and self.kernels.attention != "xla" and k.shape[1] > 1:
            out = self._fused(q, k, v, segments(k_valid, group), scale)
            if out is not None:
                return out, kv
        if use_local(k.shape[1], L, chunk):
            return attend_local(q, k, v, ctx.q_index, group, k_valid, group, scale, chunk, past), kv
        k_index, k_group = ctx.q_index, group
        if past is not None:
            k, v = jnp.concatenate([past[0], k], 1), jnp.concatenate([past[1], v], 1)
            k_index, k_valid = jnp.concatenate([past[2], k_index], 1), jnp.concatenate([past[3], k_valid], 1)
            k_group = None if group is None else jnp.concatenate([past[4], group], 1)
        if q.shape[1] > self.kernels.query_block:
            return attend_by_query_blocks(q, k, v, ctx.q_index, k_index, k_valid, group, k_group, scale,
                                          self.kernels.query_block), kv
        return attend(q, k, v, visible(ctx.q_index, k_index, k_valid, group, k_group), scale), kv

    def _fused(self, q, k, v, segment_ids, scale) -> jax.Array | None:
        """The fused kernel of ``Kernels.attention`` over fresh tokens. The TPU kernel runs per device on a mesh
        (``shard_map`` over the batch and head axes, each device its own rows and heads: a custom call that XLA
        cannot split would otherwise be fed whole); None when the heads do not split evenly with their kv heads
        (the XLA paths then)."""
        if self.kernels.attention != "flash_tpu":
            return flash_attend(q, k, v, segment_ids, scale, interpret=self.kernels.attention == "flash_interpret")
        if q.dtype == jnp.bfloat16 and not mosaic_takes_bf16():
            return None  # Mosaic compiles the kernel's bf16 products only at the default precision ("Bad lhs type")
        part = self.part
        if part.mesh is None:
            return flash_attend_tpu(q, k, v, segment_ids, scale)
        q_spec = part.sharding((BATCH, LENGTH, ACT_HEADS, None), q.shape).spec
        kv_spec = part.sharding((BATCH, LENGTH, ACT_KV_HEADS, None), k.shape).spec

        def even(spec, x):  # every dimension splits evenly over its mesh axes
            return all(n % part.axis_size(e) == 0 for e, n in zip(spec, x.shape))
        if part.axis_size(q_spec[2]) != part.axis_size(kv_spec[2]) or not (even(q_spec, q) and even(kv_spec, k)):
            return None
        seg_spec = jax.sharding.PartitionSpec(*q_spec[:2])
        return jax.shard_map(functools.partial(flash_attend_tpu, scale=scale), mesh=part.mesh,
                             in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                             check_vma=False)(q, k, v, segment_ids)

    @staticmethod
    def _cached(slots: jax.Array, ctx: Context, chunk: int | None) -> tuple[jax.Array, jax.Array | None]:
        """Validity [B, L] and chunk groups [B, L] (or None) of cache entries holding absolute ``slots`` [1, L]."""
        valid = (slots >= 0) & jnp.take(ctx.token_valid, jnp.maximum(slots[0], 0), axis=1)
        return valid, None if chunk is None else chunk_ids(slots, ctx.left_pad, chunk)
