"""Prefill then decode with a preallocated KV cache; both compiled, the decode step compiled once per shape.

The cache is allocated for the whole run (prompt + new tokens) and donated to every step, so decoding updates it
in place. Chunked layers keep a chunk-sized ring (``KVCache``). Rows stop independently at their stop
tokens and are filled with the pad token afterwards, as transformers' ``generate`` does. Images (``pixel_values``)
enter the prefill only: their features replace the prompt's ``<|patch|>`` embeddings, and decode steps are text.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..model.cache import KVCache
from ..model.decoder import Inputs
from ..parallel import pad_batch
from .inputs import check_tokens
from .sampling import sample


@functools.partial(jax.jit, static_argnames=("module",), donate_argnames=("cache",))
def _prefill(module, params, inputs: Inputs, cache: KVCache):
    """The prompt [B, T] into an empty cache -> (last logits [B, V] fp32, cache)."""
    out = module.apply({"params": params}, inputs, cache)
    return out.logits[:, -1].astype(jnp.float32), out.cache


@functools.partial(jax.jit, static_argnames=("module", "temperature", "top_k", "top_p"), donate_argnames=("cache",))
def _step(module, params, logits, key, mask, cache: KVCache, done, stop, pad, *, temperature, top_k, top_p):
    """Sample the next token from ``logits``, feed it at slot ``cache.pos``; return (token [B], logits, cache,
    done)."""
    token = sample(logits, key, temperature=temperature, top_k=top_k, top_p=top_p)
    token = jnp.where(done, pad, token)
    done = done | jnp.isin(token, stop)
    out = module.apply({"params": params}, Inputs(token[:, None], mask), cache)
    return token, out.logits[:, -1].astype(jnp.float32), out.cache, done


def stream(model, input_ids, attention_mask=None, *, max_new_tokens: int = 32, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, seed: int = 0,
           stop_tokens: Sequence[int] | None = None, max_length: int | None = None,
           pixel_values=None) -> Iterator[np.ndarray]:
    """Yield the next token of every row, [B] int, as soon as it is made. Arguments as ``generate``."""
    cfg = model.config.text
    ids, mask = check_tokens(input_ids, attention_mask, cfg.vocab_size, prompt=True)
    stop = tuple(cfg.eos_token_id if stop_tokens is None else stop_tokens)
    bad = [t for t in stop if not 0 <= int(t) < cfg.vocab_size]
    if bad:
        raise ValueError(f"stop_tokens: unknown token ids {bad} (vocab size {cfg.vocab_size})")
    B, T = ids.shape
    max_length = cfg.max_position_embeddings if max_length is None else max_length
    if T >= max_length:
        raise ValueError(f"input_ids: prompt length {T} leaves no room under max_length {max_length}")
    new = min(max_new_tokens, max_length - T)
    if new <= 0:
        return
    # Early fusion on the unpadded batch (the image tiles belong to its rows), checked against the prompt first.
    embeds = None if pixel_values is None else model.embed_images(ids, pixel_values)
    # The batch axes must divide the batch: extra rows (all padding) are dropped from what is yielded.
    (ids, mask), _ = pad_batch(model.mesh, ids, mask)
    if embeds is not None:
        (embeds,), _ = pad_batch(model.mesh, embeds)
    full_mask = jnp.asarray(np.pad(mask, ((0, 0), (0, new)), constant_values=1))
    cache = KVCache.init(cfg, ids.shape[0], T + new, model.dtype, model.part)
    pad = jnp.int32(cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    stop_arr = jnp.asarray(stop if stop else (-1,), jnp.int32)
    logits, cache = _prefill(model.module, model.params, Inputs(jnp.asarray(ids), full_mask, embeds=embeds), cache)
    done = jnp.zeros((ids.shape[0],), bool)
    key = jax.random.key(seed)
    for _ in range(new):
        key, sub = jax.random.split(key)
        token, logits, cache, done = _step(model.module, model.params, logits, sub, full_mask, cache, done,
                                           stop_arr, pad, temperature=temperature, top_k=top_k, top_p=top_p)
        yield np.asarray(token)[:B]
        if bool(done[:B].all()):
            return


def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             stop_tokens: Sequence[int] | None = None, max_length: int | None = None,
             callback: Callable[[np.ndarray], None] | None = None, pixel_values=None) -> np.ndarray:
    """Prompt [B, T] (left-padded, attention_mask 0 on padding) -> [B, T + new] tokens.

    temperature 0 is greedy; top_k / top_p filter before sampling; ``seed`` makes sampling reproducible.
    ``stop_tokens`` default to the config's eos ids; a row that emits one is padded afterwards, and generation ends
    when every row has stopped. ``callback`` receives each step's [B] tokens as they are made. ``pixel_values``
    [N, C, S, S] are the image tiles of all rows in prompt order (see ``Model.__call__``).
    """
    steps = []
    for token in stream(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed, stop_tokens=stop_tokens, max_length=max_length,
                        pixel_values=pixel_values):
        steps.append(token)
        if callback is not None:
            callback(token)
    ids = np.asarray(input_ids)
    return np.concatenate([ids, np.stack(steps, axis=1).astype(ids.dtype)], axis=1) if steps else ids
