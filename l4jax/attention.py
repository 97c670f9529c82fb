"""Grouped-query attention with Llama 4's per-layer variants.

RoPE layers: interleaved RoPE, then (if ``use_qk_norm``) a weightless RMS norm of q and k per head, and the
chunked causal mask. NoPE layers: no RoPE, no QK-norm, query temperature tuning (if ``attn_temperature_tuning``)
and the global causal mask.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import sharding as sh
from .config import TextConfig
from .masks import attention_mask as build_mask, segment_mask, temperature_scales
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

        if cache is None:
            keys, values, k_index, new_cache = k, v, q_index, None
        else:
            cached = cached_slots(cache["k"].shape[1], q_index[0, 0])[None]
            keys = jnp.concatenate([cache["k"].astype(k.dtype), k], axis=1)
            values = jnp.concatenate([cache["v"].astype(v.dtype), v], axis=1)
            k_index = jnp.concatenate([cached, q_index], axis=1)
            new_cache = write_cache(cache, k, v, q_index)
        chunk = cfg.attention_chunk_size if chunked else None
        if segments is not None:
            mask = segment_mask(*segments, chunk)
        else:
            key_valid = (k_index >= 0) & jnp.take(token_valid, jnp.maximum(k_index[0], 0), axis=1)
            mask = build_mask(q_index, k_index, key_valid, left_pad, chunk)
        with jax.named_scope("chunked_attention" if chunked else "global_attention"):
            out = attend(q, keys, values, mask, hd ** -0.5)
        return jnp.einsum("bthk,hkd->btd", out, wo), new_cache
