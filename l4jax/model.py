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
from .masks import attention_mask as build_mask, left_padding, positions_from_mask
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
    def __call__(self, x, cos, sin, mask, q_index):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="input_norm")(x)
        x = x + Attention(cfg, self.layer, name="attn", **kw)(h, cos, sin, mask, q_index)
        h = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="post_norm")(x)
        if cfg.is_moe(self.layer):
            with jax.named_scope("moe"):
                ff = MoE(cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size, self.moe_impl,
                         name="moe", **kw)(h)
        else:
            ff = MLP(cfg.intermediate_size_mlp, name="mlp", **kw)(h)
        return nn.with_logical_constraint(x + ff, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))


class Llama4Text(nn.Module):
    cfg: TextConfig
    moe_impl: str = "scan"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """input_ids [B, T] int; attention_mask [B, T] (1 = token, 0 = left padding) -> logits [B, T, V].

        RoPE positions default to each row's count of real tokens before it (as transformers' generate);
        chunk boundaries start at each row's first real token.
        """
        cfg = self.cfg
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.int32)
        if positions is None:
            positions = positions_from_mask(attention_mask)
        embed = self.param("embed", nn.with_logical_partitioning(INIT, (sh.VOCAB, sh.EMBED)),
                           (cfg.vocab_size, cfg.hidden_size), self.param_dtype)
        x = jnp.take(embed, input_ids, axis=0).astype(self.dtype)
        x = nn.with_logical_constraint(x, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))

        cos, sin = rope_angles(positions, inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
        q_index = jnp.arange(T)[None]
        valid, pad = attention_mask > 0, left_padding(attention_mask)
        masks = {chunked: build_mask(q_index, q_index, valid, pad, cfg.attention_chunk_size if chunked else None)
                 for chunked in set(cfg.chunked_layers)}
        for i in range(cfg.num_hidden_layers):
            x = DecoderLayer(cfg, i, self.moe_impl, self.dtype, self.param_dtype, name=f"layers_{i}")(
                x, cos, sin, masks[cfg.chunked_layers[i]], q_index)
        x = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="norm")(x)
        if cfg.tie_word_embeddings:
            head = embed.T
        else:
            head = self.param("lm_head", nn.with_logical_partitioning(INIT, (sh.EMBED, sh.VOCAB)),
                              (cfg.hidden_size, cfg.vocab_size), self.param_dtype)
        logits = jnp.einsum("btd,dv->btv", x, head.astype(self.dtype))
        return nn.with_logical_constraint(logits, (sh.BATCH, sh.LENGTH, sh.ACT_VOCAB))
