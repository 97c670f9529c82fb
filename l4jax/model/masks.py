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


def visible(q_index: jax.Array, k_index: jax.Array, key_valid: jax.Array, q_group: jax.Array | None = None,
            k_group: jax.Array | None = None) -> jax.Array:
    """Boolean [..., Tq, Tk]: key slot <= query slot, key valid, and (when groups are given) the same group.

    Every mask of the model is this one rule; a group is a chunk (chunked layers), a document (packed rows) or
    both. Query-side arrays are [..., Tq], key-side [..., Tk], leading axes broadcast (e.g. [1|B, T] or blocks).
    """
    allowed = (k_index[..., None, :] <= q_index[..., :, None]) & key_valid[..., None, :]
    if q_group is not None:
        allowed &= q_group[..., :, None] == k_group[..., None, :]
    return allowed


def chunk_ids(index: jax.Array, left_pad: jax.Array, chunk_size: int) -> jax.Array:
    """[B|1, T] absolute slots -> [B, T] chunk numbers, chunks counted from each row's first real token."""
    return jnp.floor_divide(index - left_pad[:, None], chunk_size)


def document_groups(segment_ids: jax.Array, positions: jax.Array, chunk_size: int | None) -> jax.Array:
    """[B, T] packed rows -> [B, T] group ids: the document, and within it (chunked layers) the chunk counted
    from the document's first token, as if the document were a row of its own. Documents are contiguous runs."""
    if chunk_size is None:
        return segment_ids
    return segment_ids * (segment_ids.shape[-1] // chunk_size + 1) + positions // chunk_size


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """[B, T] document ids of packed rows (0 = padding) -> position of each token within its document."""
    T = segment_ids.shape[-1]
    idx = jnp.arange(T)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)  # slot where the current document began
    return jnp.where(segment_ids > 0, idx - first, 0).astype(jnp.int32)


def temperature_scales(q_index: jax.Array, floor_scale: float, attn_scale: float) -> jax.Array:
    """NoPE-layer query scale 1 + attn_scale * log1p(floor((p + 1) / floor_scale)), fp32, same shape as q_index.

    p is the absolute cache slot (padding included), as in the reference, not the RoPE position.
    """
    p = q_index.astype(jnp.float32)
    return 1.0 + attn_scale * jnp.log1p(jnp.floor((p + 1.0) / floor_scale))


def dense(attention_mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
          chunk_size: int | None = None) -> jax.Array:
    """Boolean [B, T, T]: what each query of a whole row sees in one layer, by the rule above. Rows are either
    left-padded (``attention_mask`` [B, T], 0 on padding) or packed documents (``segment_ids`` [B, T], 0 on
    padding); ``chunk_size`` for a chunked (RoPE) layer, None for a global (NoPE) one. The attention itself never
    builds this matrix (it visits blocks); it is for pictures and checks."""
    if (attention_mask is None) == (segment_ids is None):
        raise ValueError("dense: give attention_mask (left-padded rows) or segment_ids (packed rows)")
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
        idx = jnp.arange(segment_ids.shape[-1])[None]
        groups = document_groups(segment_ids, segment_positions(segment_ids), chunk_size)
        return visible(idx, idx, segment_ids > 0, groups, groups)
    attention_mask = jnp.asarray(attention_mask)
    idx = jnp.arange(attention_mask.shape[-1])[None]
    if chunk_size is None:
        return visible(idx, idx, attention_mask > 0)
    chunks = chunk_ids(idx, left_padding(attention_mask), chunk_size)
    return visible(idx, idx, attention_mask > 0, chunks, chunks)
