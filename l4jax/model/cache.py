"""The KV cache: a registered dataclass pytree that knows its own shapes, logical axes and shardings.

Layer i keeps k[i] [B, K, L_i, hd] and v[i] [B, K, hd, L_i] (logical axes ``KVCache.AXES``): chunked (RoPE)
layers a ring of L_i = attention_chunk_size entries, since a query never sees past the start of its own chunk;
global (NoPE) layers L_i = S, the whole run. For Scout at long context that is ~3/4 less memory than a full-length
cache on every layer.
``pos`` counts the tokens written so far: the next token goes to absolute slot ``pos``, which a ring stores at
entry ``pos % L_i``. ``empty`` (static: part of the tree's structure, not an array) is True for a cache fresh from
``init`` or ``abstract``: a prefill into it scores only the prompt's own keys, never the empty slots.

The layouts are the ones the decode step's two matmuls want, with the contracted axis last (hd for q k^T, the slots
L for p v): XLA carries a while loop's state in the layout its body prefers, so a cache stored otherwise would be
transposed on the way into the decode loop and back out of it, a full copy of the cache per device call.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ..config import TextConfig
from .axes import ACT_KV_HEADS, BATCH, Partitioning


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "pos"], meta_fields=["empty"])
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, K, L_i, hd]
    v: tuple[jax.Array, ...]  # per layer [B, K, hd, L_i]
    pos: jax.Array            # [] int32: tokens written so far
    empty: bool = False       # static: nothing written yet

    AXES = (BATCH, ACT_KV_HEADS, None, None)  # logical axes of every k[i] and v[i]

    @staticmethod
    def lengths(cfg: TextConfig, max_len: int) -> tuple[int, ...]:
        """Entries per layer: the chunk on chunked layers (at most max_len), max_len on global ones."""
        return tuple(min(cfg.attention_chunk_size, max_len) if chunked else max_len for chunked in cfg.chunked_layers)

    @classmethod
    def abstract(cls, cfg: TextConfig, batch: int, max_len: int, dtype=jnp.float32,
                 part: Partitioning = Partitioning()) -> "KVCache":
        """ShapeDtypeStructs of a cache for ``batch`` rows of ``max_len`` slots, on ``part``'s shardings."""
        kv = part.sharding(cls.AXES) if part.mesh is not None else None
        K, hd = cfg.num_key_value_heads, cfg.head_dim
        lengths = cls.lengths(cfg, max_len)
        pos = NamedSharding(part.mesh, P()) if part.mesh is not None else None
        return cls(tuple(jax.ShapeDtypeStruct((batch, K, n, hd), dtype, sharding=kv) for n in lengths),
                   tuple(jax.ShapeDtypeStruct((batch, K, hd, n), dtype, sharding=kv) for n in lengths),
                   jax.ShapeDtypeStruct((), jnp.int32, sharding=pos), empty=True)

    @classmethod
    def init(cls, cfg: TextConfig, batch: int, max_len: int, dtype=jnp.float32,
             part: Partitioning = Partitioning()) -> "KVCache":
        """A zeroed cache, created directly on its shardings (each device allocates only its shard)."""
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype, device=s.sharding),
                            cls.abstract(cfg, batch, max_len, dtype, part))

    def layer(self, i: int) -> tuple[jax.Array, jax.Array]:
        return self.k[i], self.v[i]

    def length(self, i: int) -> int:
        """Entries of layer i (its slots L_i)."""
        return self.k[i].shape[2]


def cached_slots(length: int, n: jax.Array) -> jax.Array:
    """Absolute slot held by each of ``length`` cache entries after ``n`` tokens were written; -1 where empty.

    Entry e holds the latest slot i < n with i % length == e. For a full-length cache that is just e (if e < n);
    for a chunk-sized ring it is the last ``length`` slots, which is all a chunked layer can ever see.
    """
    e = jnp.arange(length)
    i = e + length * jnp.floor_divide(n - 1 - e, length)
    return jnp.where(i >= 0, i, -1)


def write(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
          q_index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Store the newest k, v [B, T, K, hd] at entries slot % L (only the last L if T is longer) of a layer's
    k_cache [B, K, L, hd] and v_cache [B, K, hd, L].

    One token (a decode step) is a dynamic-update-slice, which XLA does in place in a donated cache; more are a
    scatter (a prefill, which writes every entry anyway)."""
    length, T = k_cache.shape[2], k.shape[1]
    k, v = k.transpose(0, 2, 1, 3).astype(k_cache.dtype), v.transpose(0, 2, 3, 1).astype(v_cache.dtype)
    if T == 1:
        entry = q_index[0, 0] % length
        return (jax.lax.dynamic_update_slice_in_dim(k_cache, k, entry, 2),
                jax.lax.dynamic_update_slice_in_dim(v_cache, v, entry, 3))
    start = T - min(T, length)
    entries = q_index[0, start:] % length
    return k_cache.at[:, :, entries].set(k[:, :, start:]), v_cache.at[:, :, :, entries].set(v[..., start:])


def as_keys(k_cache: jax.Array, v_cache: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """A layer's cache in the fresh keys' layout, k and v [B, L, K, hd] (to score it beside fresh keys)."""
    return k_cache.transpose(0, 2, 1, 3).astype(dtype), v_cache.transpose(0, 3, 1, 2).astype(dtype)
