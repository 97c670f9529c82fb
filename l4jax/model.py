"""The Llama 4 text decoder (``Llama4ForCausalLM``) as a Flax linen module.

    x = embed[ids]
    per layer i:  x += Attn_i(RMSNorm(x));  x += (MoE if i in moe_layers else MLP)(RMSNorm(x))
    logits = RMSNorm(x) @ lm_head

Parameters carry logical axis names (``sharding.py``); ``nn.meta.unbox`` of the init output is a plain pytree.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import sharding as sh
from .attention import Attention
from .config import TextConfig
from .masks import left_padding, positions_from_mask
from .mlp import INIT, MLP
from .moe import MoE
from .norm import RMSNorm
from .rope import inv_frequencies, rope_angles


class DecoderLayer(nn.Module):
    cfg: TextConfig
    layer: int
    moe_impl: str = "scan"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, q_index, token_valid, left_pad, cache=None):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="input_norm")(x)
        a, cache = Attention(cfg, self.layer, name="attn", **kw)(h, cos, sin, q_index, token_valid, left_pad, cache)
        x = x + a
        h = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="post_norm")(x)
        if cfg.is_moe(self.layer):
            with jax.named_scope("moe"):
                ff = MoE(cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size, self.moe_impl,
                         name="moe", **kw)(h)
        else:
            ff = MLP(cfg.intermediate_size_mlp, name="mlp", **kw)(h)
        return nn.with_logical_constraint(x + ff, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED)), cache


def init_cache(cfg: TextConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """Zeroed KV cache: {"layers_i": {"k", "v"}} each [B, L, K, hd].

    Chunked (RoPE) layers keep a ring of L = attention_chunk_size entries, since a query never sees past the start
    of its own chunk; global (NoPE) layers keep L = max_len. For Scout at long context that is ~3/4 less memory
    than a full-length cache on every layer.
    """
    def length(i):
        return min(cfg.attention_chunk_size, max_len) if cfg.chunked_layers[i] else max_len
    shape = lambda i: (batch, length(i), cfg.num_key_value_heads, cfg.head_dim)  # noqa: E731
    return {f"layers_{i}": {"k": jnp.zeros(shape(i), dtype), "v": jnp.zeros(shape(i), dtype)}
            for i in range(cfg.num_hidden_layers)}


CACHE_AXES = (sh.BATCH, None, sh.ACT_KV_HEADS, None)  # logical axes of every cache entry


class Llama4Text(nn.Module):
    cfg: TextConfig
    moe_impl: str = "scan"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, cache: dict | None = None, offset: jax.Array | int = 0):
        """input_ids [B, T] int -> logits [B, T, V]; with a ``cache``, returns (logits, updated cache).

        attention_mask [B, S] (1 = token, 0 = left padding) is indexed by absolute slot: S = T for a plain forward,
        S >= offset + T with a cache (slots of tokens still to come count as 1). ``offset`` is the number of tokens
        already in the cache. RoPE positions default to each row's count of real tokens before the slot (as
        transformers' generate); chunk boundaries start at each row's first real token.
        """
        cfg = self.cfg
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.int32)
        if positions is None:
            positions = jax.lax.dynamic_slice_in_dim(positions_from_mask(attention_mask), offset, T, axis=1)
        embed = self.param("embed", nn.with_logical_partitioning(INIT, (sh.VOCAB, sh.EMBED)),
                           (cfg.vocab_size, cfg.hidden_size), self.param_dtype)
        x = jnp.take(embed, input_ids, axis=0).astype(self.dtype)
        x = nn.with_logical_constraint(x, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))

        cos, sin = rope_angles(positions, inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
        q_index = offset + jnp.arange(T)[None]
        valid, pad = attention_mask > 0, left_padding(attention_mask)
        new_cache = {}
        for i in range(cfg.num_hidden_layers):
            name = f"layers_{i}"
            x, c = DecoderLayer(cfg, i, self.moe_impl, self.dtype, self.param_dtype, name=name)(
                x, cos, sin, q_index, valid, pad, None if cache is None else cache[name])
            if cache is not None:
                new_cache[name] = jax.tree.map(lambda a: nn.with_logical_constraint(a, CACHE_AXES), c)
        x = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="norm")(x)
        if cfg.tie_word_embeddings:
            head = embed.T
        else:
            head = self.param("lm_head", nn.with_logical_partitioning(INIT, (sh.EMBED, sh.VOCAB)),
                              (cfg.hidden_size, cfg.vocab_size), self.param_dtype)
        logits = jnp.einsum("btd,dv->btv", x, head.astype(self.dtype))
        logits = nn.with_logical_constraint(logits, (sh.BATCH, sh.LENGTH, sh.ACT_VOCAB))
        return logits if cache is None else (logits, new_cache)
