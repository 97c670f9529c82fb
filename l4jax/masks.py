"""Attention masks: global causal (NoPE layers) and chunked causal (RoPE layers), with left padding.

Indices are absolute slots in the (virtual) KV cache, as in transformers' ``masking_utils``. Chunks are aligned to
the first real token of each row (slot ``left_pad``), then every ``C`` slots: they are fixed blocks, not a sliding
window, so a query at position p sees only the ``p % C + 1`` most recent positions of its own chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def left_padding(attention_mask: jax.Array) -> jax.Array:
    """[B, S] 0/1 mask -> [B] number of leading padding slots (a row of zeros counts every slot)."""
    return jnp.sum(jnp.cumsum(attention_mask, axis=-1) == 0, axis=-1)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """RoPE positions counted from each row's first real token: cumsum(mask) - 1, pads at 0 (as HF generate)."""
    pos = jnp.cumsum(attention_mask, axis=-1) - 1
    return jnp.where(attention_mask > 0, pos, 0).astype(jnp.int32)


def attention_mask(q_index: jax.Array, k_index: jax.Array, key_valid: jax.Array, left_pad: jax.Array,
                   chunk_size: int | None) -> jax.Array:
    """Boolean [B, Tq, Tk]: may query slot ``q_index`` attend to key slot ``k_index``?

    q_index [B|1, Tq] and k_index [B|1, Tk] are absolute cache slots; key_valid [B, Tk] is False on padding and
    empty cache slots; left_pad [B]. ``chunk_size=None`` gives plain causal attention.
    """
    q = q_index[:, :, None]
    k = k_index[:, None, :]
    allowed = (k <= q) & key_valid[:, None, :]
    if chunk_size is not None:
        lp = left_pad[:, None, None]
        allowed &= jnp.floor_divide(k - lp, chunk_size) == jnp.floor_divide(q - lp, chunk_size)
    return allowed


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """[B, T] document ids of packed rows (0 = padding) -> position of each token within its document."""
    T = segment_ids.shape[-1]
    idx = jnp.arange(T)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)  # slot where the current document began
    return jnp.where(segment_ids > 0, idx - first, 0).astype(jnp.int32)


def segment_mask(segment_ids: jax.Array, positions: jax.Array, chunk_size: int | None) -> jax.Array:
    """Boolean [B, T, T] for packed rows: causal, within one document, and (chunked layers) within one chunk of
    that document, chunks counted from the document's first token as if it were a row of its own."""
    seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
    idx = jnp.arange(segment_ids.shape[-1])
    allowed = (idx[None, None, :] <= idx[None, :, None]) & (seg_q == seg_k) & (seg_k > 0)
    if chunk_size is not None:
        allowed &= (positions[:, :, None] // chunk_size) == (positions[:, None, :] // chunk_size)
    return allowed


def temperature_scales(q_index: jax.Array, floor_scale: float, attn_scale: float) -> jax.Array:
    """NoPE-layer query scale 1 + attn_scale * log1p(floor((p + 1) / floor_scale)), fp32, same shape as q_index.

    p is the absolute cache slot (padding included), as in the reference, not the RoPE position.
    """
    p = q_index.astype(jnp.float32)
    return 1.0 + attn_scale * jnp.log1p(jnp.floor((p + 1.0) / floor_scale))
