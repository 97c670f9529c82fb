"""Scoring text through the KV cache: the likelihood a deployed model assigns, token by token.

A plain forward scores every token from the fresh keys; generation scores them from the cache, so a cache format
(the int8 one) is judged here: prefill a prefix, then feed the rest one token at a time (teacher forcing) through
the same decode step ``generate`` runs, reading each next token's log-probability.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..model.cache import KVCache
from ..model.decoder import Inputs
from .generate import _cache_dtype
from .inputs import check_tokens


@functools.partial(jax.jit, static_argnames=("module", "prefix", "logits"))
def _through_cache(module, params, ids, cache: KVCache, *, prefix: int, logits: bool):
    """ids [B, T] -> log p(ids[:, t] | ids[:, :t]) for t = prefix .. T-1, [B, T - prefix] fp32; with ``logits``
    the whole next-token logits instead, [B, T - prefix, V] fp32."""
    mask = jnp.ones(ids.shape, jnp.int32)
    out = module.apply({"params": params}, Inputs(ids[:, :prefix], mask), cache)

    def step(carry, t):
        last, cache = carry
        token = jax.lax.dynamic_index_in_dim(ids, t, 1)  # [B, 1]
        read = last if logits else jnp.take_along_axis(jax.nn.log_softmax(last), token, axis=-1)[:, 0]
        out = module.apply({"params": params}, Inputs(token, mask), cache)
        return (out.logits[:, -1].astype(jnp.float32), out.cache), read

    first = (out.logits[:, -1].astype(jnp.float32), out.cache)
    _, read = jax.lax.scan(step, first, jnp.arange(prefix, ids.shape[1]))
    return jnp.moveaxis(read, 0, 1)


def _run(model, input_ids, prefix: int, kv_dtype, logits: bool) -> np.ndarray:
    cfg = model.config.text
    ids, _ = check_tokens(input_ids, None, cfg.vocab_size, prompt=True, max_len=cfg.max_position_embeddings)
    B, T = ids.shape
    if not 0 < prefix < T:
        raise ValueError(f"prefix: must be in 1 .. {T - 1} (the rows are {T} tokens), got {prefix}")
    cache = KVCache.init(cfg, B, T, _cache_dtype(kv_dtype, model.dtype), model.part)
    return np.asarray(_through_cache(model.module, model.params, jnp.asarray(ids), cache, prefix=prefix,
                                     logits=logits))


def score_through_cache(model, input_ids, *, prefix: int, kv_dtype=None) -> np.ndarray:
    """input_ids [B, T] (unpadded rows of equal length) -> log-probabilities [B, T - prefix] of tokens prefix ..
    T-1, each read from the decode step after the tokens before it were written to a cache of ``kv_dtype``
    (default the model's; "int8" as in ``generate``). Perplexity: ``exp(-mean)``."""
    return _run(model, input_ids, prefix, kv_dtype, logits=False)


def logits_through_cache(model, input_ids, *, prefix: int, kv_dtype=None) -> np.ndarray:
    """As ``score_through_cache``, but every next-token logit: [B, T - prefix, V] fp32 (logits[:, j] predict
    token prefix + j)."""
    return _run(model, input_ids, prefix, kv_dtype, logits=True)
