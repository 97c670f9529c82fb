"""Whole-mask builders: the dense [B, Tq, Tk] masks the model's blockwise paths must agree with.

The model composes groups (chunks, documents) with ``masks.visible`` itself; these build the full matrix the way
one would write it down, for hand-computed cases and as the reference of the blockwise paths.
"""

import jax
import jax.numpy as jnp

from l4jax.model.masks import chunk_ids, document_groups, visible


def attention_mask(q_index: jax.Array, k_index: jax.Array, key_valid: jax.Array, left_pad: jax.Array,
                   chunk_size: int | None) -> jax.Array:
    """Boolean [B, Tq, Tk]: may query slot ``q_index`` attend to key slot ``k_index``?

    q_index [B|1, Tq] and k_index [B|1, Tk] are absolute cache slots; key_valid [B, Tk] is False on padding and
    empty cache slots; left_pad [B]. ``chunk_size=None`` gives plain causal attention.
    """
    if chunk_size is None:
        return visible(q_index, k_index, key_valid)
    return visible(q_index, k_index, key_valid, chunk_ids(q_index, left_pad, chunk_size),
                   chunk_ids(k_index, left_pad, chunk_size))


def segment_mask(segment_ids: jax.Array, positions: jax.Array, chunk_size: int | None) -> jax.Array:
    """Boolean [B, T, T] for packed rows: causal, within one document, and (chunked layers) within one chunk of
    that document; padding (segment 0) is never a key."""
    idx = jnp.arange(segment_ids.shape[-1])[None]
    groups = document_groups(segment_ids, positions, chunk_size)
    return visible(idx, idx, segment_ids > 0, groups, groups)
