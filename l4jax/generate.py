"""Prefill then decode with a preallocated KV cache; both compiled, the decode step compiled once per shape.

The cache is allocated for the whole run (prompt + new tokens) and donated to every step, so decoding updates it
in place. Chunked layers keep a chunk-sized ring (``model.init_cache``). Rows stop independently at their stop
tokens and are filled with the pad token afterwards, as transformers' ``generate`` does. Images (``pixel_values``)
enter the prefill only: their features replace the prompt's ``<|patch|>`` embeddings, and decode steps are text.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import sharding as sh
from .model import init_cache
from .sampling import sample


@functools.partial(jax.jit, static_argnames=("module", "rules"), donate_argnames=("cache",))
def _prefill(module, rules, params, ids, mask, cache, embeds=None):
    """ids [B, T], mask [B, S], embeds [B, T, D] or None -> (last logits [B, V] fp32, cache)."""
    with nn.logical_axis_rules(rules):
        logits, cache = module.apply({"params": params}, ids, mask, cache=cache, offset=0, inputs_embeds=embeds)
    return logits[:, -1].astype(jnp.float32), cache


@functools.partial(jax.jit, static_argnames=("module", "rules", "temperature", "top_k", "top_p"),
                   donate_argnames=("cache",))
def _step(module, rules, params, logits, key, offset, mask, cache, done, stop, pad, *, temperature, top_k, top_p):
    """Sample the next token from ``logits``, feed it at slot ``offset``; return (token [B], logits, cache, done)."""
    token = sample(logits, key, temperature=temperature, top_k=top_k, top_p=top_p)
    token = jnp.where(done, pad, token)
    done = done | jnp.isin(token, stop)
    with nn.logical_axis_rules(rules):
        out, cache = module.apply({"params": params}, token[:, None], mask, cache=cache, offset=offset)
    return token, out[:, -1].astype(jnp.float32), cache, done


def stream(model, input_ids, attention_mask=None, *, max_new_tokens: int = 32, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, seed: int = 0,
           stop_tokens: Sequence[int] | None = None, max_length: int | None = None,
           pixel_values=None) -> Iterator[np.ndarray]:
    """Yield the next token of every row, [B] int, as soon as it is made. Arguments as ``generate``."""
    cfg = model.config.text
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected a non-empty [B, T] prompt, got shape {ids.shape}")
    mask = np.ones_like(ids, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask: shape {mask.shape} does not match input_ids {ids.shape}")
    empty = np.flatnonzero(mask.sum(-1) == 0)
    if empty.size:
        raise ValueError(f"input_ids: rows {empty.tolist()} are empty (attention_mask is all zeros)")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise ValueError(f"input_ids: token ids must be in [0, {cfg.vocab_size}), found {ids.min()}..{ids.max()}")
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
    S = T + new
    mesh = getattr(model, "mesh", None)
    # Early fusion on the unpadded batch (the image tiles belong to its rows), checked against the prompt first.
    embeds = None if pixel_values is None else model.embed_images(ids, pixel_values)
    if mesh is not None and B % sh.batch_multiple(mesh):
        # The batch axes must divide the batch: extra rows copy row 0 and are dropped from what is yielded.
        extra = -B % sh.batch_multiple(mesh)
        ids, mask = (np.concatenate([a, np.repeat(a[:1], extra, 0)]) for a in (ids, mask))
        if embeds is not None:
            embeds = jnp.concatenate([embeds, jnp.repeat(embeds[:1], extra, 0)])
    full_mask = jnp.asarray(np.pad(mask, ((0, 0), (0, new)), constant_values=1))
    rules = getattr(model, "rules", sh.RULES)
    cache = init_cache(cfg, ids.shape[0], S, model.dtype)
    pad = jnp.int32(cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    stop_arr = jnp.asarray(stop if stop else (-1,), jnp.int32)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        logits, cache = _prefill(model.module, rules, model.params, jnp.asarray(ids, jnp.int32), full_mask, cache,
                                 embeds)
        done = jnp.zeros((ids.shape[0],), bool)
        key = jax.random.key(seed)
        for i in range(new):
            key, sub = jax.random.split(key)
            token, logits, cache, done = _step(model.module, rules, model.params, logits, sub, jnp.int32(T + i),
                                               full_mask, cache, done, stop_arr, pad, temperature=temperature,
                                               top_k=top_k, top_p=top_p)
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
