"""The KV cache: a registered dataclass pytree that knows its own shapes, logical axes and shardings.

Layer i keeps k[i], v[i] of shape [B, L_i, K, hd] (logical axes ``KVCache.AXES``): chunked (RoPE) layers a ring of
L_i = attention_chunk_size entries, since a query never sees past the start of its own chunk; global (NoPE) layers
L_i = S, the whole run. For Scout at long context that is ~3/4 less memory than a full-length cache on every layer.
``pos`` counts the tokens written so far: the next token goes to absolute slot ``pos``, which a ring stores at
entry ``pos % L_i``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ..config import TextConfig
from .axes import ACT_KV_HEADS, BATCH, Partitioning


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, L_i, K, hd]
    v: tuple[jax.Array, ...]  # per layer [B, L_i, K, hd]
    pos: jax.Array            # [] int32: tokens written so far

    AXES = (BATCH, None, ACT_KV_HEADS, None)  # logical axes of every k[i] and v[i]

    @staticmethod
    def lengths(cfg: TextConfig, max_len: int) -> tuple[int, ...]:
        """Entries per layer: the chunk on chunked layers (at most max_len), max_len on global ones."""
        return tuple(min(cfg.attention_chunk_size, max_len) if chunked else max_len for chunked in cfg.chunked_layers)

    @classmethod
    def abstract(cls, cfg: TextConfig, batch: int, max_len: int, dtype=jnp.float32,
                 part: Partitioning = Partitioning()) -> "KVCache":
        """ShapeDtypeStructs of a cache for ``batch`` rows of ``max_len`` slots, on ``part``'s shardings."""
        kv = part.sharding(cls.AXES) if part.mesh is not None else None
        one = lambda n: jax.ShapeDtypeStruct((batch, n, cfg.num_key_value_heads, cfg.head_dim), dtype,  # noqa: E731
                                             sharding=kv)
        lengths = cls.lengths(cfg, max_len)
        pos = NamedSharding(part.mesh, P()) if part.mesh is not None else None
        return cls(tuple(map(one, lengths)), tuple(map(one, lengths)), jax.ShapeDtypeStruct((), jnp.int32,
                                                                                             sharding=pos))

    @classmethod
    def init(cls, cfg: TextConfig, batch: int, max_len: int, dtype=jnp.float32,
             part: Partitioning = Partitioning()) -> "KVCache":
        """A zeroed cache, created directly on its shardings (each device allocates only its shard)."""
        shapes = cls.abstract(cfg, batch, max_len, dtype, part)
        make = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731
        shardings = None if part.mesh is None else jax.tree.map(lambda s: s.sharding, shapes)
        return jax.jit(make, out_shardings=shardings)()

    def layer(self, i: int) -> tuple[jax.Array, jax.Array]:
        return self.k[i], self.v[i]


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
    """Store the newest k, v [B, T, K, hd] at entries slot % length (only the last ``length`` if T is longer)."""
    length, T = k_cache.shape[1], k.shape[1]
    start = T - min(T, length)
    entries = q_index[0, start:] % length
    return (k_cache.at[:, entries].set(k[:, start:].astype(k_cache.dtype)),
            v_cache.at[:, entries].set(v[:, start:].astype(v_cache.dtype)))
